#!/usr/bin/env python3
"""The prepared GPU run: kernel parity, then the packed model beside CrossEncoder, in 8 minutes, as JSON.

    timeout 540 python scripts/gpu_check.py OUT_DIR    # on the GPU machine: <= 8 min wall (the plan below)
    python scripts/gpu_check.py OUT_DIR --quick        # the rerun, if one is needed: <= 4 min
    python scripts/gpu_check.py OUT_DIR --dry-run      # on a CPU: every step, with stand-ins for CUDA

Needs torch, triton, transformers, sentence-transformers and tokenizers; no TensorRT (what needs it is
`ettin-export selftest --target h100`, and the lent GPU machine has none), no flash-attn, no network, no
install of this repo (the repo root, runtimes/ and plugins/ are put on sys.path here). Writes
OUT_DIR/gpu_check.json after every step, so a cut run still reports what it finished; every step records
its own error and the run goes on. Plus the kernel script's own JSON and a PTX sample.

The plan, in order of value (estimates for an H100/H200, not yet measured; quick in brackets):
  imports + environment  torch, triton, transformers; versions, GPU, varlen_attn     ~15 s (outside the budget)
  kernel_check           scripts/gpu_kernel_check.py as a child: compile the AOT PTX at
                         the ISA the build would choose, launch it as TensorRT does,
                         bf16/fp16 accuracy at awkward lengths (5 cases x 3 windows +
                         fp16), then speed vs PyTorch's varlen flash for 45 s [20 s]    <= 120 s [75 s]
  op_accuracy/...        ettin::varlen_attention on CUDA (auto backend and the Triton
                         kernel) against the CPU reference, fp32 (TF32 off) and bf16,
                         5 cases [3] x 2 windows                                      ~25 s [10 s]
  workload               NQ-like pairs (the project's nq-like length profile)        ~2 s
  packed/S, crossencoder/S  for S in 150m, 17m, 1b, 400m, 68m, 32m [the first three]: the packed
                         model (random weights built on the GPU, bf16; automatic backend and the
                         Triton kernel; end to end from text and model-only), then CrossEncoder
                         (bf16, SDPA, padded batches of 128) on the same pairs       25 s + 12-72 s per size
  Sum: ~15 + 120 + 25 + 2 + 6 x 25 + 172 = ~485 s. No step starts after --budget-s (420 s; quick 200 s)
  counted from the end of the imports, and each starts only when its estimate fits in what is left, so
  the run ends within 8 minutes and a timeout of 540 s leaves the rest of 15 device-minutes for the
  machine's start and a --quick rerun.
The dry run walks the same steps, case names and report keys on a CPU (one size, small cases): every
CUDA action goes through ettin_export.parity.devices' stand-ins. Its figures mean nothing; a dry run with
no failed step means the GPU run will not stop on a typo.
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
SIZE_ORDER = ("150m", "17m", "1b", "400m", "68m", "32m")  # most asked-about first
BATCH_TOKENS, BATCH_PAIRS = 65536, 256  # the packed model's batches (tokens, pairs)
CROSSENCODER_BATCH = 128
# The plan (docs/tensorrt.md, "One GPU call without TensorRT"): seconds by step on an H100, {quick: value}.
BUDGET_S = {False: 420.0, True: 200.0}  # no step starts later than this after the imports
KERNEL_BUDGET_S = {False: 45, True: 20}  # the child's speed steps, counted after its own imports
KERNEL_TIMEOUT_S = {False: 120, True: 75}  # the child's whole run: imports, compile, accuracy, speed
PACKED_ESTIMATE_S = 25.0  # build on the GPU + 2 backends x (end to end, model only)



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


def pairs_per_second(dev, fn, pairs: int, *, min_seconds: float, max_reps: int) -> dict:
    """Median wall time of fn() over repeated runs (bench.measure.time_repeated), as pairs/s."""
    from ettin_export.bench.measure import time_repeated

    timings = time_repeated(fn, min_seconds=min_seconds, max_reps=max_reps, sync=dev.synchronize)
    return {"pairs_per_s": round(pairs / timings.median, 1), "median_s": round(timings.median, 4),
            "runs": len(timings.seconds)}


# --- steps ----------------------------------------------------------------------------------------------


def kernel_check(out_dir: Path, entry: dict, *, quick: bool, dry_run: bool, timeout: float) -> None:
    """(a)+(b): the kernel's own script, as a child with its own time budget (counted after its imports)."""
    command = [sys.executable, str(REPO / "scripts" / "gpu_kernel_check.py"), str(out_dir)]
    command += ["--budget-s", str(KERNEL_BUDGET_S[quick])] + (["--dry-run"] if dry_run else [])
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


def op_accuracy(torch, report: Report, dev, quick: bool) -> None:
    from ettin_export.parity.kernel import QUICK_CASES, attention_accuracy, awkward_attention_cases, select_cases

    cases = awkward_attention_cases(seed=3, small=dev.dry_run)
    if quick:
        cases = select_cases(cases, QUICK_CASES)
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for name, lengths in cases.items():
            for window in (64, -1):
                with report.step(f"op_accuracy/{dtype_name}/{name}/window{window}") as entry:
                    result = attention_accuracy(torch, lengths, window, dtype, device=dev.name, reference_device="cpu",
                                                heads=12, seed=len(lengths) + window, backends=("auto", "triton"),
                                                cpu_standin=dev.dry_run)
                    entry.update(result)
                    entry["ok_override"] = bool(result.get("pass", True))


def build_packed_model(torch, size: str, device: str):
    """The exact Ettin config with random weights, made directly on the device (no checkpoint)."""
    from ettin_export.model import HeadConfig, PackedConfig, PackedReranker, init_random_weights, modernbert_config
    from ettin_export.synthetic.checkpoints import modernbert_config_dict

    config = PackedConfig.from_modernbert(modernbert_config(modernbert_config_dict(size)), HeadConfig())
    with torch.device("meta"):
        model = PackedReranker(config)
    model = model.to_empty(device=device)
    init_random_weights(model, seed=0)
    return model.to(torch.bfloat16).eval()


def packed_throughput(torch, report: Report, size: str, encoder, pairs, dev, quick: bool) -> None:
    with report.step(f"packed/{size}") as entry:
        try:
            entry.update(_measure_packed(torch, size, encoder, pairs, dev, quick))
        finally:
            _free(torch, dev)  # the model is gone with _measure_packed's frame


def _measure_packed(torch, size: str, encoder, pairs, dev, quick: bool) -> dict:
    from ettin_export.model.attention import attention_backend, cuda_attention_implementation
    from ettin_export.model.torch_reranker import TorchReranker
    from ettin_runtime.packing import packed_batches

    device = dev.name
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

    timing = {"min_seconds": 0.6 if quick else 1.2, "max_reps": 5}
    for backend in ("auto", "triton"):
        with attention_backend(backend):
            served = ("stand-in (dry run): the CPU reference" if dev.dry_run
                      else "ettin_plugins Triton kernel" if backend == "triton" else cuda_attention_implementation())
            result[backend] = {
                "attention": served,
                "end_to_end": pairs_per_second(dev, end_to_end, len(pairs), **timing),
                "model_only": pairs_per_second(dev, model_only, len(pairs), **timing),
            }
    return result


def crossencoder_throughput(torch, report: Report, size: str, pairs, dev, scratch: Path) -> None:
    """CrossEncoder (bf16, SDPA) on a saved random checkpoint of the size; the checkpoint is deleted after."""
    with report.step(f"crossencoder/{size}") as entry:
        folder = scratch / f"{size}-ckpt"
        try:
            _measure_crossencoder(torch, entry, size, pairs, dev, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            _free(torch, dev)


def _measure_crossencoder(torch, entry: dict, size: str, pairs, dev, folder: Path) -> None:
    """bench's own baseline (bench.measure.CrossEncoderContender), in bf16 on this GPU."""
    from ettin_export.bench.measure import CrossEncoderContender
    from ettin_export.synthetic.checkpoints import write_random_checkpoint

    start = time.time()
    write_random_checkpoint(folder, size, calibrate=False)
    entry["checkpoint_write_s"] = round(time.time() - start, 2)
    contender = CrossEncoderContender(str(folder), 512, CROSSENCODER_BATCH, dev.name, "bfloat16")
    entry["load_s"] = round(time.time() - start, 2)
    entry["baseline"] = contender.description
    entry["attention"] = (f"{contender.description['attention'] or 'default'} (padded batches of {CROSSENCODER_BATCH}, "
                          "no flash-attn on this machine)")
    entry["end_to_end"] = pairs_per_second(dev, lambda: contender.predict(pairs), len(pairs), min_seconds=1.0,
                                           max_reps=4)


def _free(torch, dev) -> None:
    gc.collect()
    if not dev.dry_run:
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
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU: every step, with stand-ins for CUDA (ettin_export.parity.devices), at toy scale")
    parser.add_argument("--quick", action="store_true", help="shorter: fewer pairs, cases and sizes")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"start no step after this many seconds, counted from the end of the imports "
                        f"({BUDGET_S[False]:.0f}; quick {BUDGET_S[True]:.0f})")
    parser.add_argument("--pairs", type=int, default=None, help="NQ-like pairs per measurement (2048; quick 1024)")
    parser.add_argument("--sizes", default=",".join(SIZES), help="sizes, comma-separated (measured in the order "
                        + ", ".join(SIZE_ORDER) + ")")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: this script compiles the kernel")
    sizes_wanted = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes_wanted if s not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; choose from {', '.join(SIZES)}")
    budget = args.budget_s or BUDGET_S[args.quick]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = Report(args.out_dir / "gpu_check.json", budget)
    report.data["args"] = {**vars(args), "out_dir": str(args.out_dir), "budget_s": budget}

    import torch

    from ettin_export.parity.devices import device_for

    with report.step("environment") as entry:
        environment(torch, entry)
    report.start_budget()  # the imports above are not the steps' time
    dev = device_for(torch, args.dry_run)
    report.data["device"] = dev.name
    order = [s for s in SIZE_ORDER if s in sizes_wanted]
    if dev.dry_run:  # the smallest wanted size only: the same loop, at CPU scale
        order = [min(order, key=SIZES.index)] if order else []
    elif args.quick:
        order = order[:3]
    pair_count = args.pairs or (16 if dev.dry_run else 1024 if args.quick else 2048)

    with report.step("kernel_check") as entry:
        kernel_check(args.out_dir, entry, quick=args.quick, dry_run=dev.dry_run, timeout=KERNEL_TIMEOUT_S[args.quick])

    if not dev.dry_run:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    op_accuracy(torch, report, dev, args.quick)

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
        # Size by size, the packed model and then CrossEncoder on the same pairs: a cut run keeps ratios.
        for size in order:
            estimate = PACKED_ESTIMATE_S
            if report.remaining() < estimate:
                report.skip(f"packed/{size}", f"time budget: needs ~{estimate:.0f} s, {report.remaining():.0f} s left")
            else:
                packed_throughput(torch, report, size, encoder, pairs, dev, args.quick)
            estimate = crossencoder_estimate_s(size)
            if report.remaining() < estimate:
                report.skip(f"crossencoder/{size}",
                            f"time budget: needs ~{estimate:.0f} s, {report.remaining():.0f} s left")
            else:
                crossencoder_throughput(torch, report, size, pairs, dev, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    steps = report.data["steps"]
    report.data["summary"] = summarize(steps, dev.name)
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
