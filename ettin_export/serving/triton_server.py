"""Start and stop a real Triton Inference Server (python backend only) on a CPU-only Linux box.

The server runs from the environment that triton_env.py builds; processes.py stops it and what it
leaves behind (stubs, shared memory). The command line is `ettin-export triton-server` (also
scripts/triton_server.py):
    ettin-export triton-server setup  [--env DIR] [--python PY] [--force]
    ettin-export triton-server start  --repo MODEL_REPOSITORY [--env DIR] [--http-port N ...]
                                      [--log FILE] [--state FILE] [--timeout S]
    ettin-export triton-server status --state FILE | --pid PID
    ettin-export triton-server stop   --state FILE | --pid PID [--grace S]

From Python (pytest fixtures):
    env = triton_env.ensure_env()           # creates or reuses the env; raises EnvSetupError
    with start_server(repo, env) as server:  # raises ServerStartError, never leaves a server behind
        tritonclient.http.InferenceServerClient(server.http_address)
        tritonclient.grpc.InferenceServerClient(server.grpc_url)
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ettin_export.serving.errors import ServerStartError, TritonHarnessError
from ettin_export.serving import processes
from ettin_export.serving.triton_env import ServerEnv, ensure_env, progress
from ettin_export.serving.triton_stats import ModelStats

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

    # Where it listens. host:port (no scheme) is what tritonclient's InferenceServerClient(url=...) expects,
    # HTTP and gRPC alike.
    http_address = property(lambda self: f"{LOOPBACK}:{self.http_port}")
    grpc_url = property(lambda self: f"{LOOPBACK}:{self.grpc_port}")
    http_url = property(lambda self: f"http://{self.http_address}")
    metrics_url = property(lambda self: f"http://{LOOPBACK}:{self.metrics_port}/metrics")

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

    def detach(self) -> None:
        """Let the server outlive this process: from now on it is known by pid and start time only."""
        self._popen = None

    def is_alive(self) -> bool:
        if self._popen is not None:
            return self._popen.poll() is None
        return processes.is_alive(self.pid, self.start_time)

    def is_ready(self) -> bool:
        with contextlib.suppress(OSError):
            return _http("GET", f"{self.http_url}/v2/health/ready", timeout=1.0)[0] == 200
        return False

    def _json(self, method: str, path: str, body: bytes | None = None):
        status, answer = _http(method, self.http_url + path, body, timeout=30.0)
        if status != 200:
            raise TritonHarnessError(f"{method} {path} answered {status}: {answer[:500]!r}")
        return json.loads(answer)

    def models(self) -> list[dict]:
        """The repository index: [{name, version, state, reason}]."""
        return self._json("POST", "/v2/repository/index", b"{}")

    def model_stats(self, model: str) -> ModelStats:
        """One model's counters since the server started (Triton's statistics extension)."""
        (stats,) = self._json("GET", f"/v2/models/{urllib.parse.quote(model)}/stats")["model_stats"]
        return ModelStats.from_json(stats)

    def model_processes(self) -> dict[str, list[int]]:
        """{model name: its stub pids, "tritonserver": [the server]}: a python-backend stub's command line
        names its model file, <repository>/<model>/<version>/model.py."""
        models: dict[str, list[int]] = {"tritonserver": [self.pid]}
        for pid in processes.descendants(self.pid):
            arguments = processes.command_line(pid) or []
            if len(arguments) > 1 and Path(arguments[1]).name == "model.py":
                models.setdefault(Path(arguments[1]).parent.parent.name, []).append(pid)
        return models

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def stop(self, grace: float = 15.0) -> dict:
        report = processes.stop_server(self.pid, start_time=self.start_time, shm_prefix=self.shm_prefix,
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
        shm_prefix = f"{processes.SHM_BASE_PREFIX}ettin_{token}_{attempt}_"
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
                              env_dir=str(env.env_dir), start_time=processes.process_start_time(popen.pid),
                              shm_prefix=shm_prefix, _popen=popen)
        progress(f"started pid {popen.pid}, log {log_path}", quiet)
        try:
            handle.write_state()  # before waiting: `stop --state` works even if this command is killed
            _wait_ready(handle, timeout, require_models_ready)
        except ServerStartError as exc:
            handle.stop(grace=5.0)
            port_taken = "address already in use" in handle.log_tail(60).lower()
            if auto_ports and port_taken and attempt < 2:
                progress(f"a port was taken before the server bound it; retrying ({exc})", quiet)
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
