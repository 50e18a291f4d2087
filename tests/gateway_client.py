"""What the gateway tests share: start `ettin-export serve` as a user would, and a tiny HTTP client
(urllib, no proxy: the gateway runs on 127.0.0.1)."""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from pathlib import Path

from ettin_export.serving.clients import running_gateway

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
    """`ettin-export serve ARGUMENTS --port FREE` in a subprocess (the product's own runner, which
    bench-serving uses); yields its base URL once /health is 200, and stops it after the block."""
    with running_gateway(arguments, log_path, timeout) as gateway:
        yield gateway.url
