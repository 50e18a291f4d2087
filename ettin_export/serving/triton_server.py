#!/usr/bin/env python3
"""Start and stop a real Triton Inference Server (python backend only) on a CPU-only Linux box.

The server is the `tritonserver` 2.51 binary (branch r24.10) shipped in the `nvidia-pytriton` 0.7.0
wheel. It runs from a dedicated virtual environment (default `<repo>/.triton-env`) that also serves as
the python-backend stub's interpreter, so the packages our python-backend models import (numpy<2,
tokenizers, onnxruntime) live there, apart from the development venv (numpy 2, torch).

Command line (scripts/triton_server.py, or python -m ettin_export.serving.triton_server):
    python scripts/triton_server.py setup  [--env DIR] [--python PY] [--force]
    python scripts/triton_server.py start  --repo MODEL_REPOSITORY [--env DIR] [--http-port N ...]
                                           [--log FILE] [--state FILE] [--timeout S]
    python scripts/triton_server.py status --state FILE | --pid PID
    python scripts/triton_server.py stop   --state FILE | --pid PID [--grace S]

From Python (pytest fixtures):
    env = ensure_env()                      # creates or reuses the env; raises EnvSetupError
    with start_server(repo, env) as server:  # raises ServerStartError, never leaves a server behind
        tritonclient.http.InferenceServerClient(server.http_address)
        tritonclient.grpc.InferenceServerClient(server.grpc_url)

Why the environment looks the way it does (docs/shared reference "triton-serving.md" section 1):
- LD_LIBRARY_PATH starts with the interpreter's LIBDIR: the stub links `libpython3.X.so.1.0` and would
  otherwise pick the OS copy, whose patch level differs from the venv's stdlib (`_recursion_count`).
- then `<site-packages>/nvidia_pytriton.libs`: the stub's RPATH is relative to the wheel layout.
- PATH starts with the venv's `bin`: the stub derives `sys.prefix`, hence numpy, from the first
  `python3` on PATH. With numpy 2 the 24.10 stub silently corrupts tensors (pybind11 2.10).
- PYTHONPATH / PYTHONHOME / user site-packages are removed for the same reason.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ettin_runtime.errors import EttinError

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
SHM_DIR = Path("/dev/shm")
SHM_BASE_PREFIX = "triton_python_backend_shm_region_"
LOOPBACK = "127.0.0.1"

# For `tritonclient.grpc.InferenceServerClient(url, channel_args=GRPC_LOOPBACK_CHANNEL_ARGS)`: gRPC honours
# http_proxy even for 127.0.0.1 (the HTTP client does not). Passing channel_args replaces tritonclient's
# defaults, so its unlimited message sizes are restated here.
GRPC_LOOPBACK_CHANNEL_ARGS = [
    ("grpc.enable_http_proxy", 0),
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
]

# Appended to every server command line. The defaults in the reference are the only ones needed;
# pinned memory is turned off because there is no CUDA driver to pin with (saves a warning per start).
SERVER_FLAGS = (
    "--allow-gpu-metrics=false",
    "--model-control-mode=none",
    "--exit-on-error=false",
    "--strict-readiness=false",
    "--exit-timeout-secs=5",
    "--pinned-memory-pool-byte-size=0",
)


class TritonHarnessError(EttinError, RuntimeError):
    """Base class: every message says what went wrong and what to do."""


class EnvSetupError(TritonHarnessError):
    """The server environment cannot be created here (no shared libpython, no PyPI, ...)."""


class ServerStartError(TritonHarnessError):
    """The server exited early, did not become ready in time, or a model failed to load."""


def _log(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"[triton_server] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# The environment
# --------------------------------------------------------------------------------------------------


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
            _log(f"creating venv {env_dir} from {base} (Python {base_info['full_version']})", quiet)
            proc = subprocess.run([str(base), "-m", "venv", str(env_dir)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise EnvSetupError(f"`{base} -m venv {env_dir}` failed:\n{proc.stderr[-2000:]}")
        info = _probe_interpreter(env_python)
        if info["version"] != base_info["version"] and python:
            raise EnvSetupError(f"{env_dir} holds Python {info['version']}, not {base_info['version']}; "
                                "use --force to rebuild it.")
        _check_base_interpreter(env_python)  # the venv must resolve to a shared-libpython base, too
        _log(f"installing {', '.join(STUB_REQUIREMENTS)}", quiet)
        _pip(env_python, list(STUB_REQUIREMENTS), "the stub's packages")
        # Without its dependencies: the server needs only the wheel's binaries, and pytriton's own
        # requirements (tritonclient, grpcio, protobuf, pyzmq, ...) belong to clients, not to the stub.
        _log(f"installing {PYTRITON_REQUIREMENT} (server binary)", quiet)
        _pip(env_python, ["--no-deps", PYTRITON_REQUIREMENT], PYTRITON_REQUIREMENT)
        marker = _marker(info)
        env = _env_from_marker(env_dir, marker)
        _build_backend_dir(env)
        _check_env(env)
        marker["setup_seconds"] = round(time.perf_counter() - started, 1)
        tmp = env_dir / (MARKER_NAME + ".tmp")
        tmp.write_text(json.dumps(marker, indent=2) + "\n")
        os.replace(tmp, env_dir / MARKER_NAME)
        _log(f"env ready in {marker['setup_seconds']} s: {env_dir}", quiet)
        return env


# --------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------


def _proc_start_time(pid: int) -> int | None:
    """Start time in clock ticks since boot (/proc/PID/stat field 22): tells a pid from its reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _proc_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _alive(pid: int, start_time: int | None = None) -> bool:
    """Running (not a zombie) and, when given, still the process that started at `start_time`."""
    state = _proc_state(pid)
    if state is None or state in ("Z", "X"):
        return False
    return start_time is None or _proc_start_time(pid) == start_time


def _descendants(pid: int) -> dict[int, int | None]:
    """pid -> start time of every live descendant (the python-backend stubs)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = {}, list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found[child] = _proc_start_time(child)
        todo.extend(children.get(child, []))
    return found


def _mapped_shm(pids) -> set[Path]:
    """The /dev/shm files that these processes have mapped: proof that a region is theirs."""
    regions = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                path = line.split(maxsplit=5)[5] if len(line.split(maxsplit=5)) == 6 else ""
                path = path.removesuffix(" (deleted)")
                if path.startswith(f"{SHM_DIR}/{SHM_BASE_PREFIX}"):
                    regions.add(Path(path))
    return regions


def _wait_exit(pid: int, start_time: int | None, timeout: float, popen: subprocess.Popen | None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen is not None:
            if popen.poll() is not None:
                return True
        elif not _alive(pid, start_time):
            return True
        time.sleep(0.05)
    return popen.poll() is not None if popen is not None else not _alive(pid, start_time)


def stop_server(pid: int, *, start_time: int | None = None, shm_prefix: str | None = None,
                grace: float = 15.0, popen: subprocess.Popen | None = None) -> dict:
    """SIGTERM to `pid` only, SIGKILL after `grace` s; then make sure its stubs and shm regions are gone.

    Stubs are killed only when they are descendants recorded before the signal (same start time), and
    shm regions are removed only when they carry this server's unique prefix or were mapped by it.
    Returns a report (JSON-able).
    """
    report: dict = {"pid": pid, "was_running": _alive(pid, start_time), "signal": None,
                    "stubs_killed": [], "shm_removed": [], "shm_left": []}
    if report["was_running"]:
        try:
            program = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            program = ""
        if Path(program).name != "tritonserver":
            raise TritonHarnessError(f"pid {pid} runs {program or 'something unreadable'}, not tritonserver; "
                                     "not signalling it.")
    if not report["was_running"]:
        if start_time is not None and _alive(pid):
            report["note"] = f"pid {pid} is now a different process (start time differs); not signalled"
        if popen is not None:
            popen.poll()
    else:
        stubs = _descendants(pid)
        owned_shm = _mapped_shm([pid, *stubs])
        try:
            os.kill(pid, signal.SIGTERM)
        except PermissionError as exc:
            raise TritonHarnessError(f"Not permitted to signal tritonserver pid {pid} "
                                     f"(another user's server?): {exc}") from exc
        report["signal"] = "SIGTERM"
        if not _wait_exit(pid, start_time, grace, popen):
            os.kill(pid, signal.SIGKILL)
            report["signal"] = "SIGKILL"
            _wait_exit(pid, start_time, 10.0, popen)
        for stub, stub_start in stubs.items():  # a stub outlives a SIGKILLed server for a while
            if not _wait_exit(stub, stub_start, 3.0, None):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(stub, signal.SIGKILL)
                report["stubs_killed"].append(stub)
        report["shm_owned_at_stop"] = sorted(map(str, owned_shm))
        if shm_prefix:
            owned_shm |= set(SHM_DIR.glob(shm_prefix + "*"))
        for region in sorted(owned_shm):
            if region.exists():
                region.unlink(missing_ok=True)
                report["shm_removed"].append(str(region))
    report["exited"] = not _alive(pid, start_time)
    leftovers = sorted(SHM_DIR.glob(SHM_BASE_PREFIX + "*")) if SHM_DIR.is_dir() else []
    report["shm_left"] = [str(p) for p in leftovers]  # other servers' regions: reported, never touched
    return report


# --------------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


# Loopback only: an http_proxy in the environment must not see (or swallow) our health checks.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http(method: str, url: str, body: bytes | None = None, timeout: float = 2.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with _NO_PROXY_OPENER.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def log_tail(path: str | Path, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


@dataclass
class ServerHandle:
    """A started server. `stop()` (or leaving the `with` block) ends it and only it."""

    pid: int
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: str
    state_path: str | None
    model_repository: str
    env_dir: str
    start_time: int | None  # /proc start ticks: guards against pid reuse
    shm_prefix: str
    startup_seconds: float | None = None
    _popen: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    @property
    def http_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def http_address(self) -> str:
        """host:port, what `tritonclient.http.InferenceServerClient(url=...)` expects (no scheme)."""
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """host:port, what `tritonclient.grpc.InferenceServerClient(url=...)` expects."""
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    def to_json(self) -> dict:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__ if not name.startswith("_")}
        data.update(http_url=self.http_url, http_address=self.http_address, grpc_url=self.grpc_url,
                    metrics_url=self.metrics_url)
        return data

    @classmethod
    def from_state(cls, path: str | Path) -> ServerHandle:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise TritonHarnessError(f"Cannot read the server state file {path}: {exc}") from exc
        names = {f.name for f in cls.__dataclass_fields__.values() if not f.name.startswith("_")}
        return cls(**{k: v for k, v in data.items() if k in names})

    def write_state(self) -> None:
        if self.state_path:
            tmp = Path(self.state_path + ".tmp")
            tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
            os.replace(tmp, self.state_path)

    def is_alive(self) -> bool:
        if self._popen is not None:
            return self._popen.poll() is None
        return _alive(self.pid, self.start_time)

    def is_ready(self) -> bool:
        with contextlib.suppress(OSError):
            return _http("GET", f"{self.http_url}/v2/health/ready", timeout=1.0)[0] == 200
        return False

    def models(self) -> list[dict]:
        """The repository index: [{name, version, state, reason}]."""
        status, body = _http("POST", f"{self.http_url}/v2/repository/index", b"{}")
        if status != 200:
            raise TritonHarnessError(f"POST /v2/repository/index answered {status}: {body[:500]!r}")
        return json.loads(body)

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def stop(self, grace: float = 15.0) -> dict:
        report = stop_server(self.pid, start_time=self.start_time, shm_prefix=self.shm_prefix,
                             grace=grace, popen=self._popen)
        if self.state_path:
            Path(self.state_path).unlink(missing_ok=True)
        return report

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _set_parent_death_signal() -> None:  # runs in the child between fork and exec
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def server_command(env: ServerEnv, repo: Path, http_port: int, grpc_port: int, metrics_port: int,
                   shm_prefix: str, log_verbose: int = 0, extra_args=()) -> list[str]:
    return [
        str(env.tritonserver),
        f"--model-repository={repo}",
        f"--backend-directory={env.backend_dir}",
        f"--cache-directory={env.cache_dir}",
        f"--http-address={LOOPBACK}", f"--http-port={http_port}",
        f"--grpc-address={LOOPBACK}", f"--grpc-port={grpc_port}",
        f"--metrics-address={LOOPBACK}", f"--metrics-port={metrics_port}",
        *SERVER_FLAGS,
        f"--log-verbose={log_verbose}",
        # A per-server prefix makes this server's shared-memory regions recognisable at stop time.
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
        *extra_args,
    ]


def start_server(repo: str | Path, env: ServerEnv | None = None, *, http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None,
                 log_path: str | Path | None = None, state_path: str | Path | None = None,
                 timeout: float = 60.0, log_verbose: int = 0, extra_args=(),
                 require_models_ready: bool = True, die_with_parent: bool = False,
                 quiet: bool = True) -> ServerHandle:
    """Launch `tritonserver` on `repo` and wait until it is ready; never leaves a failed server behind.

    Ports left as None are picked free on 127.0.0.1 (retried when another process takes one first).
    With `require_models_ready`, a model that failed to load fails the start with its reason.
    `die_with_parent` sends the server SIGTERM when the calling *thread* ends (prctl PDEATHSIG): use it
    from test fixtures, so that a killed pytest does not leave servers behind.
    """
    env = env or ensure_env(quiet=quiet)
    repo = Path(repo).expanduser().resolve()
    if not repo.is_dir():
        raise ServerStartError(f"The model repository {repo} is not a directory.")
    token = f"{os.getpid()}_{secrets.token_hex(4)}"
    if log_path is None:
        runs = env.env_dir / "runs"
        runs.mkdir(exist_ok=True)
        log_path = runs / f"triton-{time.strftime('%Y%m%d-%H%M%S')}-{token}.log"
    log_path = Path(log_path).expanduser().resolve()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if state_path is None:
        state_path = log_path.with_suffix(".state.json")
    state_path = Path(state_path).expanduser().resolve()
    state_path.parent.mkdir(parents=True, exist_ok=True)
    auto_ports = http_port is None or grpc_port is None or metrics_port is None
    environ = env.environ()

    for attempt in range(3 if auto_ports else 1):
        ports = [p or free_port() for p in (http_port, grpc_port, metrics_port)]
        while len(set(ports)) < 3:
            ports = [p or free_port() for p in (http_port, grpc_port, metrics_port)]
        shm_prefix = f"{SHM_BASE_PREFIX}ettin_{token}_{attempt}_"
        cmd = server_command(env, repo, *ports, shm_prefix, log_verbose, extra_args)
        started = time.monotonic()
        with open(log_path, "ab") as log:
            log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
            log.flush()
            popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     env=environ, cwd=str(repo), start_new_session=True,
                                     preexec_fn=_set_parent_death_signal if die_with_parent else None)
        handle = ServerHandle(pid=popen.pid, http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2],
                              log_path=str(log_path), state_path=str(state_path), model_repository=str(repo),
                              env_dir=str(env.env_dir), start_time=_proc_start_time(popen.pid),
                              shm_prefix=shm_prefix, _popen=popen)
        _log(f"started pid {popen.pid}, log {log_path}", quiet)
        try:
            handle.write_state()  # before waiting: `stop --state` works even if this command is killed
            _wait_ready(handle, timeout, require_models_ready)
        except ServerStartError as exc:
            handle.stop(grace=5.0)
            port_taken = "address already in use" in handle.log_tail(60).lower()
            if auto_ports and port_taken and attempt < 2:
                _log(f"a port was taken before the server bound it; retrying ({exc})", quiet)
                continue
            raise
        except BaseException:  # KeyboardInterrupt while waiting: do not leave it running
            handle.stop(grace=5.0)
            raise
        handle.startup_seconds = round(time.monotonic() - started, 2)
        handle.write_state()
        return handle
    raise AssertionError("unreachable")


def _wait_ready(handle: ServerHandle, timeout: float, require_models_ready: bool) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not handle.is_alive():
            code = handle._popen.returncode if handle._popen else "?"
            raise ServerStartError(
                f"tritonserver (pid {handle.pid}) exited with code {code} before it was ready. "
                f"Last lines of {handle.log_path}:\n{handle.log_tail()}"
            )
        if handle.is_ready():
            break
        if time.monotonic() > deadline:
            raise ServerStartError(
                f"tritonserver (pid {handle.pid}) was not ready on {handle.http_url}/v2/health/ready after "
                f"{timeout:.0f} s; it was killed. Last lines of {handle.log_path}:\n{handle.log_tail()}"
            )
        time.sleep(0.1)
    if require_models_ready:
        # In model-control-mode none every model is loaded before the endpoints open, so the index is final.
        broken = [m for m in handle.models() if m.get("state") != "READY"]
        if broken:
            listing = "\n".join(f"  {m['name']} v{m.get('version', '?')}: {m.get('state')} {m.get('reason', '')}"
                                for m in broken)
            raise ServerStartError(
                f"tritonserver is up but {len(broken)} model(s) failed to load:\n{listing}\n"
                f"Last lines of {handle.log_path}:\n{handle.log_tail()}"
            )


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _handle_from_args(args) -> ServerHandle | int:
    if args.state:
        return ServerHandle.from_state(args.state)
    return args.pid


def _cmd_setup(args) -> int:
    started = time.perf_counter()
    env = ensure_env(args.env, python=args.python, force=args.force, quiet=False)
    print(json.dumps({**env.to_json(), "seconds": round(time.perf_counter() - started, 2)}, indent=2))
    return 0


def _cmd_start(args) -> int:
    env = ensure_env(args.env, quiet=False)
    handle = start_server(args.repo, env, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, log_path=args.log, state_path=args.state,
                          timeout=args.timeout, log_verbose=args.log_verbose, extra_args=args.server_arg,
                          require_models_ready=not args.allow_unavailable, quiet=False)
    handle._popen = None  # the server outlives this command; `stop --state` ends it
    print(json.dumps(handle.to_json(), indent=2))
    return 0


def _cmd_stop(args) -> int:
    target = _handle_from_args(args)
    if isinstance(target, ServerHandle):
        report = target.stop(grace=args.grace)
    else:
        report = stop_server(target, grace=args.grace)
    print(json.dumps(report, indent=2))
    return 0 if report["exited"] else 1


def _cmd_status(args) -> int:
    target = _handle_from_args(args)
    if isinstance(target, ServerHandle):
        status = {**target.to_json(), "alive": target.is_alive(), "ready": False}
        if status["alive"] and target.is_ready():
            status.update(ready=True, models=target.models())
    else:
        status = {"pid": target, "alive": _alive(target), "children": sorted(_descendants(target))}
    print(json.dumps(status, indent=2))
    return 0 if status["alive"] else 3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    env_help = f"server env directory (default: ${ENV_VAR} or {DEFAULT_ENV_DIR})"

    setup = sub.add_parser("setup", help="create or reuse the server environment")
    setup.add_argument("--env", help=env_help)
    setup.add_argument("--python", help="base interpreter with a shared libpython (default: the running one's base)")
    setup.add_argument("--force", action="store_true", help="rebuild even when complete")
    setup.set_defaults(func=_cmd_setup)

    start = sub.add_parser("start", help="start a server in the background; prints its ports as JSON")
    start.add_argument("--repo", required=True, help="model repository")
    start.add_argument("--env", help=env_help)
    for proto in ("http", "grpc", "metrics"):
        start.add_argument(f"--{proto}-port", type=int, help="default: a free port")
    start.add_argument("--log", help="server log (default: <env>/runs/triton-<time>-<id>.log)")
    start.add_argument("--state", help="state file (default: next to the log, .state.json)")
    start.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for readiness")
    start.add_argument("--log-verbose", type=int, default=0)
    start.add_argument("--allow-unavailable", action="store_true", help="start even if some models fail to load")
    start.add_argument("--server-arg", action="append", default=[],
                       help="extra tritonserver flag (repeatable), e.g. --server-arg=--model-load-thread-count=2")
    start.set_defaults(func=_cmd_start)

    for name, func, text in (("stop", _cmd_stop, "stop a server"), ("status", _cmd_status, "show a server")):
        cmd = sub.add_parser(name, help=text)
        target = cmd.add_mutually_exclusive_group(required=True)
        target.add_argument("--state", help="the state file that `start` wrote")
        target.add_argument("--pid", type=int, help="a tritonserver pid (no pid-reuse check)")
        if name == "stop":
            cmd.add_argument("--grace", type=float, default=15.0, help="seconds between SIGTERM and SIGKILL")
        cmd.set_defaults(func=func)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except TritonHarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
