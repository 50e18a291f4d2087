"""`ettin-export bench-serving ARTIFACT`: in-process runtime, Triton gRPC, /v1/rerank and the front
alone (against a null engine) on the same requests, interleaved in one run (ettin_export.bench.serving).

    ettin-export bench-serving ARTIFACT [--requests 16] [--documents 16] [--concurrency 4] [--runs 5] [--json]

Starts its own Triton server (scripts/triton_server.py's environment) and gateway on 127.0.0.1.
"""

from __future__ import annotations

import json
import sys


def add_arguments(parser) -> None:
    from ettin_export.bench.serving import SYSTEMS, ServingOptions

    defaults = ServingOptions(artifact=None)
    parser.add_argument("artifact", help="an artifact folder (CPU: ONNX Runtime in the server's python backend)")
    parser.add_argument("--lengths", default=defaults.lengths, help="a length profile (nq-like, short, long) or a "
                        'JSON-lines file of {"query", "document"} pairs (see `ettin-export bench`)')
    parser.add_argument("--requests", type=int, default=defaults.requests, help="requests per pass")
    parser.add_argument("--documents", type=int, default=defaults.documents, help="documents per request")
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency, help="client threads")
    parser.add_argument("--runs", type=int, default=defaults.runs, help="timed rounds (medians are reported)")
    parser.add_argument("--min-seconds", type=float, default=defaults.min_seconds,
                        help="a fast system repeats the requests until one timed pass lasts this long")
    parser.add_argument("--reranker-instances", type=int,
                        help="front instances in the deployed repository (default: `deploy triton`'s)")
    parser.add_argument("--max-batch-tokens", type=int,
                        help="the front's tokens per engine request (default: `deploy triton`'s; e.g. a TensorRT "
                        "profile's 16384 to measure the front as it runs on a GPU host)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--out", help="also write the JSON result to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args) -> int:
    from pathlib import Path

    from ettin_export.bench.serving import ServingOptions, format_report, run_serving_bench
    from ettin_export.errors import UsageError

    for name in ("requests", "documents", "concurrency", "runs", "reranker_instances", "max_batch_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1.")
    options = ServingOptions(artifact=Path(args.artifact), lengths=args.lengths, requests=args.requests,
                             documents=args.documents, concurrency=args.concurrency, runs=args.runs,
                             min_seconds=args.min_seconds, seed=args.seed, reranker_instances=args.reranker_instances,
                             max_batch_tokens=args.max_batch_tokens,
                             systems=tuple(s.strip() for s in args.systems.split(",") if s.strip()))

    def log(message: str) -> None:
        if not args.quiet:
            print(f"[bench-serving] {message}", file=sys.stderr, flush=True)

    report = run_serving_bench(options, log)
    report["command"] = "ettin-export bench-serving " + " ".join(args.argv[1:])
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
