"""The server environment for a real Triton Inference Server (python backend only) on a CPU-only Linux box.

The server is the `tritonserver` 2.51 binary (branch r24.10) shipped in the `nvidia-pytriton` 0.7.0
wheel. It runs from a dedicated virtual environment (default `<repo>/.triton-env`) that also serves as
the python-backend stub's interpreter, so the packages our python-backend models import (numpy<2,
tokenizers, onnxruntime) live there, apart from the development venv (numpy 2, torch).
`ensure_env()` creates or reuses it (raises EnvSetupError); triton_server.py starts servers from it.

Why the environment looks the way it does (docs/shared reference "triton-serving.md" section 1):
- LD_LIBRARY_PATH starts with the interpreter's LIBDIR: the stub links `libpython3.X.so.1.0` and would
  otherwise pick the OS copy, whose patch level differs from the venv's stdlib (`_recursion_count`).
- then `<site-packages>/nvidia_pytriton.libs`: the stub's RPATH is relative to the wheel layout.
- PATH starts with the venv's `bin`: the stub derives `sys.prefix`, hence numpy, from the first
  `python3` on PATH. With numpy 2 the 24.10 stub silently corrupts tensors (pybind11 2.10).
- PYTHONPATH / PYTHONHOME / user site-packages are removed for the same reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ettin_export.serving.errors import EnvSetupError

ENV_VAR = "ETTIN_TRITON_ENV"


def _default_env_location() -> Path:
    """`<checkout>/.triton-env` when this package runs from a source checkout (the tests, CI), else a
    per-user cache folder."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "ettin_export").is_dir():
        return checkout / ".triton-env"
    return Path.home() / ".cache" / "ettin-export" / "triton-env"


DEFAULT_ENV_DIR = _default_env_location()

PYTRITON_REQUIREMENT = "nvidia-pytriton==0.7.0"
# What python-backend models import inside the stub. onnxruntime 1.32.0 is the newest release and
# still accepts numpy 1.x (Requires-Dist numpy>=1.21.6; checked with numpy 1.26.4 on CPython 3.11).
# OpenVINO + onnx: the engine model of an OpenVINO artifact (fp32 / bf16) runs there too.
STUB_REQUIREMENTS = ("numpy<2", "onnxruntime==1.32.0", "tokenizers>=0.20,<1", "openvino==2026.4.1", "onnx>=1.17")
STUB_IMPORTS = ("numpy", "onnxruntime", "tokenizers", "openvino", "onnx")
STUB_PYTHON_VERSIONS = ("3.8", "3.9", "3.10", "3.11", "3.12", "3.13")  # stubs shipped in the wheel

MARKER_NAME = "ettin-triton-env.json"
MARKER_FORMAT = 1


def progress(message: str, quiet: bool) -> None:
    """A progress line on standard error (setup and start are slow enough to want them)."""
    if not quiet:
        print(f"[triton_server] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ServerEnv:
    """A ready server environment: where the binary, the backends and the stub's Python are."""

    env_dir: Path
    python: Path  # the venv's interpreter (the stub's sys.prefix)
    python_version: str  # "3.11"
    libdir: Path  # the base interpreter's LIBDIR, holding libpython3.X.so.1.0
    site_packages: Path

    @property
    def tritonserver(self) -> Path:
        return self.site_packages / "pytriton" / "tritonserver" / "bin" / "tritonserver"

    @property
    def libs_dir(self) -> Path:
        return self.site_packages / "nvidia_pytriton.libs"

    @property
    def backend_dir(self) -> Path:
        return self.env_dir / "backends"

    @property
    def cache_dir(self) -> Path:
        return self.site_packages / "pytriton" / "tritonserver" / "caches"

    def environ(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The process environment for `tritonserver` and, through it, the python-backend stubs."""
        env = dict(os.environ if base is None else base)
        for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONEXECUTABLE", "__PYVENV_LAUNCHER__"):
            env.pop(name, None)
        env["PYTHONNOUSERSITE"] = "1"  # a numpy 2 in ~/.local must not reach the stub
        env["VIRTUAL_ENV"] = str(self.env_dir)
        env["PATH"] = os.pathsep.join([str(self.env_dir / "bin"), env.get("PATH", os.defpath)])
        ld_path = [str(self.libdir), str(self.libs_dir)]
        if env.get("LD_LIBRARY_PATH"):
            ld_path.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(ld_path)
        return env

    def to_json(self) -> dict:
        data = {k: str(v) for k, v in asdict(self).items()}
        data.update(tritonserver=str(self.tritonserver), backend_dir=str(self.backend_dir))
        return data


def default_env_dir() -> Path:
    """`$ETTIN_TRITON_ENV` if set, else DEFAULT_ENV_DIR."""
    return Path(os.environ[ENV_VAR]).expanduser().resolve() if os.environ.get(ENV_VAR) else DEFAULT_ENV_DIR


def _base_interpreter() -> Path:
    """The interpreter behind the running one (a venv's python resolves to its base installation)."""
    return Path(getattr(sys, "_base_executable", None) or sys.executable)


_PROBE = (
    "import json, sys, sysconfig; v = sysconfig.get_config_var; "
    "print(json.dumps({'version': '%d.%d' % sys.version_info[:2], 'full_version': sys.version.split()[0], "
    "'shared': v('Py_ENABLE_SHARED'), 'libdir': v('LIBDIR'), 'soname': v('INSTSONAME'), "
    "'purelib': sysconfig.get_paths()['purelib'], 'prefix': sys.prefix, 'base_prefix': sys.base_prefix}))"
)


def _probe_interpreter(python: Path) -> dict:
    try:
        out = subprocess.run([str(python), "-I", "-c", _PROBE], capture_output=True, text=True, check=True, timeout=60)
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        detail = getattr(exc, "stderr", "") or exc
        raise EnvSetupError(f"Cannot run the interpreter {python}: {detail}") from exc
    return json.loads(out.stdout)


def _check_base_interpreter(python: Path) -> dict:
    info = _probe_interpreter(python)
    if not info["shared"]:
        raise EnvSetupError(
            f"{python} (Python {info['full_version']}) was built without a shared libpython "
            "(sysconfig Py_ENABLE_SHARED is 0), but the Triton python-backend stub links "
            f"libpython{info['version']}.so. Pass --python with an interpreter built with --enable-shared "
            "(pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install 3.11; uv and python.org builds "
            "are shared), or set it for ensure_env(python=...)."
        )
    if info["version"] not in STUB_PYTHON_VERSIONS:
        raise EnvSetupError(
            f"{python} is Python {info['version']}; {PYTRITON_REQUIREMENT} ships python-backend stubs only "
            f"for {', '.join(STUB_PYTHON_VERSIONS)}. Pass --python with one of those."
        )
    libpython = Path(info["libdir"]) / (info["soname"] or f"libpython{info['version']}.so.1.0")
    if not libpython.exists():
        raise EnvSetupError(
            f"{python} claims a shared libpython but {libpython} does not exist; the stub would load the "
            "OS copy instead. Use an interpreter whose LIBDIR holds its libpython."
        )
    return info


def _marker(info: dict) -> dict:
    return {
        "format": MARKER_FORMAT,
        "pytriton": PYTRITON_REQUIREMENT,
        "requirements": list(STUB_REQUIREMENTS),
        "python_version": info["version"],
        "python_full_version": info["full_version"],
        "libdir": info["libdir"],
        "site_packages": info["purelib"],
    }


def _env_from_marker(env_dir: Path, marker: dict) -> ServerEnv:
    return ServerEnv(
        env_dir=env_dir,
        python=env_dir / "bin" / "python",
        python_version=marker["python_version"],
        libdir=Path(marker["libdir"]),
        site_packages=Path(marker["site_packages"]),
    )


def _complete_env(env_dir: Path) -> ServerEnv | None:
    """The env described by its marker, if the marker matches today's requirements and files exist."""
    try:
        marker = json.loads((env_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    expected_keys = {"format": MARKER_FORMAT, "pytriton": PYTRITON_REQUIREMENT, "requirements": list(STUB_REQUIREMENTS)}
    if any(marker.get(k) != v for k, v in expected_keys.items()):
        return None
    env = _env_from_marker(env_dir, marker)
    needed = [
        env.python,
        env.tritonserver,
        env.backend_dir / "python" / "libtriton_python.so",
        env.backend_dir / "python" / "triton_python_backend_stub",
        env.backend_dir / "python" / "triton_python_backend_utils.py",
        env.libdir / f"libpython{env.python_version}.so.1.0",
    ]
    return env if all(p.exists() for p in needed) else None


def _pip(env_python: Path, args: list[str], what: str) -> None:
    cmd = [str(env_python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "-q", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise EnvSetupError(
            f"Installing {what} into the Triton server env failed (pip exit code {proc.returncode}).\n"
            f"Command: {' '.join(cmd)}\n{tail}\n"
            "The setup needs PyPI (or PIP_INDEX_URL / PIP_FIND_LINKS holding these wheels). "
            "Fix the cause and rerun `python scripts/triton_server.py setup`."
        )


def _build_backend_dir(env: ServerEnv) -> None:
    """`<env>/backends/python/` = the wheel's python backend + the stub for this interpreter's 3.X."""
    src = env.site_packages / "pytriton" / "tritonserver"
    stub = src / "python_backend_stubs" / env.python_version / "triton_python_backend_stub"
    dst = env.backend_dir / "python"
    dst.mkdir(parents=True, exist_ok=True)
    for source in (src / "backends" / "python" / "libtriton_python.so",
                   src / "backends" / "python" / "triton_python_backend_utils.py", stub):
        if not source.exists():
            raise EnvSetupError(f"{PYTRITON_REQUIREMENT} is installed but {source} is missing; "
                                "rerun setup with --force.")
        # Copies, not links: the stub's RPATH is relative to its own location either way (we set
        # LD_LIBRARY_PATH), and a copy survives a reinstall of the wheel underneath.
        tmp = dst / (source.name + ".tmp")
        shutil.copy2(source, tmp)
        os.replace(tmp, dst / source.name)


def _check_env(env: ServerEnv) -> None:
    """Fail at setup, not at the first request: the stub's libraries and its Python packages."""
    environ = env.environ()
    stub = env.backend_dir / "python" / "triton_python_backend_stub"
    if shutil.which("ldd"):
        for binary in (env.tritonserver, stub):
            out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=environ).stdout
            missing = [line.strip() for line in out.splitlines() if "not found" in line]
            if missing:
                raise EnvSetupError(f"{binary} has unresolved libraries with the server environment: {missing}")
            if binary == stub:
                libpython = next((line for line in out.splitlines() if "libpython" in line), "")
                if str(env.libdir) not in libpython:
                    raise EnvSetupError(
                        f"The stub resolves libpython to {libpython.strip()!r}, not to {env.libdir}; "
                        "the stdlib and libpython patch levels would differ."
                    )
    code = (
        "import sys, numpy, onnxruntime, tokenizers; "
        "assert int(numpy.__version__.split('.')[0]) < 2, 'numpy ' + numpy.__version__; "
        "print(sys.prefix, numpy.__version__, onnxruntime.__version__, tokenizers.__version__)"
    )
    proc = subprocess.run(["python3", "-c", code], capture_output=True, text=True, env=environ)
    if proc.returncode != 0:
        raise EnvSetupError(f"The stub's Python (first python3 on the server PATH) cannot import "
                            f"{STUB_IMPORTS}:\n{proc.stderr[-2000:]}")
    prefix = proc.stdout.split()[0]
    if Path(prefix).resolve() != env.env_dir.resolve():
        raise EnvSetupError(f"python3 on the server PATH has sys.prefix {prefix}, expected the env {env.env_dir}.")


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock, so that two test sessions do not build the same env at once."""
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_env(env_dir: str | Path | None = None, *, python: str | Path | None = None,
               force: bool = False, quiet: bool = True) -> ServerEnv:
    """Create, complete or reuse the server environment; returns it ready to start servers.

    Reuse is decided by a marker file written last, which records the requirements: a complete env
    costs only a few `stat` calls. Changing STUB_REQUIREMENTS re-runs pip in place.
    """
    env_dir = Path(env_dir).expanduser().resolve() if env_dir else default_env_dir()
    if not force and (env := _complete_env(env_dir)):
        return env
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        raise EnvSetupError(f"{PYTRITON_REQUIREMENT} ships the server for x86_64 Linux only "
                            f"(this is {sys.platform}/{os.uname().machine}).")
    env_dir.mkdir(parents=True, exist_ok=True)
    with _locked(env_dir / ".setup.lock"):
        if not force and (env := _complete_env(env_dir)):  # built by someone else while we waited
            return env
        started = time.perf_counter()
        (env_dir / MARKER_NAME).unlink(missing_ok=True)
        if force:
            for name in ("bin", "lib", "lib64", "include", "share", "backends", "pyvenv.cfg"):
                target = env_dir / name
                if target.is_symlink() or target.is_file():
                    target.unlink()
                elif target.exists():
                    shutil.rmtree(target)
        base = Path(python) if python else _base_interpreter()
        base_info = _check_base_interpreter(base)
        env_python = env_dir / "bin" / "python"
        if not env_python.exists():
            progress(f"creating venv {env_dir} from {base} (Python {base_info['full_version']})", quiet)
            proc = subprocess.run([str(base), "-m", "venv", str(env_dir)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise EnvSetupError(f"`{base} -m venv {env_dir}` failed:\n{proc.stderr[-2000:]}")
        info = _probe_interpreter(env_python)
        if info["version"] != base_info["version"] and python:
            raise EnvSetupError(f"{env_dir} holds Python {info['version']}, not {base_info['version']}; "
                                "use --force to rebuild it.")
        _check_base_interpreter(env_python)  # the venv must resolve to a shared-libpython base, too
        progress(f"installing {', '.join(STUB_REQUIREMENTS)}", quiet)
        _pip(env_python, list(STUB_REQUIREMENTS), "the stub's packages")
        # Without its dependencies: the server needs only the wheel's binaries, and pytriton's own
        # requirements (tritonclient, grpcio, protobuf, pyzmq, ...) belong to clients, not to the stub.
        progress(f"installing {PYTRITON_REQUIREMENT} (server binary)", quiet)
        _pip(env_python, ["--no-deps", PYTRITON_REQUIREMENT], PYTRITON_REQUIREMENT)
        marker = _marker(info)
        env = _env_from_marker(env_dir, marker)
        _build_backend_dir(env)
        _check_env(env)
        marker["setup_seconds"] = round(time.perf_counter() - started, 1)
        tmp = env_dir / (MARKER_NAME + ".tmp")
        tmp.write_text(json.dumps(marker, indent=2) + "\n")
        os.replace(tmp, env_dir / MARKER_NAME)
        progress(f"env ready in {marker['setup_seconds']} s: {env_dir}", quiet)
        return env

