"""The serving guide's first section (docs/serving.md, "Serving with Triton Inference Server", linked from
the README), run as written: its bash and Python blocks in order in one shell (deploy the artifact the
README's main command builds, start the real Triton server, /v1/rerank over gRPC to it, the Python client
over HTTP, stop, then /rerank in-process), from a folder holding a tiny random-weights artifact where the
main build command writes its own. Only the ports differ (free ones for 8000, 8001 and 8080), and
`ettin-export` / `python` are those of a fresh virtual environment that holds only what a user installs
(the README's CPU torch line, then the section's pip line, verbatim, in this checkout): an extra the
section needs but does not name fails here, as it would for a user.

Also what the guide promises statically: the README links it, the extras it installs hold what deploy and
serve import, the tritonserver command it shows carries the flags deploy records, and deploy's own hint
names `numpy<2`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

from .tritonserver import harness, server_env_or_skip

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
SERVING = (REPO / "docs" / "serving.md").read_text(encoding="utf-8")  # the serving guide the README links
SECTION_START, SECTION_END = "## Serving with Triton Inference Server\n", "\nElsewhere ("
MAIN_BUILD = "ettin-export build --size 17m --random-weights --target cpu"
TOLERANCE = 1e-5


def section() -> str:
    start = SERVING.index(SECTION_START)
    return SERVING[start:SERVING.index(SECTION_END, start)]


def blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced block in the runnable part of the section, in order."""
    return re.findall(r"```(bash|python)\n(.*?)```", section(), flags=re.S)


def pip_lines() -> list[str]:
    return [line for lang, code in blocks() if lang == "bash" for line in code.splitlines()
            if line.startswith("pip install")]


def script(ports: dict[str, int]) -> str:
    """The blocks as one bash script: bash verbatim (but pip), python through a heredoc; other ports."""
    parts = ["set -euo pipefail"]
    for lang, code in blocks():
        if lang == "bash":
            parts.append("\n".join(line for line in code.splitlines() if not line.startswith("pip install")))
        else:
            parts.append(f"python - <<'PY'\n{code}PY")
    text = "\n".join(parts)
    for old, new in ports.items():
        text = re.sub(rf"\b{old}\b", str(new), text)
    return text


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_section_deploys_what_the_main_command_builds():
    from ettin_export.commands.build import default_out
    from ettin_export.targets import get_target

    assert MAIN_BUILD in README
    assert "](docs/serving.md)" in README  # the README links the guide these commands come from
    built = default_out(Namespace(size="17m", model=None, random_weights=True, precision=None), get_target("cpu"))
    assert built.as_posix() == "artifacts/17m-random-cpu"
    code = "\n".join(code for _, code in blocks())
    assert f"ettin-export deploy triton {built.as_posix()} --repo model_repository --allow-random-weights" in code
    assert f"ettin-export serve --artifact {built.as_posix()} --allow-random-weights --port 8080 &" in code
    assert "ettin-export serve --triton localhost:8001 --port 8080 &" in code
    assert "17m-cpu" not in code  # the real-weights artifact's name belongs to the "Elsewhere" block


def test_the_extras_it_installs_hold_what_deploy_and_serve_import():
    (line,) = pip_lines()
    extras = re.search(r"\.\[([a-z,-]+)\]", line).group(1).split(",")
    optional = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = _requirement_names([r for extra in extras for r in optional[extra]])
    # deploy: the config schema (tritonclient + protobuf), the ONNX graph's signature (onnx);
    # serve --triton: Starlette, uvicorn, tritonclient's gRPC client.
    assert {"tritonclient", "protobuf", "onnx", "starlette", "uvicorn"} <= names, names
    grpc = [r for extra in extras for r in optional[extra] if r.lower().startswith("tritonclient")]
    assert any("grpc" in r for r in grpc), grpc
    # The section's Python client runs over HTTP: tritonclient's http client (gevent, geventhttpclient).
    assert any("http" in r for r in grpc), grpc


def test_deploy_prints_the_servers_pip_line_with_numpy_below_2_and_the_default_ports(tiny_artifact, tmp_path,
                                                                                    capsys):
    from ettin_export.cli import main as cli

    repo = tmp_path / "model_repository"
    assert cli(["deploy", "triton", str(tiny_artifact), "--repo", str(repo), "--allow-random-weights"]) == 0
    out = capsys.readouterr().out
    marker = json.loads((repo / "ettin-deploy.json").read_text())
    assert "numpy<2" in marker["python_requirements"]
    assert f"pip install {' '.join(repr(r) for r in marker['python_requirements'])}" in out.replace('"', "'")
    assert "tritonserver's defaults: HTTP 8000, gRPC 8001" in out
    assert "--http-port 8000 --grpc-port 8001" in out
    # The tritonserver commands the serving guide shows carry exactly the flags deploy records (none here).
    assert marker["server_args"] == []
    code = "\n".join(re.findall(r"```\w*\n(.*?)```", SERVING, flags=re.S))
    commands = re.findall(r"tritonserver --model-repository=\S+([^\n\"]*)", code)
    assert commands  # the NGC container's
    for flags in commands:
        assert flags.split() == marker["server_args"], flags


def install_lines() -> list[str]:
    """What a user who followed the README installs before this section: the CPU torch of "Install and run"
    (its first command), then the section's own pip line, verbatim."""
    first = re.search(r"## Install and run.*?```bash\n(.*?)```", README, flags=re.S).group(1)
    torch_line = next(part.strip() for part in first.split("&&") if part.strip().startswith("pip install torch"))
    return [torch_line, *pip_lines()]


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    """A fresh virtual environment holding only what the README and the guide install (`install_lines`, run
    in the checkout as they say), first on PATH: its `ettin-export` and `python` run the section."""
    server_env_or_skip()
    venv = tmp_path_factory.mktemp("readme-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({"PATH": os.pathsep.join([str(venv / "bin"), env["PATH"]]), "VIRTUAL_ENV": str(venv),
                "NO_PROXY": "*", "no_proxy": "*",
                # pip's bytecode pass (half the install time here): the same files are installed, and the few
                # modules the section imports compile on first import instead
                "PIP_COMPILE": "false"})
    for line in install_lines():
        done = subprocess.run(["bash", "-c", line], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=600)
        assert done.returncode == 0, f"{line}:\n{done.stdout[-3000:]}"
    return env


def test_the_serving_section_runs_as_written(tiny_artifact, tools, tmp_path):
    from ettin_runtime import Reranker

    server_env_or_skip()
    if shutil.which("curl") is None:
        pytest.skip("the section's requests are curl commands; curl is not installed here")
    work = tmp_path / "user"
    shutil.copytree(tiny_artifact, work / "artifacts" / "17m-random-cpu")
    (work / "scripts").symlink_to(REPO / "scripts")
    ports = {str(p): harness.free_port() for p in (8000, 8001, 8080)}
    process = subprocess.Popen(["bash", "-c", script(ports)], cwd=work, env=tools, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out = ""
    try:
        out, _ = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        pass
    finally:
        # The shell may be gone while a gateway it started in the background still holds its stdout:
        # end the whole group (its own session) either way.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        if not out:
            out = process.communicate()[0]
        state = work / "triton.json"
        if state.exists():
            handle = harness.ServerHandle.from_state(state)
            if handle.is_alive():
                handle.stop()
                pytest.fail(f"the section left its Triton server running:\n{out[-5000:]}")
    assert process.returncode == 0, out[-5000:]

    query = "what is triton?"
    with Reranker.load(tiny_artifact) as local:
        curl_docs = ["Triton serves models.", "Cats sleep."]
        raw = local.predict([(query, d) for d in curl_docs])
        sigmoid = local.predict([(query, d) for d in curl_docs], activation="sigmoid")
        expected_rank = local.rank(query, ["Triton serves models.", "Cats sleep a lot."], top_k=1)

    v1 = json.loads(next(line for line in out.splitlines() if line.startswith('{"id"')))
    (result,) = v1["results"]
    assert result["index"] == int(np.argmax(raw))
    assert abs(result["relevance_score"] - float(sigmoid[result["index"]])) <= TOLERANCE
    ranked = next(line for line in out.splitlines() if line.startswith("[{'corpus_id'"))
    corpus_id, score = re.fullmatch(r"\[\{'corpus_id': (\d+), 'score': (?:np\.float32\()?([-\d.e]+)\)?\}\]",
                                    ranked).groups()
    assert int(corpus_id) == expected_rank[0]["corpus_id"]
    assert abs(float(score) - expected_rank[0]["score"]) <= TOLERANCE
    tei = json.loads(next(line for line in out.splitlines() if line.startswith('[{"index"')))
    assert [r["index"] for r in tei] == np.argsort(-raw, kind="stable").tolist()
    np.testing.assert_allclose([r["score"] for r in tei], sigmoid[[r["index"] for r in tei]], rtol=0, atol=TOLERANCE)
    # `stop` said the server exited, and nothing listens on the section's ports any more.
    assert '"exited": true' in out
    for port in ports.values():
        with pytest.raises(OSError):
            import socket

            socket.create_connection(("127.0.0.1", port), timeout=1).close()
