"""`ettin-export serve`: the rerank HTTP API (`POST /v1/rerank`, TEI's `POST /rerank`, `GET /health`,
`GET /info`; ettin_export.serving.gateway and rerank_api) in front of a Triton server, or of an artifact
in this process:

    ettin-export serve --triton localhost:8001 [--model ettin_reranker] [--port 8080]   # gRPC to Triton
    ettin-export serve --artifact artifacts/17m-cpu [--port 8080]                       # no Triton

starlette, uvicorn (and for --triton, tritonclient[grpc]) are imported in `run`.
"""

from __future__ import annotations

import argparse

from ettin_export.serving.rerank_api import DEFAULT_MAX_CONCURRENT_REQUESTS, DEFAULT_PAYLOAD_LIMIT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--triton", metavar="HOST:PORT",
                        help="a Triton server's gRPC address (default port 8001) serving a `deploy triton` repository")
    source.add_argument("--artifact", metavar="DIR", help="an artifact folder, run in this process (no Triton)")
    parser.add_argument("--model", default="ettin_reranker",
                        help="--triton: the reranker model's name (`deploy triton --name`; default ettin_reranker)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    parser.add_argument("--max-documents", type=int,
                        help="most documents per request, more gets a 413 (default: the backend's, e.g. the Triton "
                        "front's max_documents, 1000 in-process)")
    parser.add_argument("--payload-limit", type=int, default=DEFAULT_PAYLOAD_LIMIT,
                        help=f"largest request body in bytes, more gets a 413 (default {DEFAULT_PAYLOAD_LIMIT})")
    parser.add_argument("--max-concurrent-requests", type=int, default=DEFAULT_MAX_CONCURRENT_REQUESTS,
                        help=f"requests in flight before a 429 (default {DEFAULT_MAX_CONCURRENT_REQUESTS})")
    parser.add_argument("--served-model-name", help="the `model` the responses name (default: the checkpoint's id)")
    parser.add_argument("--threads", type=int, help="--artifact: CPU threads per run (default: all cores)")
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="--artifact: serve a random-weights artifact (smoke tests only)")
    parser.add_argument("--timeout", type=float, default=120.0, help="--triton: seconds per request (default 120)")
    parser.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args) -> int:
    from ettin_export.errors import UsageError
    from ettin_export.serving.gateway import InProcessBackend, TritonBackend, create_app, run as serve

    for name in ("max_documents", "payload_limit", "max_concurrent_requests"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}.")
    check_address(args.host, args.port)
    if args.triton:
        import asyncio

        async def probe():  # refuse here, in one line, rather than from inside uvicorn's startup
            checked = TritonBackend(args.triton, args.model, timeout=args.timeout)
            try:
                await checked.start()
                if args.max_documents is not None and args.max_documents > checked.max_documents:
                    raise UsageError(f"--max-documents {args.max_documents} is more than the Triton front takes per "
                                     f"request ({checked.max_documents}); use {checked.max_documents} or less.")
            finally:
                await checked.close()

        asyncio.run(probe())
        backend = TritonBackend(args.triton, args.model, timeout=args.timeout)
    else:
        backend = InProcessBackend.open(args.artifact, threads=args.threads,
                                        allow_random_weights=args.allow_random_weights)
    app = create_app(backend, max_documents=args.max_documents, payload_limit=args.payload_limit,
                     max_concurrent_requests=args.max_concurrent_requests, model_name=args.served_model_name)
    serve(app, host=args.host, port=args.port, access_log=args.access_log, log_level=args.log_level)
    return 0


def check_address(host: str, port: int) -> None:
    """--host / --port that can be listened on, before the model is loaded: a port is 1 to 65535 (the
    socket layer would take 70000 as 70000 mod 65536), and no other server may hold it."""
    import socket

    from ettin_export.errors import UsageError

    if not 1 <= port <= 65535:
        raise UsageError(f"--port {port} is not a TCP port; pass one from 1 to 65535 (default 8080).")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((host, port))
    except OSError as error:
        raise UsageError(f"--host {host} --port {port} cannot be listened on ({error.strerror or error}): another "
                         "server may hold the port, or the address is not this machine's. Choose another --port "
                         "(or --host).") from None
