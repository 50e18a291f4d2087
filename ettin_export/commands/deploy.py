"""`ettin-export deploy triton ARTIFACT --repo DIR`: a self-contained Triton Inference Server model
repository for an artifact (ettin_export.deploy: repository.py for the layout, configs.py for the
configurations). The generator's heavy parts (protobuf, tritonclient's schema, onnx) load in `run`.
"""

from __future__ import annotations

import argparse
import json
import sys

from ettin_export.deploy.configs import DEFAULT_NAME, RERANKER_QUEUE_DELAY_US


def add_arguments(parser: argparse.ArgumentParser) -> None:
    targets = parser.add_subparsers(dest="deploy_target", required=True, metavar="TARGET")
    triton = targets.add_parser(
        "triton", help="a Triton Inference Server model repository (the packing front + the engine model)",
        description="Write a self-contained Triton model repository: a python-backend front (query + documents -> "
        "scores, top-n) that tokenizes the pairs of every request in one execute() together and sends the engine "
        "model packed batches (input_ids [T] + cu_seqlens [B+1], one batch per engine request): a TensorRT plan "
        "for a TensorRT artifact, ONNX Runtime for a CPU artifact.",
    )
    triton.add_argument("artifact", help="an artifact folder written by `ettin-export build`")
    triton.add_argument("--repo", required=True, help="the model repository folder to write")
    triton.add_argument("--name", default=DEFAULT_NAME,
                        help=f"the reranker model's name; the engine model is NAME_trt / NAME_ort / NAME_onnx "
                        f"(default {DEFAULT_NAME})")
    triton.add_argument("--instances", type=int, default=1,
                        help="engine model instances (TensorRT: per GPU) (default 1)")
    triton.add_argument("--reranker-instances", type=int, default=2,
                        help="python reranker (front) instances; tokenizing in one overlaps engine work in another "
                        "(default 2)")
    triton.add_argument("--max-batch-size", type=int,
                        help="most pairs per engine request (default: the engine's max_batch_pairs)")
    triton.add_argument("--max-batch-tokens", type=int,
                        help="most tokens per engine request (default: the engine's max_batch_tokens; CPU: the batch "
                        "size ONNX Runtime runs fastest, as the in-process runtime)")
    triton.add_argument("--queue-delay-us", type=int, default=RERANKER_QUEUE_DELAY_US,
                        help="how long the front's dynamic batcher waits to gather requests into one execution "
                        f"(default {RERANKER_QUEUE_DELAY_US})")
    triton.add_argument("--cpu-backend", choices=["python", "onnxruntime"], default="python",
                        help="CPU artifacts: run the ONNX file with ONNX Runtime in a python-backend model (any "
                        "Triton; default), or with Triton's onnxruntime backend (NGC container)")
    triton.add_argument("--max-documents", type=int, default=1000,
                        help="most documents in one reranker request (default 1000)")
    triton.add_argument("--with-null-engine", action="store_true",
                        help="also NAME_null: the same front against a constant-score engine, to measure the front alone")
    triton.add_argument("--allow-random-weights", action="store_true",
                        help="deploy a random-weights artifact (smoke tests only: its scores mean nothing)")
    triton.add_argument("--force", action="store_true", help="replace a repository this command wrote before")
    triton.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args) -> int:
    from pathlib import Path

    from ettin_export.deploy.repository import DeployOptions, deploy_triton

    options = DeployOptions(
        repo=Path(args.repo), name=args.name, instances=args.instances, reranker_instances=args.reranker_instances,
        max_batch_size=args.max_batch_size, max_batch_tokens=args.max_batch_tokens, queue_delay_us=args.queue_delay_us,
        cpu_backend=args.cpu_backend, max_documents=args.max_documents, null_engine=args.with_null_engine,
        allow_random_weights=args.allow_random_weights, force=args.force,
    )
    result = deploy_triton(args.artifact, options)
    summary = {
        "repository": str(result.path), "reranker_model": result.reranker_model, "engine_model": result.engine_model,
        "engine_backend": result.engine_backend, "max_batch_tokens": result.budget.max_tokens,
        "max_batch_pairs": result.budget.max_pairs, "null_reranker_model": result.null_reranker_model,
        "python_requirements": result.python_requirements, "tensorrt_version": result.tensorrt_version,
        "server_args": result.server_args, "serving_notes": result.serving_notes, "warnings": result.warnings,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    out = sys.stdout
    print(f"Triton model repository written: {result.path}", file=out)
    print(f"  {result.reranker_model:<24} python backend: query + documents -> scores, top_indices", file=out)
    print(f"  {result.engine_model:<24} {result.engine_backend}: packed batches of up to {result.budget.max_tokens} "
          f"tokens / {result.budget.max_pairs} pairs", file=out)
    if result.null_reranker_model:
        print(f"  {result.null_reranker_model:<24} the same front against constant scores (measures the front alone)",
              file=out)
    requirements = " ".join(f"'{r}'" for r in result.python_requirements)
    print(f"Serve it; the python models need `pip install {requirements}` in the server's Python:", file=out)
    print(f"  tritonserver --model-repository={result.path.resolve()} {' '.join(result.server_args)}".rstrip(), file=out)
    if result.engine_backend == "python":  # runs on the CPU-only server that ships on PyPI (nvidia-pytriton)
        print(f"  or, without Docker on a CPU-only Linux box: ettin-export triton-server start "
              f"--repo {result.path} --http-port 8000 --grpc-port 8001 --state triton.json", file=out)
    for note in result.serving_notes:
        print(f"- {note}", file=out)
    for warning in result.warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    # The ports are the server's, not ours: tritonserver's defaults are HTTP 8000 and gRPC 8001, and the
    # harness above takes free ports unless given --http-port / --grpc-port (it prints the ones it took).
    print("Query it on the server's ports (tritonserver's defaults: HTTP 8000, gRPC 8001; use yours if you set "
          "others):", file=out)
    print(f"  TritonReranker('localhost:8000', '{result.reranker_model}').rank(query, documents)   # HTTP port",
          file=out)
    model = "" if result.reranker_model == DEFAULT_NAME else f" --model {result.reranker_model}"
    print(f"  ettin-export serve --triton localhost:8001{model}   # gRPC port; POST /v1/rerank on localhost:8080",
          file=out)
    return 0
