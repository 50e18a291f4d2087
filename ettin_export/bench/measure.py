"""`ettin-export bench`: pairs/s and tokens/s of an artifact (or the packed PyTorch model) against
sentence-transformers' CrossEncoder on the same pairs, in the same process.

    ettin-export bench ARTIFACT [--reference CHECKPOINT] [--lengths nq-like|short|long|FILE.jsonl] [--json]
    ettin-export bench --size 17m --random-weights        # candidate: the packed PyTorch model

Protocol: both systems score the same pairs (a length profile from `ettin_export.lengths`, truncated at
the same max_length: the artifact's, or the checkpoint's own; the published benchmark used 512). One untimed warm-up pass each, then `--runs`
timed passes (default 5) per timing mode, the two systems interleaved and alternating who goes first,
so drift and a neighbour's load hit both alike; medians are reported, with every run in the JSON.
Two timing modes:
    tokenization inside   predict(pairs) end to end, as a user calls it (CrossEncoder.predict vs
                          Reranker.predict); the headline figure.
    tokenization outside  pairs tokenized and batched beforehand (CrossEncoder: its own length sort and
                          padded batches; ours: packed batches); only the forward passes are timed.
tokens/s counts real tokens (after truncation, template included) for both systems, never padding.
Achieved GFLOP/s use the model's forward FLOPs per pair (matmuls + window-limited attention, as
`EttinSize.flops_per_token`); on a GPU they are also shown against the card's peak.

Heavy modules (torch, sentence-transformers, onnxruntime) are imported inside `run`.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from dataclasses import dataclass, field

from ettin_runtime.machine import CPU_FEATURES, cpu_features, cpu_name, describe  # noqa: F401  (re-exported)

import numpy as np


SCHEMA = "ettin-export.bench/1"
DEFAULT_RUNS = 5
DEFAULT_PAIRS = 256
# CrossEncoder.predict batch_size: the best measured on a 2-core AMD EPYC (fp32, nq-like and long): 4
# and 8 were within noise at 17m, 4 was ~6% ahead at 150m; 16 was ~15-25% and 32 ~40-65% slower
# (padded batches stay short, GEMMs stay in cache). The CrossEncoder default is 32. `auto` searches
# BASELINE_BATCH_SEARCH on the pairs, as the published benchmark searched its batch size.
DEFAULT_BASELINE_BATCH_SIZE = 4
BASELINE_BATCH_SEARCH = (4, 8, 16, 32, 64)
# Another process using more than this many cores on average while we measured makes the figures suspect.
LOADED_CORES = 0.25
# Dense peaks (TFLOP/s) per precision, from the vendors' datasheets; --peak-tflops overrides.
GPU_PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp32": 66.9},
    "H100 SXM": {"bf16": 989.4, "fp32": 66.9},
    "H100 NVL": {"bf16": 835.0, "fp32": 60.0},
    "H100 PCIe": {"bf16": 756.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "fp32": 91.6},
    "L4": {"bf16": 121.0, "fp32": 30.3},
}


@dataclass
class Timings:
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def summary(self, pairs: int, tokens: int, flops: float) -> dict:
        median = self.median
        return {
            "seconds": [round(s, 6) for s in self.seconds], "median_s": round(median, 6),
            "min_s": round(min(self.seconds), 6), "pairs_per_s": pairs / median, "tokens_per_s": tokens / median,
            "gflops_per_s": flops / median / 1e9,
        }


def time_repeated(fn, *, min_seconds: float, max_reps: int, sync=None) -> Timings:
    """fn() timed after one warm-up run, repeated until `min_seconds` have passed (at least twice, at most
    `max_reps` times); `sync` waits for queued device work (torch.cuda.synchronize) after each run."""
    sync = sync or (lambda: None)
    fn()
    sync()
    timings = Timings()
    while len(timings.seconds) < 2 or (sum(timings.seconds) < min_seconds and len(timings.seconds) < max_reps):
        start = time.perf_counter()
        fn()
        sync()
        timings.seconds.append(time.perf_counter() - start)
    return timings


class Contender:
    """One system under test: `predict` end to end; `prepare` + `forward` with tokenization outside."""

    name: str
    description: dict

    def predict(self, pairs) -> np.ndarray:
        raise NotImplementedError

    def prepare(self, pairs):
        raise NotImplementedError

    def forward(self, prepared) -> np.ndarray:
        raise NotImplementedError


class RerankerContender(Contender):
    """An ettin_runtime Reranker (ONNX Runtime, TensorRT or the packed PyTorch model)."""

    def __init__(self, reranker, description: dict, batch_pairs: int | None, batch_tokens: int | None):
        self.name = "candidate"
        self.reranker = reranker
        if batch_tokens is not None:
            self.reranker.max_batch_tokens = min(int(batch_tokens), getattr(reranker, "token_limit", int(batch_tokens)))
        if batch_pairs is not None:
            self.reranker.max_batch_pairs = int(batch_pairs)
        self.description = {**description, "batch_pairs": self.reranker.max_batch_pairs,
                            "batch_tokens": self.reranker.max_batch_tokens}

    def predict(self, pairs) -> np.ndarray:
        return self.reranker.predict(pairs)

    def prepare(self, pairs):
        from ettin_runtime.packing import packed_batches

        token_ids = self.reranker.encoder.encode(pairs)
        return len(pairs), packed_batches(token_ids, self.reranker.max_batch_tokens, self.reranker.max_batch_pairs)

    def forward(self, prepared) -> np.ndarray:
        count, batches = prepared
        scores = np.empty(count, dtype=np.float32)
        for batch in batches:
            scores[batch.order] = np.asarray(self.reranker._score(batch), dtype=np.float32).reshape(-1)
        return scores


class CrossEncoderContender(Contender):
    """sentence-transformers' CrossEncoder, raw scores (Identity), as its predict runs: pairs sorted by
    character length, padded batches of `batch_size`."""

    def __init__(self, path: str, max_length: int, batch_size: int | str, device: str, dtype: str):
        import sentence_transformers
        import torch
        from sentence_transformers import CrossEncoder

        from ettin_export.progress import quiet_third_party

        quiet_third_party()
        self.name = "baseline"
        self.torch = torch
        model_kwargs = {} if dtype == "float32" else {"dtype": getattr(torch, dtype)}
        self.model = CrossEncoder(path, device=device, activation_fn=torch.nn.Identity(), max_length=max_length,
                                  model_kwargs=model_kwargs)
        self.batch_size = DEFAULT_BASELINE_BATCH_SIZE if batch_size == "auto" else int(batch_size)
        self.search = batch_size == "auto"
        transformer = self.model[0]
        attention = getattr(getattr(transformer, "auto_model", None), "config", None)
        self.description = {
            "kind": "sentence-transformers CrossEncoder", "version": sentence_transformers.__version__,
            "torch_version": torch.__version__, "checkpoint": path, "batch_size": self.batch_size,
            "device": device, "dtype": dtype,
            "attention": getattr(attention, "_attn_implementation", None),
        }

    def predict(self, pairs, batch_size: int | None = None) -> np.ndarray:
        return self.model.predict(pairs, batch_size=batch_size or self.batch_size, show_progress_bar=False,
                                  convert_to_numpy=True)

    def choose_batch_size(self, pairs, log) -> None:
        """`auto`: one timed pass per candidate batch size (after the warm-up), keep the fastest."""
        seconds = {}
        for size in BASELINE_BATCH_SEARCH:
            start = time.perf_counter()
            self.predict(pairs, size)
            seconds[size] = time.perf_counter() - start
            log(f"baseline batch size {size}: {seconds[size]:.3f} s")
        self.batch_size = min(seconds, key=seconds.get)
        self.description.update(batch_size=self.batch_size,
                                batch_size_search={str(k): round(v, 4) for k, v in seconds.items()})

    def prepare(self, pairs, batch_size: int | None = None):
        """CrossEncoder's own length sort and padded batches of `batch_size` (default: the chosen one)."""
        batch_size = batch_size or self.batch_size
        length = getattr(self.model, "_input_length", lambda pair: len(pair[0]) + len(pair[1]))
        order = np.argsort([-length(pair) for pair in pairs], kind="stable")
        batches = []
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            features = self.model.preprocess([pairs[i] for i in indices])
            features = {k: (v.to(self.model.device) if hasattr(v, "to") else v) for k, v in features.items()}
            batches.append((indices, features))
        return len(pairs), batches

    def forward(self, prepared) -> np.ndarray:
        count, batches = prepared
        scores = np.empty(count, dtype=np.float32)
        with self.torch.inference_mode():
            for indices, features in batches:
                out = self.model(features)["scores"]
                scores[indices] = out.float().reshape(-1).cpu().numpy()
        return scores


class MachineLoad:
    """How busy the machine was with *other* processes while we measured: the CPU time all processes
    used (/proc/stat) minus ours, per second of wall time. Falls back to the load average elsewhere."""

    def __init__(self):
        self.start_wall = time.perf_counter()
        self.start_busy = busy_cpu_seconds()
        self.start_self = _own_cpu_seconds()
        self.loadavg_before = loadavg()

    def finish(self, loaded_runs_kept: int) -> dict:
        wall = time.perf_counter() - self.start_wall
        busy, own = busy_cpu_seconds(), _own_cpu_seconds()
        others = None
        if busy is not None and self.start_busy is not None and wall > 0:
            others = max(0.0, ((busy - self.start_busy) - (own - self.start_self)) / wall)
        return {"loadavg_1min_before": self.loadavg_before,
                "other_processes_cores": None if others is None else round(others, 3),
                "loaded": loaded_runs_kept > 0}


def busy_cpu_seconds() -> float | None:
    """CPU seconds that all processes have used since boot (/proc/stat: idle and iowait left out); None
    where there is no /proc/stat."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def loadavg() -> float | None:
    """The 1-minute load average, to 2 decimals; None where the system has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def cpu_description() -> str:
    """e.g. 'AMD EPYC (avx2 fma; class avx2), 2 cores': what a CPU figure is quoted with."""
    return describe()


def gpu_peak(device_name: str | None, precision: str, override: float | None) -> float | None:
    if override is not None:
        return override
    if not device_name:
        return None
    for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):  # most specific name first
        if all(part in device_name for part in key.split()):
            return GPU_PEAK_TFLOPS[key]["bf16" if precision in ("bf16", "bfloat16") else "fp32"]
    return None


@dataclass
class Setup:
    candidate: Contender
    baseline: Contender | None
    model: dict  # hidden_size, intermediate_size, windows, num_layers, source, size, random_weights
    max_length: int
    tokenizer: object  # the candidate encoder's tokenizers.Tokenizer
    precision: str


def measure(setup: Setup, pairs, runs: int, modes: list[str], log, max_retries: int) -> dict:
    """Warm up each system once, then `runs` interleaved rounds per mode, alternating which system goes
    first. A round during which other processes used more than LOADED_CORES is measured again (at most
    `max_retries` times in all), so a neighbour's burst does not land on one system only."""
    systems = [s for s in (setup.candidate, setup.baseline) if s is not None]
    log("warm-up: one untimed pass each")
    scores = {s.name: s.predict(pairs) for s in systems}
    if getattr(setup.baseline, "search", False):
        setup.baseline.choose_batch_size(pairs, log)
    results, retried, loaded_rounds = {}, 0, 0
    for mode in modes:
        prepared = {s.name: s.prepare(pairs) for s in systems} if mode == "outside" else {}
        timings = {s.name: Timings() for s in systems}
        round_index = 0
        while round_index < runs:
            times, busiest = {}, 0.0
            for system in systems if round_index % 2 == 0 else systems[::-1]:
                gc.collect()
                probe = _CpuProbe()
                if mode == "inside":
                    system.predict(pairs)
                else:
                    system.forward(prepared[system.name])
                times[system.name], others = probe.stop()
                busiest = max(busiest, others if others is not None else 0.0)
            if busiest > LOADED_CORES and retried < max_retries:
                retried += 1
                log(f"tokenization {mode}, run {round_index + 1}/{runs}: other processes used {busiest:.2f} cores; "
                    "measuring this run again")
                continue
            loaded_rounds += busiest > LOADED_CORES
            for name, seconds in times.items():
                timings[name].seconds.append(seconds)
            round_index += 1
            log(f"tokenization {mode}, run {round_index}/{runs}: "
                + ", ".join(f"{name} {t.seconds[-1]:.3f} s" for name, t in timings.items()))
        results[mode] = timings
    return {"timings": results, "scores": scores, "retried_runs": retried, "loaded_runs_kept": loaded_rounds}


class _CpuProbe:
    """Wall time of one run and the cores other processes used meanwhile."""

    def __init__(self):
        self.busy, self.own, self.start = busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()

    def stop(self) -> tuple[float, float | None]:
        wall = time.perf_counter() - self.start
        busy, own = busy_cpu_seconds(), _own_cpu_seconds()
        if busy is None or self.busy is None or wall <= 0:
            return wall, None
        return wall, max(0.0, ((busy - self.busy) - (own - self.own)) / wall)


def format_report(report: dict) -> str:
    machine, lengths = report["machine"], report["lengths"]
    gate = report["candidate"].get("parity")
    lines = [
        f"ettin-export bench: {report['model'].get('source')} ({report['model']['num_layers']} layers, hidden "
        f"{report['model']['hidden_size']})",
        *([f"  UNVERIFIED: this artifact's parity gate {gate}: its speed is measured, its scores are not "
           "trusted"] if gate not in (None, "passed") else []),
        f"  machine    {machine['device']}"
        + (f" ({' '.join(machine['cpu_features']) or 'no listed features'})" if machine.get("cpu_features") is not None
           and not machine.get("gpu") else "")
        + f", {machine['cores']} cores, {machine['threads']} threads"
        + (f"  [LOADED during {report['loaded_runs_kept']} runs]" if machine["loaded"] else "")
        + (f"  ({report['retried_runs']} runs measured again: the machine was busy)" if report["retried_runs"] else ""),
        f"  pairs      {lengths['pairs']} ({lengths['description']}), mean {lengths['pair_tokens']['mean']:.1f} "
        f"tokens/pair, {lengths['truncated_share']:.1%} truncated at {lengths['max_length']}",
        f"  candidate  {report['candidate']['kind']}, batches of <= {report['candidate']['batch_pairs']} pairs / "
        f"{report['candidate']['batch_tokens']} tokens",
    ]
    if report["baseline"]:
        lines.append(f"  baseline   {report['baseline']['kind']} {report['baseline']['version']}, batch_size "
                     f"{report['baseline']['batch_size']}, {report['baseline']['dtype']}")
    lines.append(f"  medians of {report['runs']} interleaved runs after {report['warmup_runs']} warm-up:")
    lines.append(f"    {'timing':<22}{'system':<11}{'pairs/s':>10}{'tokens/s':>11}{'GFLOP/s':>9}{'ratio':>12}")
    for mode, entry in report["results"].items():
        for name in ("candidate", "baseline"):
            if name in entry:
                row = entry[name]
                ratio = ""
                if name == "candidate" and entry.get("ratio") is not None:
                    ratio = f"{entry['ratio']:.2f}x"
                elif name == "candidate" and "unreliable_ratio" in entry:
                    ratio = "unreliable"
                lines.append(f"    {mode.replace('_', ' '):<22}{name:<11}{row['pairs_per_s']:>10.1f}"
                             f"{row['tokens_per_s']:>11.0f}{row['gflops_per_s']:>9.1f}{ratio:>12}")
    if report["flops"]["peak_tflops"]:
        lines.append(f"  peak {report['flops']['peak_tflops']} TFLOP/s")
    if report["scores_max_abs_diff"] is not None:
        lines.append(f"  scores: max |candidate - baseline| = {report['scores_max_abs_diff']:.2e}")
    return "\n".join(lines)
