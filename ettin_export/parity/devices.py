"""Where the prepared GPU scripts run: a CUDA device, or CPU stand-ins for their dry run.

scripts/gpu_kernel_check.py and scripts/gpu_check.py take every GPU-only action through one of these
objects (moving tensors, synchronizing, timing, launching the AOT PTX, Triton's JIT kernel, PyTorch's
varlen attention, the driver probe), so the dry run on a CPU walks the same steps, case names and report
keys as the one GPU run. The stand-ins check what can be checked without a GPU — that every kernel
argument is bound as TensorRT binds it, and the launch grid follows the kernel's own formulas — and
compute their outputs with the fp32 reference: a dry run's errors and timings prove nothing about the
kernel, only that the run reaches its end.
"""

from __future__ import annotations

import inspect
import math
import statistics
import time


class CudaDevice:
    """The real thing: tensors on CUDA, CUDA events, the given launchers."""

    name = "cuda"
    dry_run = False

    def __init__(self, torch):
        self.torch = torch

    def put(self, tensor):
        return tensor.to("cuda")

    def synchronize(self) -> None:
        self.torch.cuda.synchronize()

    def stream(self) -> int:
        return self.torch.cuda.current_stream().cuda_stream

    def launchers(self, candidates):
        return candidates

    def jit_attention(self, q, k, v, cu_seqlens, window, config):
        from ettin_plugins.kernel import varlen_attention

        return varlen_attention(q, k, v, cu_seqlens, window, block_m=config.block_m, block_n=config.block_n,
                                num_warps=config.num_warps, num_stages=config.num_stages)

    def torch_varlen(self):
        """(varlen_attn, its signature text, whether it takes window_size), or None when absent."""
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            return None
        signature = inspect.signature(varlen_attn)
        return varlen_attn, str(signature), "window_size" in signature.parameters

    def probe_gpu(self):
        from ettin_runtime.backends.tensorrt import probe_gpu

        return probe_gpu(0)

    def time_ms(self, fn, warmup: int, runs: int) -> float:
        """Median of CUDA-event timings; the GPU is kept busy while Python enqueues, so host-side launch
        cost is not counted."""
        torch = self.torch
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if hasattr(torch.cuda, "_sleep"):
                torch.cuda._sleep(200_000)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


class StandInLauncher:
    """Stands in for the driver's cuModuleLoadData + cuLaunchKernel: checks the call as TensorRT would
    make it (every declared parameter bound, pointers to the named tensors, the int32 scalars and the
    grid from the kernel's own formulas), then writes the fp32 reference, rounded, into `out`."""

    name = "stand-in (dry run): argument and grid checks, output from the fp32 reference"

    def prepare(self, kernel, args, grid, block, shared, stream, *, tensors):
        from ettin_plugins import aot

        from ettin_export.model.attention import reference_varlen_attention

        if len(args) != len(kernel.params):
            raise RuntimeError(f"{kernel.name}: {len(args)} arguments bound, the entry declares {len(kernel.params)}")
        q, cu_seqlens = tensors["q_ptr"], tensors["cu_seqlens_ptr"]
        total, pairs, heads = aot.shape_values(tuple(q.shape), tuple(cu_seqlens.shape))
        scalars = iter(kernel.launch.scalar_args(total, pairs, heads))
        for (kind, value), param in zip(args, kernel.params):
            if param.is_pointer:
                if kind != "ptr" or value != tensors[param.name].data_ptr():
                    raise RuntimeError(f"{kernel.name}: parameter {param.name} is not bound to its tensor")
            elif kind != "i32" or value != int(next(scalars)):
                raise RuntimeError(f"{kernel.name}: scalar parameter {param.name} bound to {value!r}")
        if tuple(grid) != tuple(kernel.launch.grid(total, pairs, heads)) or tuple(block) != tuple(kernel.launch.block()):
            raise RuntimeError(f"{kernel.name}: grid {grid} / block {block} do not follow the kernel's formulas")
        if shared != kernel.launch.shared_mem:
            raise RuntimeError(f"{kernel.name}: {shared} bytes of shared memory, the kernel needs {kernel.launch.shared_mem}")
        k, v, out = tensors["k_ptr"], tensors["v_ptr"], tensors["out_ptr"]

        def launch():
            out.copy_(reference_varlen_attention(q.float(), k.float(), v.float(), cu_seqlens, kernel.window).to(out.dtype))

        return launch


def standin_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
    """Takes the arguments of torch.nn.attention.varlen.varlen_attn (as the scripts call it) and
    answers with PyTorch's own attention in the inputs' precision."""
    from ettin_export.model.attention import reference_varlen_attention

    if scale is not None and not math.isclose(scale, 1.0 / math.sqrt(query.shape[-1])):
        raise ValueError(f"stand-in varlen_attn: scale {scale} is not 1/sqrt(head dim)")
    if window_size[0] != window_size[1]:
        raise ValueError(f"stand-in varlen_attn: asymmetric window {window_size}")
    return reference_varlen_attention(query, key, value, cu_seq_q, window_size[0], exact=False)


class StandInDevice:
    """CPU stand-ins for every CUDA action of the GPU scripts (see the module's docstring)."""

    name = "cpu"
    dry_run = True
    # The driver it pretends to have: CUDA 12.0, the oldest that runs an sm_90a build, so the PTX ISA the
    # build's own rule chooses for it is 8.0, sm_90a's floor.
    driver_version, cuda_driver_version = "525.60.13", 12000

    def __init__(self, torch):
        self.torch = torch

    def put(self, tensor):
        return tensor

    def synchronize(self) -> None:
        pass

    def stream(self) -> int:
        return 0

    def launchers(self, candidates):
        return (StandInLauncher,)

    def jit_attention(self, q, k, v, cu_seqlens, window, config):
        from ettin_export.model.attention import reference_varlen_attention

        return reference_varlen_attention(q.float(), k.float(), v.float(), cu_seqlens, window).to(q.dtype)

    def torch_varlen(self):
        return standin_varlen_attn, str(inspect.signature(standin_varlen_attn)), True

    def probe_gpu(self):
        from ettin_runtime.backends.tensorrt import GpuInfo

        return GpuInfo("stand-in H100 (dry run)", (9, 0), self.driver_version, self.cuda_driver_version)

    def time_ms(self, fn, warmup: int, runs: int) -> float:
        """Wall time of a few calls: the timing path runs, the figure means nothing (no GPU)."""
        fn()
        times = []
        for _ in range(min(runs, 2)):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)


def device_for(torch, dry_run: bool):
    """CUDA when there is a device and no dry run was asked for, else the stand-ins."""
    return CudaDevice(torch) if torch.cuda.is_available() and not dry_run else StandInDevice(torch)
