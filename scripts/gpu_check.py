#!/usr/bin/env python3
"""The prepared GPU run: the kernel, the op and the packed model, in at most 5 minutes, as JSON.

    python scripts/gpu_check.py OUT_DIR              # on a GPU machine (H100: <= 5 min; --quick <= 3 min)
    python scripts/gpu_check.py OUT_DIR --dry-run    # on a CPU: every step that can run without CUDA

Needs torch, triton, transformers, sentence-transformers and tokenizers; no TensorRT, no flash-attn, no
network, no install of this repo (the repo root, runtimes/ and plugins/ are put on sys.path here).
Writes OUT_DIR/gpu_check.json after every step (a failure or a timeout keeps what came before; every
step records its own error and the run goes on), plus the kernel script's own JSON and PTX.

Steps and their time budgets on an H100 (full / --quick):
  environment          versions, GPU, torch varlen_attn's signature                        ~10 s
  kernel_check         scripts/gpu_kernel_check.py as a child: AOT PTX launched as
                       TensorRT does, bf16/fp16 accuracy, speed vs varlen flash     <= 110 s / 60 s
  op_accuracy/...      ettin::varlen_attention on CUDA (auto backend and the Triton
                       kernel) against the CPU reference at lengths 1, 63/64/65, 129,
                       513, many short beside one long, a reranker batch; fp32 with
                       TF32 off, and bf16 beside PyTorch's own bf16 attention         ~25 s / 10 s
  packed/<size>        the six sizes, random weights built on the GPU, bf16, NQ-like
                       pairs (ettin_export.lengths' nq-like profile): pairs/s with the
                       automatic backend (flash-attn or torch.nn.attention.varlen; the
                       one that served is recorded) and with this project's Triton
                       kernel, end to end from text and model-only                   ~70 s / 40 s
  crossencoder/<size>  sentence-transformers CrossEncoder, bf16, SDPA (padded batches;
                       no flash-attn on that machine), same pairs and GPU, in the order
                       150m, 17m, 1b, 400m, 68m, 32m while the budget lasts; each
                       writes a random checkpoint to a scratch folder outside OUT_DIR  what is left
The run starts no new step after --budget-s (default 270 s; --quick 160 s): each step starts only
when its estimate fits in what is left, and records a skip otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for entry in (REPO / "plugins", REPO / "runtimes", REPO):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from ettin_export.progress import JsonReport as Report  # noqa: E402  (after the path above)

SIZES = ("17m", "32m", "68m", "150m", "400m", "1b")
CROSSENCODER_ORDER = ("150m", "17m", "1b", "400m", "68m", "32m")  # most asked-about first
BATCH_TOKENS, BATCH_PAIRS = 65536, 256  # the packed model's batches (tokens, pairs)
CROSSENCODER_BATCH = 128



# --- environment ---------------------------------------------------------------------------------------


def environment(torch, entry: dict) -> None:
    import sentence_transformers
    import transformers

    entry.update(python=platform.python_version(), torch=torch.__version__,
                 transformers=transformers.__version__, sentence_transformers=sentence_transformers.__version__)
    with contextlib.suppress(ImportError):
        import triton

        entry["triton"] = triton.__version__
    entry["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        memory = torch.cuda.get_device_properties(0).total_memory
        entry.update(gpu=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                     torch_cuda=torch.version.cuda, gpu_memory_gib=round(memory / 2**30, 1))
    try:
        from torch.nn.attention.varlen import varlen_attn

        signature = inspect.signature(varlen_attn)
        entry["torch_varlen_attn"] = {"signature": str(signature), "window_size": "window_size" in signature.parameters}
    except ImportError as error:
        entry["torch_varlen_attn"] = f"absent ({error})"
    entry["flash_attn_installed"] = _importable("flash_attn")
    from ettin_export.model.attention import cuda_attention_implementation

    entry["auto_backend_bf16"] = cuda_attention_implementation()
    entry["lengths"] = nq_like_source()


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except Exception:  # noqa: BLE001
        return False
    return True


# --- NQ-like pairs ---------------------------------------------------------------------------------------


def nq_like_source() -> str:
    from ettin_export.synthetic import lengths

    return f"ettin_export.synthetic.lengths profile nq-like: {lengths.get_profile('nq-like').description}"


def nq_like_pairs(encoder, tokenizer_file: Path, count: int, seed: int = 0) -> list[tuple[str, str]]:
    """NQ-like text pairs of exact token lengths: the project's `nq-like` length profile."""
    from tokenizers import Tokenizer

    from ettin_export.synthetic import lengths

    return lengths.make_pairs(lengths.get_profile("nq-like"), Tokenizer.from_file(str(tokenizer_file)), count, seed)


def length_summary(encoder, pairs) -> dict:
    lengths = [len(ids) for ids in encoder.encode(pairs)]
    return {"pairs": len(lengths), "mean_tokens": round(statistics.mean(lengths), 1),
            "min_tokens": min(lengths), "max_tokens": max(lengths), "total_tokens": sum(lengths)}


# --- timing ---------------------------------------------------------------------------------------------


def pairs_per_second(torch, fn, pairs: int, *, min_seconds: float, max_reps: int, device: str) -> dict:
    """Median wall time of fn() over repeated runs (bench.measure.time_repeated), as pairs/s."""
    from ettin_export.bench.measure import time_repeated

    sync = torch.cuda.synchronize if device == "cuda" else None
    timings = time_repeated(fn, min_seconds=min_seconds, max_reps=max_reps, sync=sync)
    return {"pairs_per_s": round(pairs / timings.median, 1), "median_s": round(timings.median, 4),
            "runs": len(timings.seconds)}


# --- steps ----------------------------------------------------------------------------------------------


def kernel_check(out_dir: Path, entry: dict, *, quick: bool, dry_run: bool, timeout: float) -> None:
    """(a)+(b): the kernel's own script, as a child with its own time budget."""
    command = [sys.executable, str(REPO / "scripts" / "gpu_kernel_check.py"), str(out_dir)]
    command += ["--dry-run"] if dry_run else ["--budget-s", "20" if quick else "45"]
    entry["command"] = " ".join(command)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        entry["returncode"] = proc.returncode
        entry["stdout_tail"] = proc.stdout[-3000:]
        entry["stderr_tail"] = proc.stderr[-2000:]
    except subprocess.TimeoutExpired:
        entry["timed_out_after_s"] = timeout
    result = out_dir / "gpu_kernel_check.json"
    if result.is_file():
        data = json.loads(result.read_text())
        entry["summary"] = data.get("summary")
        entry["ptx_version"] = data.get("steps", {}).get("aot_compile", {}).get("ptx_version_requested")
        entry["steps_failed"] = [n for n, s in data.get("steps", {}).items() if s.get("ok") is False]
    entry["ok_override"] = entry.get("returncode") == 0


def op_accuracy(torch, report: Report, device: str, quick: bool) -> None:
    from ettin_export.parity.kernel import attention_accuracy, awkward_attention_cases

    cases = awkward_attention_cases(seed=3)
    if quick or device != "cuda":
        cases = {k: v for k, v in cases.items() if k in ("one_token", "edges_63_64_65", "short_beside_long")}
    if device != "cuda":  # the CPU dry run: small cases only
        cases = {"one_token": [1], "edges_63_64_65": [63, 64, 65], "short_beside_long": [3, 1, 7, 140, 2, 5]}
    backends = ("auto", "triton") if device == "cuda" else ("auto",)
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for name, lengths in cases.items():
            for window in (64, -1):
                with report.step(f"op_accuracy/{dtype_name}/{name}/window{window}") as entry:
                    result = attention_accuracy(torch, lengths, window, dtype, device=device, reference_device="cpu",
                                                heads=12, seed=len(lengths) + window, backends=backends)
                    entry.update(result)
                    entry["ok_override"] = bool(result.get("pass", True))


def build_packed_model(torch, size: str, device: str):
    """The exact Ettin config with random weights, made directly on the device (no checkpoint)."""
    from ettin_export.checkpoint.load import modernbert_config
    from ettin_export.model import HeadConfig, PackedConfig, PackedReranker, init_random_weights
    from ettin_export.synthetic.checkpoints import modernbert_config_dict

    config = PackedConfig.from_modernbert(modernbert_config(modernbert_config_dict(size)), HeadConfig())
    with torch.device("meta"):
        model = PackedReranker(config)
    model = model.to_empty(device=device)
    init_random_weights(model, seed=0)
    return model.to(torch.bfloat16).eval()


def packed_throughput(torch, report: Report, size: str, encoder, pairs, device: str, quick: bool) -> None:
    with report.step(f"packed/{size}") as entry:
        try:
            entry.update(_measure_packed(torch, size, encoder, pairs, device, quick))
        finally:
            _free(torch, device)  # the model is gone with _measure_packed's frame


def _measure_packed(torch, size: str, encoder, pairs, device: str, quick: bool) -> dict:
    from ettin_export.model.attention import attention_backend, cuda_attention_implementation
    from ettin_export.model.torch_reranker import TorchReranker
    from ettin_runtime.packing import packed_batches

    start = time.time()
    model = build_packed_model(torch, size, device)
    result = {"build_s": round(time.time() - start, 2), "dtype": "bfloat16", "workload": length_summary(encoder, pairs)}
    reranker = TorchReranker(model, encoder, max_batch_tokens=BATCH_TOKENS, max_batch_pairs=BATCH_PAIRS)
    batches = [(torch.from_numpy(b.input_ids).long().to(device), torch.from_numpy(b.cu_seqlens).to(device),
                b.max_seqlen) for b in packed_batches(encoder.encode(pairs), BATCH_TOKENS, BATCH_PAIRS)]

    @torch.inference_mode()
    def model_only():
        for input_ids, cu_seqlens, max_seqlen in batches:
            model(input_ids, cu_seqlens, max_seqlen)

    def end_to_end():
        reranker.predict(pairs)

    timing = {"min_seconds": 0.6 if quick else 1.2, "max_reps": 5, "device": device}
    for backend in ("auto", "triton") if device == "cuda" else ("auto",):
        with attention_backend(backend):
            served = ("ettin_plugins Triton kernel" if backend == "triton"
                      else cuda_attention_implementation() if device == "cuda" else "reference (CPU)")
            result[backend] = {
                "attention": served,
                "end_to_end": pairs_per_second(torch, end_to_end, len(pairs), **timing),
                "model_only": pairs_per_second(torch, model_only, len(pairs), **timing),
            }
    if device != "cuda":
        result["triton"] = "skipped: the Triton kernel needs a CUDA device"
    return result


def crossencoder_throughput(torch, report: Report, size: str, pairs, device: str, scratch: Path) -> None:
    """CrossEncoder (bf16, SDPA) on a saved random checkpoint of the size; the checkpoint is deleted after."""
    with report.step(f"crossencoder/{size}") as entry:
        folder = scratch / f"{size}-ckpt"
        try:
            _measure_crossencoder(torch, entry, size, pairs, device, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            _free(torch, device)


def _measure_crossencoder(torch, entry: dict, size: str, pairs, device: str, folder: Path) -> None:
    """bench's own baseline (bench.measure.CrossEncoderContender), in bf16 on this GPU."""
    from ettin_export.bench.measure import CrossEncoderContender
    from ettin_export.synthetic.checkpoints import write_random_checkpoint

    start = time.time()
    write_random_checkpoint(folder, size, calibrate=False)
    entry["checkpoint_write_s"] = round(time.time() - start, 2)
    contender = CrossEncoderContender(str(folder), 512, CROSSENCODER_BATCH, device, "bfloat16")
    entry["load_s"] = round(time.time() - start, 2)
    entry["baseline"] = contender.description
    entry["attention"] = (f"{contender.description['attention'] or 'default'} (padded batches of {CROSSENCODER_BATCH}, "
                          "no flash-attn on this machine)")
    entry["end_to_end"] = pairs_per_second(torch, lambda: contender.predict(pairs), len(pairs), min_seconds=1.0,
                                           max_reps=4, device=device)


def _free(torch, device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def crossencoder_estimate_s(size: str) -> float:
    """Write + load + measure, from the parameter count (random init and safetensors writes dominate)."""
    from ettin_export import sizes

    spec = sizes.get_size(size)
    return 12 + (spec.backbone_params() + spec.head_params()) / 1e6 * 0.06


# --- main -----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder for gpu_check.json (created if missing)")
    parser.add_argument("--dry-run", action="store_true", help="CPU: every step that needs no CUDA, at toy scale")
    parser.add_argument("--quick", action="store_true", help="shorter: fewer pairs and cases, <= 3 min on an H100")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting new steps after this many seconds (270; quick 160)")
    parser.add_argument("--pairs", type=int, default=None, help="NQ-like pairs per measurement (2048; quick 1024)")
    parser.add_argument("--sizes", default=",".join(SIZES), help="packed-model sizes, comma-separated")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: this script compiles the kernel")
    budget = args.budget_s or (160.0 if args.quick else 270.0)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = Report(args.out_dir / "gpu_check.json", budget)
    report.data["args"] = {**vars(args), "out_dir": str(args.out_dir), "budget_s": budget}

    import torch

    with report.step("environment") as entry:
        environment(torch, entry)
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    report.data["device"] = device
    sizes_wanted = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if device == "cpu":
        sizes_wanted = sizes_wanted[:1]
    pair_count = args.pairs or (16 if device == "cpu" else 1024 if args.quick else 2048)

    with report.step("kernel_check") as entry:
        kernel_check(args.out_dir, entry, quick=args.quick, dry_run=device == "cpu",
                     timeout=60 if args.quick or device == "cpu" else 110)

    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    op_accuracy(torch, report, device, args.quick)

    scratch = Path(tempfile.mkdtemp(prefix="ettin-gpu-check-"))  # checkpoints: never under OUT_DIR
    try:
        from ettin_export.synthetic.checkpoints import write_random_checkpoint
        from ettin_runtime.packing import PairEncoder

        with report.step("workload") as entry:
            tokenizer_dir = write_random_checkpoint(scratch / "tokenizer", None, calibrate=False)
            encoder = PairEncoder.from_dir(tokenizer_dir, 512)
            pairs = nq_like_pairs(encoder, tokenizer_dir / "tokenizer.json", pair_count, seed=11)
            entry.update(length_summary(encoder, pairs))
            entry["source"] = nq_like_source()
        for size in sizes_wanted:
            estimate = 25 if device == "cuda" else 30
            if report.remaining() < estimate:
                report.skip(f"packed/{size}", f"time budget: {report.remaining():.0f} s left of {budget:.0f}")
                continue
            packed_throughput(torch, report, size, encoder, pairs, device, args.quick)
        order = [s for s in CROSSENCODER_ORDER if s in sizes_wanted]
        if args.quick:
            order = order[:2]
        for size in order:
            estimate = crossencoder_estimate_s(size)
            if report.remaining() < estimate:
                report.skip(f"crossencoder/{size}",
                            f"time budget: needs ~{estimate:.0f} s, {report.remaining():.0f} s left")
                continue
            crossencoder_throughput(torch, report, size, pairs, device, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    steps = report.data["steps"]
    report.data["summary"] = summarize(steps, device)
    report.write()
    print(json.dumps(report.data["summary"], indent=1))
    return 0 if not report.data["summary"]["steps_failed"] else 1


def summarize(steps: dict, device: str) -> dict:
    throughput = {}
    for name, step in steps.items():
        kind, _, size = name.partition("/")
        if kind == "packed" and step.get("ok"):
            for backend in ("auto", "triton"):
                if isinstance(step.get(backend), dict):
                    throughput.setdefault(size, {})[f"packed_{backend}"] = step[backend]["end_to_end"]["pairs_per_s"]
                    throughput[size][f"packed_{backend}_model_only"] = step[backend]["model_only"]["pairs_per_s"]
                    throughput[size][f"packed_{backend}_attention"] = step[backend]["attention"]
        if kind == "crossencoder" and step.get("ok"):
            throughput.setdefault(size, {})["crossencoder_sdpa"] = step["end_to_end"]["pairs_per_s"]
    for row in throughput.values():
        if "crossencoder_sdpa" in row:
            for backend in ("auto", "triton"):
                if f"packed_{backend}" in row:
                    ratio = row[f"packed_{backend}"] / row["crossencoder_sdpa"]
                    row[f"speedup_{backend}_vs_crossencoder"] = round(ratio, 2)
    return {
        "device": device,
        "pairs_per_s": throughput,
        "op_accuracy_pass": {n.split("/", 1)[1]: s.get("pass") for n, s in steps.items()
                             if n.startswith("op_accuracy/")},
        "skipped": {n: s["skipped"] for n, s in steps.items() if s.get("skipped")},
        "steps_failed": [n for n, s in steps.items() if s.get("ok") is False],
    }


if __name__ == "__main__":
    sys.exit(main())
