"""The command line's commands, one thin module each over the pipeline: `add_arguments(parser)` and
`run(args) -> exit status`. Each imports its heavy dependencies inside `run`, so `--help` and a
runtime-only install stay light."""

COMMANDS = {
    "sizes": ("ettin_export.commands.sizes", "the six Ettin sizes, their configs and parameter counts"),
    "score": ("ettin_export.commands.score", "score (query, document) pairs from a JSON-lines file"),
    "build": ("ettin_export.commands.build", "export a reranker to a parity-checked artifact folder"),
    "verify": ("ettin_export.commands.verify", "parity report of an artifact against its reference model"),
    "bench": ("ettin_export.commands.bench", "pairs/s of an artifact or model against the sentence-transformers baseline"),
    "eval": ("ettin_export.commands.eval", "NDCG@10, MRR@10, Recall@k of a reranker on a BEIR folder, beside CrossEncoder"),
    "bench-serving": ("ettin_export.commands.bench_serving",
                      "pairs/s of in-process, Triton gRPC, /v1/rerank and the front alone on the same requests"),
    "deploy": ("ettin_export.commands.deploy", "generate a Triton Inference Server model repository from an artifact"),
    "serve": ("ettin_export.commands.serve", "the /v1/rerank HTTP API in front of a Triton server or an artifact"),
    "triton-server": ("ettin_export.commands.triton_server",
                      "set up, start, show or stop a local Triton server (python backend, CPU-only Linux)"),
    "selftest": ("ettin_export.commands.selftest", "on a GPU with TensorRT: prove an engine end to end, one verdict"),
}
