"""`ettin-export deploy triton ARTIFACT --repo DIR`: a self-contained Triton Inference Server model
repository for an artifact (ettin_export.deploy: repository.py for the layout, configs.py for the
configurations). The generator's heavy parts (protobuf, tritonclient's schema, onnx) load in `run`.
"""

from __future__ import annotations

import argparse
import json
import sys

from ettin_export.deploy.configs import DEFAULT_NAME


def add_arguments(parser: argparse.ArgumentParser) -> None:
    targets = parser.add_subparsers(dest="deploy_target", required=True, metavar="TARGET")
    triton = targets.add_parser(
        "triton", help="a Triton Inference Server model repository (reranker + ragged-batching engine model)",
        description="Write a self-contained Triton model repository: a python-backend reranker model (query + "
        "documents -> scores, top-n) that fans one request per pair out to a ragged, dynamically batched engine "
        "model (TensorRT plan for a TensorRT artifact; ONNX Runtime for a CPU artifact).",
    )
    triton.add_argument("artifact", help="an artifact folder written by `ettin-export build`")
    triton.add_argument("--repo", required=True, help="the model repository folder to write")
    triton.add_argument("--name", default=DEFAULT_NAME,
                        help=f"the reranker model's name; the engine model is NAME_trt / NAME_ort / NAME_onnx "
                        f"(default {DEFAULT_NAME})")
    triton.add_argument("--instances", type=int, default=1,
                        help="engine model instances (TensorRT: per GPU) (default 1)")
    triton.add_argument("--reranker-instances", type=int, default=2,
                        help="python reranker model instances; tokenizing in one overlaps engine work (default 2)")
    triton.add_argument("--max-batch-size", type=int,
                        help="most pairs per engine execution (default: all the engine holds at max_length)")
    triton.add_argument("--queue-delay-us", type=int, default=1000,
                        help="how long the engine's dynamic batcher waits to fill a batch (default 1000)")
    triton.add_argument("--cpu-backend", choices=["python", "onnxruntime"], default="python",
                        help="CPU artifacts: run the ONNX file with ONNX Runtime in a python-backend model (any "
                        "Triton; default), or with Triton's onnxruntime backend (NGC container)")
    triton.add_argument("--max-documents", type=int, default=1000,
                        help="most documents in one reranker request (default 1000)")
    triton.add_argument("--allow-random-weights", action="store_true",
                        help="deploy a random-weights artifact (smoke tests only: its scores mean nothing)")
    triton.add_argument("--force", action="store_true", help="replace a repository this command wrote before")
    triton.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args) -> int:
    from pathlib import Path

    from ettin_export.deploy.repository import DeployOptions, deploy_triton

    options = DeployOptions(
        repo=Path(args.repo), name=args.name, instances=args.instances, reranker_instances=args.reranker_instances,
        max_batch_size=args.max_batch_size, queue_delay_us=args.queue_delay_us, cpu_backend=args.cpu_backend,
        max_documents=args.max_documents, allow_random_weights=args.allow_random_weights, force=args.force,
    )
    result = deploy_triton(args.artifact, options)
    summary = {
        "repository": str(result.path), "reranker_model": result.reranker_model, "engine_model": result.engine_model,
        "engine_backend": result.engine_backend, "max_batch_size": result.max_batch_size,
        "python_requirements": result.python_requirements, "tensorrt_version": result.tensorrt_version,
        "server_args": result.server_args, "serving_notes": result.serving_notes, "warnings": result.warnings,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    out = sys.stdout
    print(f"Triton model repository written: {result.path}", file=out)
    print(f"  {result.reranker_model:<24} python backend: query + documents -> scores, top_indices", file=out)
    print(f"  {result.engine_model:<24} {result.engine_backend}: ragged input_ids, up to {result.max_batch_size} "
          "pairs per execution", file=out)
    requirements = " ".join(f"'{r}'" for r in result.python_requirements)
    print(f"Serve it; the python models need `pip install {requirements}` in the server's Python:", file=out)
    print(f"  tritonserver --model-repository={result.path.resolve()} {' '.join(result.server_args)}", file=out)
    for note in result.serving_notes:
        print(f"- {note}", file=out)
    for warning in result.warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    print(f"Query it: TritonReranker('localhost:8000', '{result.reranker_model}').rank(query, documents)", file=out)
    return 0
