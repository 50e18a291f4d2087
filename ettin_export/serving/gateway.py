"""The rerank HTTP gateway: an ASGI app (Starlette, served by uvicorn) with `POST /v1/rerank` and TEI's
`POST /rerank` (the schema is rerank_api.py), in front of one of two backends:

    TritonBackend      gRPC (tritonclient.grpc.aio) to the reranker model of a `deploy triton` repository:
                       one Triton request per HTTP request; the server's front tokenizes, batches across
                       requests and runs the engine.
    InProcessBackend   an artifact opened in this process (Reranker.load): concurrent HTTP requests are
                       gathered into one `predict` call (whatever arrived while the last one ran), so a
                       single box without Triton still batches across requests.

    app = create_app(TritonBackend("localhost:8001", "ettin_reranker"))   # or InProcessBackend.open(dir)
    uvicorn.run(app, host="127.0.0.1", port=8080)                        # `ettin-export serve` does this

Also `GET /health` (200 when the backend answers, else 503) and `GET /info` (the model and the limits).
The gateway is thin on purpose: it parses and validates JSON, applies the score activation and sorts;
tokenizing and batching happen in the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ettin_runtime.errors import EttinError, MissingDependency
from ettin_runtime.triton_client import GRPC_CHANNEL_ARGS, INSTALL_HINT, _is_loopback, _split_url

from ettin_export.serving.rerank_api import (
    DEFAULT_MAX_CONCURRENT_REQUESTS,
    DEFAULT_MAX_DOCUMENTS,
    DEFAULT_PAYLOAD_LIMIT,
    ApiError,
    cohere_response,
    parse_request,
    tei_response,
)

PAIRS_PER_CALL = 4096  # in-process: the most pairs one predict call gathers from waiting requests
SERVE_INSTALL_HINT = "pip install 'ettin-export[serve]'  (starlette and uvicorn)"
log = logging.getLogger("ettin_export.gateway")


class GatewayError(EttinError, RuntimeError):
    """The gateway cannot start: its backend is missing, unreachable or not a reranker."""


# --------------------------------------------------------------------------------------------------
# Backends: raw float32 scores in document order
# --------------------------------------------------------------------------------------------------


class TritonBackend:
    """The reranker model of a Triton server, over gRPC (asyncio)."""

    kind = "triton"

    def __init__(self, url: str, model: str = "ettin_reranker", *, timeout: float = 120.0):
        self.url, self._ssl = _split_url(url, "grpc")
        self.model = model
        self.timeout = float(timeout)
        self._client = None
        self.max_documents = DEFAULT_MAX_DOCUMENTS
        self.max_length = None
        self.truncation_side = "right"
        self.info: dict = {}

    async def start(self) -> None:
        try:
            import tritonclient.grpc.aio as grpc_aio
            from tritonclient.utils import InferenceServerException
        except ImportError as error:
            raise MissingDependency(f"--triton needs tritonclient's gRPC client: {INSTALL_HINT}.") from error
        self._module, self._server_error = grpc_aio, InferenceServerException
        host = self.url.rsplit(":", 1)[0]
        channel_args = list(GRPC_CHANNEL_ARGS) + ([("grpc.enable_http_proxy", 0)] if _is_loopback(host) else [])
        self._client = grpc_aio.InferenceServerClient(self.url, ssl=self._ssl, channel_args=channel_args)
        try:
            config = (await self._client.get_model_config(self.model, as_json=True,
                                                          client_timeout=self.timeout))["config"]
        except InferenceServerException as error:
            raise GatewayError(f"Cannot read the reranker model {self.model!r} at grpc://{self.url}: "
                               f"{error.message()}. Is the server up (`tritonserver --model-repository=...`), "
                               "and is --model the reranker model's name?") from error
        inputs = {tensor["name"] for tensor in config.get("input", [])}
        if not {"query", "documents"} <= inputs:
            raise GatewayError(f"Model {self.model!r} at {self.url} takes {sorted(inputs)}, not a reranker's query + "
                               "documents: pass the reranker model's name (`deploy triton --name`).")
        parameters = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.batched = int(config.get("max_batch_size", 0)) > 0
        self.max_documents = int(parameters.get("max_documents") or DEFAULT_MAX_DOCUMENTS)
        self.max_length = int(parameters["max_length"]) if parameters.get("max_length") else None
        self.info = {"model_id": parameters.get("source_model") or self.model, "triton_model": self.model,
                     "triton_url": self.url, "random_weights": parameters.get("random_weights") == "true"}

    async def scores(self, query: str, documents: list[str]) -> np.ndarray:
        lead = [1] if self.batched else []
        arrays = {"query": np.array([query.encode("utf-8")], dtype=np.object_).reshape(lead + [1]),
                  "documents": np.array([d.encode("utf-8") for d in documents], dtype=np.object_)
                  .reshape(lead + [len(documents)])}
        inputs = []
        for name, array in arrays.items():
            tensor = self._module.InferInput(name, list(array.shape), "BYTES")
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        try:
            result = await self._client.infer(self.model, inputs, outputs=[self._module.InferRequestedOutput("scores")],
                                              client_timeout=self.timeout)
        except self._server_error as error:
            raise _api_error_of(error) from error
        return np.asarray(result.as_numpy("scores"), dtype=np.float32).reshape(-1)

    async def ready(self) -> bool:
        try:
            return bool(await self._client.is_model_ready(self.model))
        except Exception:  # noqa: BLE001 - any failure means not ready
            return False

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


def _api_error_of(error) -> ApiError:
    status = str(error.status() or "")
    message = error.message() or str(error)
    if "INVALID_ARGUMENT" in status:
        return ApiError(422, "Validation", message)
    if "UNAVAILABLE" in status:
        return ApiError(503, "Unhealthy", f"the Triton server is unavailable: {message}")
    return ApiError(424, "Backend", message)


class InProcessBackend:
    """An artifact's runtime in this process. Requests that arrive while a `predict` runs are scored
    together in the next one (one worker thread: the runtime itself uses every core)."""

    kind = "in-process"

    def __init__(self, reranker, info: dict):
        self.reranker = reranker
        self.max_length = reranker.max_length
        self.max_documents = DEFAULT_MAX_DOCUMENTS
        self.truncation_side = getattr(getattr(reranker, "encoder", None), "truncation_side", "right")
        self.info = info
        self._pending: list[tuple[list, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ettin-predict")

    @classmethod
    def open(cls, artifact_dir, *, threads: int | None = None, allow_random_weights: bool = False) -> InProcessBackend:
        from ettin_runtime.artifact import Artifact

        artifact = Artifact.open(artifact_dir)
        if artifact.random_weights and not allow_random_weights:
            raise GatewayError(f"{artifact.root} holds RANDOM weights ({artifact.source.model}): its scores mean "
                               "nothing. Serve a real checkpoint's artifact, or pass --allow-random-weights.")
        reranker = artifact.load(threads=threads)
        return cls(reranker, {"model_id": artifact.source.model or str(artifact.root), "artifact": str(artifact.root),
                              "random_weights": artifact.random_weights})

    async def start(self) -> None:
        pass

    async def scores(self, query: str, documents: list[str]) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        self._pending.append(([(query, document) for document in documents], future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            # Whatever arrived, up to PAIRS_PER_CALL pairs (at least one request): a burst of large requests
            # does not become one huge call that every one of them waits for.
            taken, count = 0, 0
            while taken < len(self._pending) and (taken == 0 or count + len(self._pending[taken][0]) <= PAIRS_PER_CALL):
                count += len(self._pending[taken][0])
                taken += 1
            waiting, self._pending = self._pending[:taken], self._pending[taken:]
            pairs = [pair for request_pairs, _ in waiting for pair in request_pairs]
            try:
                scores = await loop.run_in_executor(self._executor, self.reranker.predict, pairs)
            except Exception as error:  # noqa: BLE001 - every waiting request gets the failure
                failure = ApiError(424, "Backend", f"the runtime failed: {error}")
                for _, future in waiting:
                    if not future.done():
                        future.set_exception(failure)
                continue
            start = 0
            for request_pairs, future in waiting:
                if not future.done():
                    future.set_result(scores[start:start + len(request_pairs)])
                start += len(request_pairs)

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        self._executor.shutdown(wait=False)
        self.reranker.close()


# --------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------


DRAIN_FACTOR = 8  # an oversized body up to 8 x --payload-limit is read before its 413 (read_body)


def create_app(backend, *, max_documents: int | None = None, payload_limit: int = DEFAULT_PAYLOAD_LIMIT,
               max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS, model_name: str | None = None):
    """The Starlette app. `max_documents` defaults to the backend's own limit (a Triton front's
    max_documents) and may not exceed it."""
    try:
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.responses import JSONResponse
        from starlette.routing import Route
    except ImportError as error:
        raise MissingDependency(f"The rerank gateway needs starlette: {SERVE_INSTALL_HINT}.") from error

    state = {"in_flight": 0}
    limits = {"max_documents": max_documents}

    def error_response(error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    async def read_body(request) -> bytes:
        # A client that sends its whole body before it reads the answer (most do, unless they asked for
        # `Expect: 100-continue`) gets a broken pipe, not the 413, when the server answers and closes while
        # it still writes; so an oversized body is read and dropped first, up to DRAIN_FACTOR x the limit.
        drain = request.headers.get("expect", "").lower() != "100-continue"
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > payload_limit:
            if drain and int(declared) <= DRAIN_FACTOR * payload_limit:
                async for _ in request.stream():
                    pass
            raise ApiError(413, "Validation", f"the request body is {declared} bytes; at most {payload_limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > payload_limit:
                if not drain or size > DRAIN_FACTOR * payload_limit:
                    break
                continue
            chunks.append(chunk)
        if size > payload_limit:
            raise ApiError(413, "Validation", f"the request body is over {payload_limit} bytes")
        return b"".join(chunks)

    async def rerank(request, respond):
        if state["in_flight"] >= max_concurrent_requests:
            return error_response(ApiError(429, "Overloaded", f"Model is overloaded: {max_concurrent_requests} "
                                           "requests in flight; retry later"))
        state["in_flight"] += 1
        try:
            parsed = parse_request(await read_body(request), max_documents=limits["max_documents"],
                                   truncation_side=backend.truncation_side)
            return JSONResponse(respond(parsed, await backend.scores(parsed.query, parsed.documents)))
        except ApiError as error:
            return error_response(error)
        except Exception as error:  # noqa: BLE001 - an answer, never a dropped connection
            log.exception("rerank failed")
            return error_response(ApiError(424, "Backend", f"inference failed: {error}"))
        finally:
            state["in_flight"] -= 1

    async def v1_rerank(request):
        return await rerank(request, lambda parsed, scores: cohere_response(parsed, scores, limits["model"]))

    async def tei_rerank(request):
        return await rerank(request, tei_response)

    async def health(request):
        if await backend.ready():
            return JSONResponse({"status": "ok"})
        return error_response(ApiError(503, "Unhealthy", f"the {backend.kind} backend is not ready"))

    async def info(request):
        return JSONResponse({**backend.info, "model": limits["model"], "backend": backend.kind,
                             "max_client_batch_size": limits["max_documents"], "max_input_length": backend.max_length,
                             "payload_limit": payload_limit, "max_concurrent_requests": max_concurrent_requests,
                             "scores": "relevance_score = sigmoid(logit) in float32; raw_scores: true for the logit"})

    async def http_error(request, error):
        return JSONResponse({"error": str(error.detail), "error_type": "Validation"}, status_code=error.status_code)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await backend.start()
        backend_limit = backend.max_documents
        if limits["max_documents"] is None:
            limits["max_documents"] = backend_limit
        elif limits["max_documents"] > backend_limit:
            raise GatewayError(f"--max-documents {limits['max_documents']} is more than the backend takes per request "
                               f"({backend_limit}); use {backend_limit} or less.")
        limits["model"] = model_name or backend.info.get("model_id") or "ettin-reranker"
        if backend.info.get("random_weights"):
            log.warning("serving a RANDOM-WEIGHTS model: its scores mean nothing")
        try:
            yield
        finally:
            await backend.close()

    routes = [Route("/v1/rerank", v1_rerank, methods=["POST"]), Route("/rerank", tei_rerank, methods=["POST"]),
              Route("/health", health, methods=["GET"]), Route("/info", info, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})


def run(app, *, host: str = "127.0.0.1", port: int = 8080, access_log: bool = False, log_level: str = "info") -> None:
    """Serve `app` with uvicorn until SIGINT / SIGTERM."""
    try:
        import uvicorn
    except ImportError as error:
        raise MissingDependency(f"The rerank gateway needs uvicorn: {SERVE_INSTALL_HINT}.") from error
    uvicorn.run(app, host=host, port=port, access_log=access_log, log_level=log_level, timeout_graceful_shutdown=10)

