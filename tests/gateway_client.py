"""What the gateway tests share: start `ettin-export serve` as a user would, and a tiny HTTP client
(urllib, no proxy: the gateway runs on 127.0.0.1)."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from ettin_export.serving.triton_server import free_port

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def request(url: str, *, method: str = "GET", data: bytes | None = None, timeout: float = 60.0):
    """(status, parsed JSON body) of one request; errors are answers too."""
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with _OPENER.open(req, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def post(url: str, body, timeout: float = 60.0):
    """POST JSON; bytes go as they are, an iterator of bytes chunked (no Content-Length)."""
    data = body if isinstance(body, bytes) or hasattr(body, "__next__") else json.dumps(body).encode("utf-8")
    return request(url, method="POST", data=data, timeout=timeout)


@contextlib.contextmanager
def start_gateway(arguments: list[str], log_path: Path, timeout: float = 60.0):
    """`ettin-export serve ARGUMENTS --port FREE` in a subprocess; yields its base URL once /health is 200."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "ettin_export.cli", "serve", *arguments, "--port", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the gateway exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(OSError, ValueError):
                if request(url + "/health", timeout=2.0)[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway was not healthy after {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
