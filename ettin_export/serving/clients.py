"""Clients of a serving stack on this machine, as the serving benchmark drives it from many threads:
scorers (query, documents) -> float32 scores in document order, one connection per thread, through Triton
gRPC (TritonReranker) or POST /v1/rerank; and the gateway (`ettin-export serve`) run as a child process."""

from __future__ import annotations

import contextlib
import http.client
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ettin_export.serving.errors import ServerStartError
from ettin_export.serving.triton_server import LOOPBACK, free_port


def triton_scorer(url: str, model: str):
    """(score, opened): `score` through a TritonReranker of its thread's own; `opened` lists them, to close."""
    from ettin_runtime.triton_client import TritonReranker

    local = threading.local()
    opened: list = []

    def score(query, documents):
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = TritonReranker(url, model, protocol="grpc")
            opened.append(client)
        return client.rerank(query, documents).scores

    return score, opened


def rerank_scorer(port: int):
    """`score` through POST /v1/rerank on 127.0.0.1:`port` (raw scores), a keep-alive connection per thread."""
    local = threading.local()

    def post(body: str):
        for attempt in (0, 1):  # the server closes idle keep-alive connections (uvicorn: after 5 s)
            connection = getattr(local, "connection", None)
            if connection is None:
                connection = local.connection = http.client.HTTPConnection(LOOPBACK, port, timeout=120)
            try:
                connection.request("POST", "/v1/rerank", body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                return response, response.read()
            except (ConnectionError, http.client.HTTPException):
                connection.close()
                local.connection = None
                if attempt:
                    raise

    def score(query, documents):
        response, raw = post(json.dumps({"query": query, "documents": documents, "raw_scores": True}))
        answer = json.loads(raw)
        if response.status != 200:
            raise RuntimeError(f"/v1/rerank answered {response.status}: {answer}")
        scores = np.empty(len(documents), dtype=np.float32)
        for result in answer["results"]:
            scores[result["index"]] = result["relevance_score"]
        return scores

    return score


@dataclass(frozen=True)
class Gateway:
    pid: int
    port: int

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"


@contextlib.contextmanager
def running_gateway(arguments: list[str], log_path: Path, timeout: float = 60.0):
    """`ettin-export serve ARGUMENTS --port FREE` in a subprocess, logging to `log_path`; yields a Gateway
    once GET /health answers 200, and ends the process (SIGTERM, then SIGKILL after 20 s) with the block."""
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "ettin_export.cli", "serve", *arguments, "--port", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(port):
            if process.poll() is not None:
                raise ServerStartError(f"the gateway exited with {process.returncode}:\n"
                                       f"{log_path.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                raise ServerStartError(f"the gateway was not healthy after {timeout:.0f} s:\n"
                                       f"{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        yield Gateway(process.pid, port)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _healthy(port: int) -> bool:
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=2)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()
