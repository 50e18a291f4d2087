"""A reranker served by Triton Inference Server (a repository from `ettin-export deploy triton`),
behind the same interface as the local runtimes:

    from ettin_runtime.triton_client import TritonReranker
    reranker = TritonReranker("localhost:8000", "ettin_reranker")            # or protocol="grpc", port 8001
    reranker.predict([("query", "doc a"), ("query", "doc b")])               # float32 raw scores, input order
    reranker.rank("query", ["doc a", "doc b"], top_k=1)                      # CrossEncoder.rank's dicts

The server tokenizes (the artifact's tokenizer, CrossEncoder's truncation), so `predict` sends the
pairs grouped by query, one reranker request per query (split into chunks of `batch_size` documents),
all in flight together, and puts the scores back in the caller's order; `rank` is `predict` plus the
same stable sort as every other runtime. `rerank` is the server's own call: scores and top-n indices.

Needs tritonclient (`pip install 'ettin-export[triton-client]'`), imported on first use. Safe to share
between threads: each thread gets its own connection (tritonclient's HTTP client is gevent-based and
must not cross threads).
"""

from __future__ import annotations

import functools
import ipaddress
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from .errors import MissingDependency, RuntimeRefused
from .packing import Pair, _split_pairs
from .reranker import Reranker, _check_batch_size, _check_pairs

PROTOCOLS = ("http", "grpc")
_MAX_MESSAGE = 2**31 - 1
# gRPC's default caps messages at 4 MiB; a request of many long documents is larger.
GRPC_CHANNEL_ARGS = (("grpc.max_send_message_length", _MAX_MESSAGE), ("grpc.max_receive_message_length", _MAX_MESSAGE))
INSTALL_HINT = "pip install 'ettin-export[triton-client]'  (or: pip install 'tritonclient[http,grpc]')"


class TritonRerankerError(RuntimeRefused):
    """The server refused or failed a request. `status`: the HTTP status ("400") or gRPC code name
    ("INVALID_ARGUMENT")."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RerankResult:
    scores: np.ndarray  # float32 [N], raw, document order
    top_indices: np.ndarray  # int32 [k], by descending score


def _import_client(protocol: str):
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}.")
    try:
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        from tritonclient.utils import InferenceServerException
    except ImportError as error:
        raise MissingDependency(f"TritonReranker over {protocol} needs tritonclient: {INSTALL_HINT}.") from error
    return module, InferenceServerException


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _split_url(url: str, protocol: str) -> tuple[str, bool]:
    """("host:port", ssl) from "host:port", "http://host:port", "https://...", "grpc://..."."""
    if "://" not in url:
        return url.rstrip("/"), False
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "grpc", "grpcs"):
        raise ValueError(f"url {url!r}: unknown scheme {parts.scheme!r}; use host:port (or http:// / https://).")
    if parts.path not in ("", "/"):
        raise ValueError(f"url {url!r}: give the server's address only (host:port), not a path.")
    return parts.netloc, parts.scheme in ("https", "grpcs")


class TritonReranker(Reranker):
    """`predict` / `rank` against a reranker model on a Triton server.

    Args:
        url: "host:port" (HTTP default port 8000, gRPC 8001), or with an http:// / https:// scheme.
        model: the reranker model's name (`deploy triton --name`, default "ettin_reranker").
        protocol: "http" or "grpc".
        batch_size: documents per request (the server accepts up to its `max_documents`).
        concurrency: requests in flight at once per `predict` call.
        timeout: seconds per request.
        channel_args: gRPC channel arguments (default: unlimited message sizes, no proxy for loopback).
    """

    def __init__(
        self,
        url: str,
        model: str = "ettin_reranker",
        protocol: str = "http",
        *,
        batch_size: int = 256,
        concurrency: int = 8,
        timeout: float = 120.0,
        headers: dict | None = None,
        channel_args: list | None = None,
    ):
        if not isinstance(url, str) or not url.strip():
            raise TypeError(f"url must be the server's 'host:port' (HTTP 8000 or gRPC 8001 by default), got {url!r}.")
        self._module, self._server_error = _import_client(protocol)
        self.url, self._ssl = _split_url(url, protocol)
        self.model = model
        self.protocol = protocol
        self.batch_size = max(1, int(batch_size))
        self.concurrency = max(1, int(concurrency))
        self.timeout = float(timeout)
        self.headers = headers
        host = self.url.rsplit(":", 1)[0] if ":" in self.url else self.url
        if channel_args is None and protocol == "grpc":
            channel_args = list(GRPC_CHANNEL_ARGS)
            if _is_loopback(host):  # gRPC would send even 127.0.0.1 through an http_proxy
                channel_args.append(("grpc.enable_http_proxy", 0))
        self._channel_args = channel_args
        self._local = threading.local()
        self._clients: list = []
        self._lock = threading.Lock()
        try:
            self._read_model_config()
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------------------------------------
    # Connection
    # ----------------------------------------------------------------------------------------------

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            if self.protocol == "grpc":
                client = self._module.InferenceServerClient(self.url, ssl=self._ssl, channel_args=self._channel_args)
            else:
                client = self._module.InferenceServerClient(
                    self.url, ssl=self._ssl, concurrency=self.concurrency,
                    connection_timeout=self.timeout, network_timeout=self.timeout,
                )
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def close(self) -> None:
        """Close every connection this object opened (in any thread)."""
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        self._local = threading.local()

    def _error(self, error, what: str) -> TritonRerankerError:
        status = error.status() if hasattr(error, "status") else None
        message = error.message() if hasattr(error, "message") else str(error)
        return TritonRerankerError(
            f"{what} ({self.protocol}://{self.url}, model {self.model!r}): {message}",
            str(status) if status is not None else None,
        )

    def _read_model_config(self) -> None:
        client = self._client()
        try:
            if self.protocol == "grpc":
                config = client.get_model_config(self.model, headers=self.headers, as_json=True,
                                                 client_timeout=self.timeout)["config"]
            else:
                config = client.get_model_config(self.model, headers=self.headers)
        except self._server_error as error:
            raise self._error(error, "cannot read the reranker model's configuration") from error
        except OSError as error:  # the HTTP client's refused or reset connection (gRPC's come as server errors)
            refused = self._error(error, "cannot read the reranker model's configuration")
            raise TritonRerankerError(
                f"{refused}. Is the server up, and is "
                f"{self.url} its {self.protocol.upper()} port (tritonserver's defaults: HTTP 8000, gRPC 8001)?"
            ) from error
        inputs = {tensor["name"] for tensor in config.get("input", [])}
        if not {"query", "documents"} <= inputs:
            raise TritonRerankerError(
                f"Model {self.model!r} at {self.url} takes inputs {sorted(inputs)}, not a reranker's query + "
                "documents. Pass the reranker model's name (`ettin-export deploy triton --name`, default "
                "'ettin_reranker'), not the engine model's."
            )
        parameters = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.batched = int(config.get("max_batch_size", 0)) > 0
        self._max_length = int(parameters["max_length"]) if parameters.get("max_length") else None
        self.activation = parameters.get("score_activation") or "identity"
        self.max_documents = int(parameters.get("max_documents") or self.batch_size)

    @property
    def max_length(self) -> int | None:
        """The server's max_length (it tokenizes and truncates)."""
        return self._max_length

    # ----------------------------------------------------------------------------------------------
    # Requests
    # ----------------------------------------------------------------------------------------------

    def _inputs(self, query: str, documents: Sequence[str], top_n: int | None):
        lead = [1] if self.batched else []
        arrays = {
            "query": np.array([query.encode("utf-8")], dtype=np.object_).reshape(lead + [1]),
            "documents": np.array([d.encode("utf-8") for d in documents], dtype=np.object_).reshape(lead + [len(documents)]),
        }
        if top_n is not None:
            arrays["top_n"] = np.array([top_n], dtype=np.int32).reshape(lead + [1])
        inputs = []
        for name, array in arrays.items():
            tensor = self._module.InferInput(name, list(array.shape), "INT32" if name == "top_n" else "BYTES")
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return inputs

    def _outputs(self):
        return [self._module.InferRequestedOutput(name) for name in ("scores", "top_indices")]

    def _infer_all(self, requests: list[tuple[str, Sequence[str], int | None]]) -> list[RerankResult]:
        """Send every (query, documents, top_n) request, `concurrency` at a time; results in order."""
        client = self._client()
        results: list = [None] * len(requests)
        if self.protocol == "http":
            for start in range(0, len(requests), self.concurrency):
                window = range(start, min(start + self.concurrency, len(requests)))
                pending = [client.async_infer(self.model, self._inputs(*requests[i]), outputs=self._outputs(),
                                              headers=self.headers) for i in window]
                for i, handle in zip(window, pending):
                    try:
                        results[i] = self._result(handle.get_result())
                    except (self._server_error, OSError) as error:
                        raise self._error(error, "the reranker request failed") from error
            return results
        done = threading.Condition()
        errors: list = []
        state = {"in_flight": 0}

        def callback(index, result=None, error=None):  # runs on a gRPC thread
            with done:
                state["in_flight"] -= 1
                if error is not None:
                    errors.append(error)
                else:
                    results[index] = result
                done.notify_all()

        def wait(predicate) -> None:
            # Every request ends by client_timeout at the latest, so progress never stalls longer.
            if not done.wait_for(predicate, timeout=self.timeout + 30):
                raise TritonRerankerError(f"no answer from {self.url} within {self.timeout + 30:.0f} s")

        for index, request in enumerate(requests):
            with done:
                wait(lambda: state["in_flight"] < self.concurrency or errors)
                if errors:
                    break
                state["in_flight"] += 1
            try:
                client.async_infer(self.model, self._inputs(*request), callback=functools.partial(callback, index),
                                   outputs=self._outputs(), client_timeout=self.timeout, headers=self.headers)
            except BaseException:
                with done:
                    state["in_flight"] -= 1
                raise
        with done:
            wait(lambda: state["in_flight"] == 0)
        if errors:
            raise self._error(errors[0], "the reranker request failed") from errors[0]
        return [self._result(result) for result in results]

    def _result(self, result) -> RerankResult:
        scores = np.asarray(result.as_numpy("scores"), dtype=np.float32).reshape(-1)
        top = np.asarray(result.as_numpy("top_indices"), dtype=np.int32).reshape(-1)
        return RerankResult(scores, top)

    # ----------------------------------------------------------------------------------------------
    # The interface
    # ----------------------------------------------------------------------------------------------

    def rerank(self, query: str, documents: Sequence[str], top_n: int | None = None) -> RerankResult:
        """One request, the server's own answer: raw scores in document order and the top-n indices."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, got {type(query).__name__}.")
        if isinstance(documents, str) or not all(isinstance(d, str) for d in documents):
            raise TypeError("documents must be a list of strings.")
        return self._infer_all([(query, list(documents), top_n)])[0]

    def predict(
        self,
        pairs: Sequence[Pair],
        *,
        batch_size: int | None = None,
        activation: str | None = None,
    ) -> np.ndarray:
        """Score (query, document) pairs on the server. float32 [len(pairs)] in the caller's order.

        Args:
            batch_size: documents per request (default: the constructor's `batch_size`).
            activation: None for raw scores; "sigmoid", "identity", or "default" (the model's own).
        """
        _check_pairs(pairs)
        queries, documents = _split_pairs(pairs)
        chunk = min(_check_batch_size(batch_size) or self.batch_size, self.max_documents)
        by_query: dict[str, list[int]] = {}
        for index, query in enumerate(queries):
            by_query.setdefault(query, []).append(index)
        requests, owners = [], []
        for query, indices in by_query.items():
            for start in range(0, len(indices), chunk):
                part = indices[start:start + chunk]
                requests.append((query, [documents[i] for i in part], None))
                owners.append(part)
        scores = np.empty(len(queries), dtype=np.float32)
        for part, result in zip(owners, self._infer_all(requests)):
            if result.scores.shape[0] != len(part):
                raise TritonRerankerError(
                    f"{self.model} returned {result.scores.shape[0]} scores for {len(part)} documents."
                )
            scores[part] = result.scores
        return self._activation(scores, activation)
