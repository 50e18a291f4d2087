"""`ettin-export bench-serving ARTIFACT`: what serving costs, on the same requests, in one run.

Systems (each gets the same R requests of D documents, sent by C client threads, C = --concurrency):
    in-process       Reranker.predict(pairs of one request) per request, the artifact's own runtime
    in-process-all   one Reranker.predict over every pair (no requests: the runtime's best batching)
    triton-grpc      TritonReranker.rerank over gRPC -> the reranker front -> the engine model
    v1-rerank        POST /v1/rerank (`ettin-export serve --triton`, a separate process) -> the same server
    front-null       TritonReranker.rerank over gRPC -> the same front -> a null engine (constant scores)

Protocol: the artifact is deployed (`deploy triton --with-null-engine`) into a temporary repository; a
Triton server (scripts/triton_server.py's, python backend) and the gateway start on 127.0.0.1; every
system scores the requests once untimed (and triton-grpc / v1-rerank are compared with in-process), then
`--runs` timed rounds, the systems interleaved and alternating their order, a fast system repeating the
requests until a pass lasts at least --min-seconds. A round during which processes other than ours (this
one, the server and its stubs, the gateway) used more than LOADED_CORES cores is measured again. Medians;
pairs/s and µs per pair of wall time, the clients included: everything runs on the same machine.

The front's own capacity is read from the server's statistics: the busy time of the front instances
(compute_infer of every execution of the null front) per pair, i.e. the pairs/s one instance sustains when
it is never idle; and what bounds it, tokenizing alone (the same tokenizer call, in this process).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ettin_export.bench.measure import LOADED_CORES, _busy_cpu_seconds, _loadavg, _own_cpu_seconds, cpu_name

SCHEMA = "ettin-export.bench-serving/1"
SYSTEMS = ("in-process", "in-process-all", "triton-grpc", "v1-rerank", "front-null")


@dataclass
class ServingOptions:
    artifact: Path
    lengths: str = "nq-like"
    requests: int = 16
    documents: int = 16
    concurrency: int = 4
    runs: int = 5
    min_seconds: float = 1.0
    max_retries: int = 10
    seed: int = 0
    reranker_instances: int | None = None  # the deployment's default
    max_batch_tokens: int | None = None  # the front's budget per engine request (default: the deployment's)
    systems: tuple[str, ...] = SYSTEMS


@dataclass
class System:
    name: str
    score: object  # (query, documents) -> float32 scores in document order; None: score all pairs at once
    all_pairs: object = None
    repeats: int = 1
    seconds: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# CPU accounting: our processes vs everyone else's
# --------------------------------------------------------------------------------------------------


def _process_cpu_seconds(pids) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def _processes_by_model(server_pid: int, descendants) -> dict[str, list[int]]:
    """{model name: its stub pids, "tritonserver": [the server]}: a python-backend stub's command line
    names its model file, <repository>/<model>/<version>/model.py."""
    models: dict[str, list[int]] = {"tritonserver": [server_pid]}
    for pid in descendants:
        with contextlib.suppress(OSError, IndexError):
            arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            model_file = Path(arguments[1].decode())
            if model_file.name == "model.py":
                models.setdefault(model_file.parent.parent.name, []).append(pid)
    return models


def _cpu_by_model(models: dict[str, list[int]]) -> dict[str, float]:
    return {name: _process_cpu_seconds(pids) for name, pids in models.items()}


class _Probe:
    """Wall time of one pass and the cores that processes other than ours used meanwhile."""

    def __init__(self, pids):
        self.pids = pids
        self.start = (time.perf_counter(), _busy_cpu_seconds(), _own_cpu_seconds(), _process_cpu_seconds(pids))

    def stop(self) -> tuple[float, float | None]:
        wall = time.perf_counter() - self.start[0]
        busy, own, ours = _busy_cpu_seconds(), _own_cpu_seconds(), _process_cpu_seconds(self.pids)
        if busy is None or self.start[1] is None or wall <= 0:
            return wall, None
        used_by_us = (own - self.start[2]) + (ours - self.start[3])
        return wall, max(0.0, (busy - self.start[1] - used_by_us) / wall)


# --------------------------------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------------------------------


def _triton_scorer(url: str, model: str):
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


def _gateway_scorer(port: int):
    local = threading.local()

    def post(body: str):
        for attempt in (0, 1):  # the server closes idle keep-alive connections (uvicorn: after 5 s)
            connection = getattr(local, "connection", None)
            if connection is None:
                connection = local.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
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


def _front_stats(server, model: str) -> dict:
    import tritonclient.http as http_client

    client = http_client.InferenceServerClient(server.http_address)
    try:
        (stats,) = client.get_inference_statistics(model)["model_stats"]
    finally:
        client.close()
    busy = sum(int(b[kind]["ns"]) for b in stats["batch_stats"] for kind in ("compute_input", "compute_infer",
                                                                            "compute_output"))
    return {"requests": int(stats["inference_count"]), "executions": int(stats["execution_count"]), "busy_ns": busy}


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def _make_requests(local, options: ServingOptions):
    from ettin_export.synthetic.lengths import load_pairs

    pairs, description = load_pairs(options.lengths, local.encoder._tokenizer, options.requests * options.documents,
                                    options.seed)
    requests = []
    for start in range(0, len(pairs) - options.documents + 1, options.documents):
        group = pairs[start:start + options.documents]
        requests.append((group[0][0], [document for _, document in group]))
    return requests, description


def _pass(system: System, requests, pool: ThreadPoolExecutor, concurrency: int) -> list:
    """Score every request once (C threads pulling from one queue); scores in request order."""
    if system.all_pairs is not None:
        scores = system.all_pairs([(q, d) for q, documents in requests for d in documents])
        out, start = [], 0
        for _, documents in requests:
            out.append(scores[start:start + len(documents)])
            start += len(documents)
        return out
    results: list = [None] * len(requests)
    queue = iter(range(len(requests)))
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                index = next(queue, None)
            if index is None:
                return
            results[index] = system.score(*requests[index])

    for future in [pool.submit(worker) for _ in range(concurrency)]:
        future.result()
    return results


def run_serving_bench(options: ServingOptions, log) -> dict:
    from ettin_runtime import Artifact

    from ettin_export.deploy.repository import DeployOptions, deploy_triton
    from ettin_export.serving import triton_server as harness

    unknown = set(options.systems) - set(SYSTEMS)
    if unknown:
        from ettin_export.errors import UsageError

        raise UsageError(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    artifact = Artifact.open(options.artifact)
    local = artifact.load()
    requests, description = _make_requests(local, options)
    pair_count = sum(len(documents) for _, documents in requests)
    lengths = [len(ids) for ids in local.encoder.encode([(q, d) for q, ds in requests for d in ds])]
    log(f"{len(requests)} requests x {options.documents} documents = {pair_count} pairs ({description}), "
        f"mean {np.mean(lengths):.1f} tokens per pair; {options.concurrency} client threads")
    loadavg_before = _loadavg()
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ettin-bench-serving-")))
        deploy_options = DeployOptions(work / "repo", max_batch_tokens=options.max_batch_tokens, null_engine=True,
                                       allow_random_weights=True)
        if options.reranker_instances is not None:
            deploy_options.reranker_instances = options.reranker_instances
        deployed = deploy_triton(artifact.root, deploy_options)
        needs_server = {"triton-grpc", "v1-rerank", "front-null"} & set(options.systems)
        server = gateway_pid = None
        if needs_server:
            log("starting Triton (python backend) on 127.0.0.1")
            server = stack.enter_context(harness.start_server(work / "repo", harness.ensure_env(), log_path=work / "triton.log",
                                                              die_with_parent=True))
        systems = []
        for name in options.systems:
            if name == "in-process":
                systems.append(System(name, lambda q, ds: local.predict([(q, d) for d in ds])))
            elif name == "in-process-all":
                systems.append(System(name, None, all_pairs=local.predict))
            elif name in ("triton-grpc", "front-null"):
                model = deployed.reranker_model if name == "triton-grpc" else deployed.null_reranker_model
                score, opened = _triton_scorer(server.grpc_url, model)
                stack.callback(lambda opened=opened: [client.close() for client in opened])
                systems.append(System(name, score))
            elif name == "v1-rerank":
                gateway_pid, port = _start_gateway(stack, server, work, log)
                systems.append(System(name, _gateway_scorer(port)))
        stubs = list(harness._descendants(server.pid)) if server else []
        ours = ([server.pid, *stubs] if server else []) + ([gateway_pid] if gateway_pid else [])
        models = _processes_by_model(server.pid, stubs) if server else {}
        if gateway_pid:
            models["gateway"] = [gateway_pid]
        cpu_spent: dict[str, dict[str, float]] = {s.name: {} for s in systems}  # system -> process -> CPU s
        cpu_passes: dict[str, int] = {s.name: 0 for s in systems}
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=options.concurrency, thread_name_prefix="client"))

        log("warm-up: one untimed pass each")
        reference = None
        differences = {}
        for system in systems:
            started = time.perf_counter()
            scores = np.concatenate(_pass(system, requests, pool, options.concurrency))
            elapsed = time.perf_counter() - started
            system.repeats = max(1, math.ceil(options.min_seconds / max(elapsed, 1e-6)))
            if system.name == "in-process":
                reference = scores
            elif reference is not None and system.name in ("triton-grpc", "v1-rerank"):
                differences[system.name] = float(np.max(np.abs(scores - reference)))
        null_before = _front_stats(server, deployed.null_reranker_model) if "front-null" in options.systems else None
        front_before = _front_stats(server, deployed.reranker_model) if "triton-grpc" in options.systems else None
        engine_before = _front_stats(server, deployed.engine_model) if "triton-grpc" in options.systems else None
        null_passes = real_passes = 0

        retried = loaded_kept = 0
        round_index = 0
        while round_index < options.runs:
            order = systems if round_index % 2 == 0 else systems[::-1]
            seconds, busiest = {}, 0.0
            for system in order:
                probe, cpu_before = _Probe(ours), _cpu_by_model(models)
                for _ in range(system.repeats):
                    _pass(system, requests, pool, options.concurrency)
                wall, others = probe.stop()
                for name, seconds_after in _cpu_by_model(models).items():
                    spent = cpu_spent[system.name]
                    spent[name] = spent.get(name, 0.0) + seconds_after - cpu_before[name]
                cpu_passes[system.name] += system.repeats
                seconds[system.name] = wall / system.repeats
                busiest = max(busiest, others or 0.0)
                null_passes += system.repeats if system.name == "front-null" else 0
                real_passes += system.repeats if system.name in ("triton-grpc", "v1-rerank") else 0
            if busiest > LOADED_CORES and retried < options.max_retries:
                retried += 1
                log(f"round {round_index + 1}/{options.runs}: other processes used {busiest:.2f} cores; measuring again")
                continue
            loaded_kept += busiest > LOADED_CORES
            for system in systems:
                system.seconds.append(seconds[system.name])
            round_index += 1
            log(f"round {round_index}/{options.runs}: " + ", ".join(
                f"{s.name} {pair_count / seconds[s.name]:.0f} pairs/s" for s in systems))

        report = {"schema": SCHEMA, "artifact": str(artifact.root), "model": artifact.source.model,
                  "random_weights": artifact.random_weights, "max_length": artifact.max_length,
                  "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "loadavg_1min_before": loadavg_before,
                              "loadavg_1min_after": _loadavg(), "retried_rounds": retried,
                              "loaded_rounds_kept": loaded_kept, "loaded_above_cores": LOADED_CORES},
                  "workload": {"requests": len(requests), "documents_per_request": options.documents,
                               "pairs": pair_count, "lengths": description, "mean_pair_tokens": float(np.mean(lengths)),
                               "concurrency": options.concurrency, "runs": options.runs, "seed": options.seed},
                  "deployment": {"reranker_instances": deploy_options.reranker_instances, "engine": deployed.engine_backend,
                                 "max_batch_tokens": deployed.budget.max_tokens,
                                 "max_batch_pairs": deployed.budget.max_pairs},
                  "systems": {}, "max_abs_diff_vs_in_process": differences}
        base = next((s for s in systems if s.name == "in-process"), None)
        for system in systems:
            median = statistics.median(system.seconds)
            entry = {"pairs_per_s": pair_count / median, "us_per_pair": median / pair_count * 1e6,
                     "median_s": median, "seconds": [round(x, 5) for x in system.seconds], "repeats": system.repeats}
            if base is not None and system is not base:
                entry["ratio_vs_in_process"] = statistics.median(base.seconds) / median
            report["systems"][system.name] = entry
        for system in systems:
            if cpu_passes[system.name] and cpu_spent[system.name] and system.name in ("triton-grpc", "v1-rerank",
                                                                                       "front-null"):
                pairs = cpu_passes[system.name] * pair_count
                report["systems"][system.name]["server_cpu_us_per_pair"] = {
                    name: round(seconds / pairs * 1e6, 1) for name, seconds in cpu_spent[system.name].items()
                    if seconds > 0}
        if null_before is not None and null_passes:
            after = _front_stats(server, deployed.null_reranker_model)
            pairs = null_passes * pair_count
            busy_us = (after["busy_ns"] - null_before["busy_ns"]) / 1e3 / pairs
            front_cpu = report["systems"]["front-null"].get("server_cpu_us_per_pair", {}).get(
                deployed.null_reranker_model)
            report["front_alone"] = {
                "busy_us_per_pair": busy_us, "cpu_us_per_pair": front_cpu,
                "pairs_per_s_per_instance": 1e6 / front_cpu if front_cpu else None,
                "requests_per_execution": (after["requests"] - null_before["requests"])
                / max(1, after["executions"] - null_before["executions"]),
                "tokenize_us_per_pair": _tokenize_cost(local, requests)}
        if front_before is not None and real_passes:
            pairs = real_passes * pair_count
            front_after, engine_after = _front_stats(server, deployed.reranker_model), _front_stats(server, deployed.engine_model)
            report["triton_server"] = {
                "front_busy_us_per_pair": (front_after["busy_ns"] - front_before["busy_ns"]) / 1e3 / pairs,
                "engine_busy_us_per_pair": (engine_after["busy_ns"] - engine_before["busy_ns"]) / 1e3 / pairs,
                "engine_pairs_per_execution": pairs / max(1, engine_after["executions"] - engine_before["executions"]),
                "front_requests_per_execution": (front_after["requests"] - front_before["requests"])
                / max(1, front_after["executions"] - front_before["executions"])}
    local.close()
    return report


def _tokenize_cost(local, requests) -> float:
    """CPU µs per pair of the front's tokenizer call (one single-threaded encode_batch over all pairs, as
    each front instance runs it), best of 3, in this process."""
    pairs = [(q, d) for q, documents in requests for d in documents]
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by tokenizers at every call
    try:
        best = math.inf
        for _ in range(3):
            started = time.process_time()
            local.encoder.encode(pairs)
            best = min(best, time.process_time() - started)
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    return best / len(pairs) * 1e6


def _start_gateway(stack, server, work: Path, log) -> tuple[int, int]:
    import subprocess
    import sys

    from ettin_export.serving.triton_server import free_port

    port = free_port()
    log_file = stack.enter_context(open(work / "gateway.log", "wb"))
    process = subprocess.Popen([sys.executable, "-m", "ettin_export.cli", "serve", "--triton", server.grpc_url,
                                "--port", str(port), "--log-level", "warning"],
                               stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def stop():
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()

    stack.callback(stop)
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited: {(work / 'gateway.log').read_text()[-2000:]}")
        with contextlib.suppress(OSError):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                break
        if time.monotonic() > deadline:
            raise RuntimeError("the gateway did not become healthy within 60 s")
        time.sleep(0.2)
    log(f"gateway (ettin-export serve --triton) on 127.0.0.1:{port}")
    return process.pid, port


def format_report(report: dict) -> str:
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
