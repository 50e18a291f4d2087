"""`ettin-export bench-serving ARTIFACT`: in-process runtime, Triton gRPC, /v1/rerank and the front
alone (against a null engine) on the same requests, interleaved in one run (ettin_export.bench.serving).

    ettin-export bench-serving ARTIFACT [--requests 16] [--documents 16] [--concurrency 4] [--runs 5] [--json]

Starts its own Triton server (the `triton-server` command's environment) and gateway on 127.0.0.1.
"""

from __future__ import annotations

import json
import sys

from ettin_export.commands.common import add_pair_source_arguments, positive_options


def add_arguments(parser) -> None:
    from ettin_export.bench.serving import SYSTEMS, ServingOptions

    defaults = ServingOptions(artifact=None)
    parser.add_argument("artifact", help="an artifact folder (CPU: ONNX Runtime in the server's python backend)")
    add_pair_source_arguments(parser, lengths=defaults.lengths, seed=defaults.seed)
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
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--out", help="also write the JSON result to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args) -> int:
    from pathlib import Path

    from ettin_export.bench.serving import ServingOptions, run_serving_bench

    positive_options(args, "requests", "documents", "concurrency", "runs", "reranker_instances", "max_batch_tokens")
    options = ServingOptions(artifact=Path(args.artifact), lengths=args.lengths, requests=args.requests,
                             documents=args.documents, concurrency=args.concurrency, runs=args.runs,
                             min_seconds=args.min_seconds, seed=args.seed, reranker_instances=args.reranker_instances,
                             max_batch_tokens=args.max_batch_tokens,
                             systems=tuple(s.strip() for s in args.systems.split(",") if s.strip()))

    def log(message: str) -> None:
        if not args.quiet:
            print(f"[bench-serving] {message}", file=sys.stderr, flush=True)

    report = run_serving_bench(options, log)
    report.command = "ettin-export bench-serving " + " ".join(args.argv[1:])
    data = report.to_json()
    if args.out:
        Path(args.out).write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(data, indent=2) if args.json else format_report(data))
    return 0


def format_report(report: dict) -> str:
    """The report (its JSON form) as the command prints it without --json."""
    machine, work = report["machine"], report["workload"]
    deployment = report["deployment"]
    lines = [
        f"ettin-export bench-serving: {report['model']}{' (random weights)' if report['random_weights'] else ''}, "
        f"max_length {report['max_length']}",
        f"  machine   {machine['cpu']}, {machine['cores']} cores, load {machine['loadavg_1min_before']} before / "
        f"{machine['loadavg_1min_after']} after"
        + (f"  [{machine['loaded_rounds_kept']} rounds kept LOADED]" if machine["loaded_rounds_kept"] else "")
        + (f"  ({machine['retried_rounds']} rounds measured again)" if machine["retried_rounds"] else ""),
        f"  workload  {work['requests']} requests x {work['documents_per_request']} documents = {work['pairs']} pairs, "
        f"{work['lengths'].split(':')[0]}, mean {work['mean_pair_tokens']:.1f} tokens/pair; "
        f"{work['concurrency']} client threads; medians of {work['runs']} interleaved rounds",
        f"  server    Triton, {deployment['reranker_instances']} front instance(s), engine {deployment['engine']}, "
        f"packed batches of <= {deployment['max_batch_tokens']} tokens / {deployment['max_batch_pairs']} pairs",
        f"    {'system':<16}{'pairs/s':>10}{'us/pair':>10}{'vs in-process':>15}",
    ]
    for name, entry in report["systems"].items():
        ratio = f"{entry['ratio_vs_in_process']:.2f}x" if "ratio_vs_in_process" in entry else ""
        lines.append(f"    {name:<16}{entry['pairs_per_s']:>10.1f}{entry['us_per_pair']:>10.1f}{ratio:>15}")
    if report.get("front_alone"):
        front = report["front_alone"]
        if front["cpu_us_per_pair"]:
            lines.append(f"  front alone: {front['cpu_us_per_pair']:.1f} us of CPU per pair in its instances = "
                         f"{front['pairs_per_s_per_instance']:.0f} pairs/s per fully busy instance (one core); "
                         f"tokenizing alone {front['tokenize_us_per_pair']:.1f} us of CPU per pair")
        lines.append(f"  front alone (server statistics): {front['busy_us_per_pair']:.1f} us of instance wall time per "
                     f"pair; {front['requests_per_execution']:.1f} requests per execution")
    if report.get("triton_server"):
        triton = report["triton_server"]
        lines.append(f"  triton server: front {triton['front_busy_us_per_pair']:.1f} us/pair (engine wait included), "
                     f"engine {triton['engine_busy_us_per_pair']:.1f} us/pair, "
                     f"{triton['engine_pairs_per_execution']:.1f} pairs per engine execution")
    for name, entry in report["systems"].items():
        if entry.get("server_cpu_us_per_pair"):
            lines.append(f"  CPU us/pair by process, {name}: " + ", ".join(
                f"{process} {value:.0f}" for process, value in sorted(entry["server_cpu_us_per_pair"].items())))
    if report["max_abs_diff_vs_in_process"]:
        lines.append("  scores: max |system - in-process| = " + ", ".join(
            f"{name} {value:.1e}" for name, value in report["max_abs_diff_vs_in_process"].items()))
    return "\n".join(lines)
