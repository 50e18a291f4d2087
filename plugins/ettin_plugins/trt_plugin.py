"""TensorRT adapter: `ettin::VarlenAttention` as a Python plugin (tensorrt.plugin) with an AOT implementation.

A thin layer over aot.py: the registration describes the output, autotune offers bf16/fp16 with int32
cu_seqlens and one tactic per aot.TACTICS entry, and the AOT implementation hands TensorRT the PTX, the
launch formulas mapped onto TensorRT shape expressions, and the int32 extra arguments. The engine then
embeds the PTX and runs without Python. AOT only: there is no JIT implementation to fall back on.

Importable without TensorRT; `register()` imports it. No `from __future__ import annotations` here:
tensorrt.plugin inspects the annotations as classes (issubclass), not strings.

The `window` attribute is declared as a 1-D int32 array, not `int`: TensorRT's plugin creator rebuilds a
built-in-typed attribute as `annotation(field.data)`, and `field.data` is always a 1-D array (the ONNX
parser hands an INT attribute over as one kINT32 element), which NumPy >= 2.4 refuses to turn into an int.
An array-typed attribute is rebuilt as `field.data.astype(dtype)` on every TensorRT and NumPy, as in
NVIDIA's own AOT sample; `window_value` unwraps it.
"""

import inspect
from typing import List, Tuple, Union

import numpy as np
import numpy.typing as npt

from ettin_runtime.errors import MissingDependency

from . import aot, spec

_INSTALL_HINT = (
    "TensorRT is needed to register the ettin::VarlenAttention plugin. Install it from NVIDIA's index: "
    "`pip install tensorrt-cu12 --extra-index-url https://pypi.nvidia.com` (TensorRT >= 10.9 for AOT "
    "plugins), or use an NGC TensorRT / PyTorch container. PyPI alone only has a placeholder."
)
_state = {"registered": False, "target": None, "ptx_version": None}

# The plugin's attribute type (one int32 per attribute, as the ONNX parser sends an INT attribute).
IntAttribute = npt.NDArray[np.int32]


def window_value(window) -> int:
    """The window half-width from what TensorRT passes for the attribute: a 1-element integer array
    (a plain int is taken too, for direct calls)."""
    values = np.asarray(window)
    if values.size != 1 or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"VarlenAttention's window attribute must be one integer; TensorRT passed {window!r}.")
    return int(values.reshape(-1)[0])


def offered_tactics() -> list:
    """The kernel configurations offered to TensorRT's timer. One by default: NVIDIA's sample runner
    refused AOT with several tactics before 2026, so older TensorRT may reject a list. Set
    ETTIN_PLUGIN_TACTICS=all (or e.g. "1,2") to let TensorRT time several where it supports that."""
    import os

    choice = os.environ.get("ETTIN_PLUGIN_TACTICS", "").strip()
    if choice == "all":
        return list(aot.TACTICS)
    if choice:
        chosen = [int(t) for t in choice.split(",")]
        unknown = [t for t in chosen if t not in aot.TACTICS]
        if unknown:
            raise ValueError(f"ETTIN_PLUGIN_TACTICS names unknown tactics {unknown}; known: {sorted(aot.TACTICS)}.")
        return chosen
    return [min(aot.TACTICS)]


def _import_tensorrt():
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except (ImportError, OSError) as exc:  # OSError: bindings present but libnvinfer missing
        raise MissingDependency(f"{_INSTALL_HINT} ({type(exc).__name__}: {exc})") from exc
    if not hasattr(trtp, "aot_impl"):
        raise MissingDependency(f"TensorRT {trt.__version__} has no tensorrt.plugin.aot_impl (added in 10.9). {_INSTALL_HINT}")
    return trt, trtp


def _descriptor(TensorDesc):
    """The registration function, annotated with the given TensorDesc class (trtp.TensorDesc for
    TensorRT, a stand-in for reading the signature without it). Its parameters ARE the plugin's
    inputs and attributes: the ONNX node must carry exactly these attributes."""

    def varlen_attention_desc(
        q: TensorDesc, k: TensorDesc, v: TensorDesc, cu_seqlens: TensorDesc, window: IntAttribute
    ) -> TensorDesc:
        return q.like()  # [T, H, D] in q's dtype

    return varlen_attention_desc


class _TensorDescStandIn:
    pass


def _signature_split() -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    parameters = inspect.signature(_descriptor(_TensorDescStandIn)).parameters.values()
    inputs = tuple(p.name for p in parameters if p.annotation is _TensorDescStandIn)
    attributes = tuple(p.name for p in parameters if p.annotation is not _TensorDescStandIn)
    return inputs, attributes


def registered_input_names() -> Tuple[str, ...]:
    """Tensor inputs of the registered plugin, in order (read from the registration function)."""
    return _signature_split()[0]


def registered_attribute_names() -> Tuple[str, ...]:
    """Attributes of the registered plugin, in order (read from the registration function)."""
    return _signature_split()[1]


def _resolve_target():
    """The GPU to compile for: the explicit target given to register(), else the current device
    (a TensorRT build always has one)."""
    if _state["target"] is not None:
        return _state["target"]
    try:
        from triton.runtime import driver

        return driver.active.get_current_target().arch
    except Exception:  # noqa: BLE001 - any failure here means "ask torch, then the user"
        pass
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return major * 10 + minor
    except ImportError:
        pass
    raise RuntimeError(
        "Cannot tell which GPU to compile the VarlenAttention kernel for: no CUDA device is visible to "
        "Triton or PyTorch. Call ettin_plugins.trt_plugin.register(target='sm_90a') (or a preset such as 'h100')."
    )


def _is_defined(trtp) -> bool:
    namespace = getattr(trtp.op, spec.PLUGIN_NAMESPACE, None)
    return namespace is not None and hasattr(namespace, spec.OP_NAME)


def register(target: Union[str, int, None] = None, ptx_version: Union[int, None] = None) -> str:
    """Register the plugin with TensorRT (idempotent) and return its id.

    Import-and-call this before parsing the ONNX file or building the network. `target` picks the GPU
    the PTX is compiled for (default: the current device at build time); `ptx_version` (e.g. 84) the PTX
    ISA version written into it, which the driver that runs the engine must accept (default: whatever
    Triton's bundled ptxas writes; `ettin-export build` always passes the one its preflight chose).
    Both apply to every kernel compiled after the call.
    """
    trt, trtp = _import_tensorrt()
    if target is not None:
        _state["target"] = aot.parse_target(target)
    if ptx_version is not None:
        _state["ptx_version"] = int(ptx_version)
    if _state["registered"] or _is_defined(trtp):
        _state["registered"] = True
        return spec.PLUGIN_ID

    dtype_names = {trt.bfloat16: "bf16", trt.float16: "fp16", trt.float32: "fp32"}
    trtp.register(spec.PLUGIN_ID)(_descriptor(trtp.TensorDesc))

    @trtp.autotune(spec.PLUGIN_ID)
    def varlen_attention_autotune(
        q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, cu_seqlens: trtp.TensorDesc,
        outputs: Tuple[trtp.TensorDesc],
    ) -> List[trtp.AutoTuneCombination]:
        # "|" ties q, k, v and out to one type; cu_seqlens is always int32. TensorRT times each tactic offered.
        return [trtp.AutoTuneCombination("BF16|FP16, BF16|FP16, BF16|FP16, INT32, BF16|FP16", "LINEAR", offered_tactics())]

    @trtp.aot_impl(spec.PLUGIN_ID)
    def varlen_attention_aot_impl(
        q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, cu_seqlens: trtp.TensorDesc,
        window: IntAttribute, outputs: Tuple[trtp.TensorDesc], tactic: int,
    ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
        if q.dtype not in dtype_names:
            raise TypeError(f"VarlenAttention supports bf16, fp16 and fp32 q/k/v; TensorRT asked for {q.dtype}.")
        head_dim = int(q.shape[2])
        if head_dim < 0:
            raise ValueError("VarlenAttention needs a static head dimension (q's last axis); it is dynamic here.")
        # Tactic 0 is TensorRT's default when no custom tactic is chosen.
        config = aot.TACTICS.get(int(tactic), aot.TACTICS[min(aot.TACTICS)])
        kernel = aot.compile_varlen_attention(dtype_names[q.dtype], window_value(window), _resolve_target(), config, head_dim,
                                              _state["ptx_version"])
        aot.verify_entry(kernel)  # exactly the parameters TensorRT passes, under this variant's own name

        total_tokens, num_pairs, num_heads = aot.shape_values(q.shape_expr, cu_seqlens.shape_expr)
        launch = trtp.KernelLaunchParams()
        launch.grid_x, launch.grid_y, launch.grid_z = kernel.launch.grid(
            total_tokens, num_pairs, num_heads, cdiv=trtp.cdiv
        )
        launch.block_x, launch.block_y, launch.block_z = kernel.launch.block()
        launch.shared_mem = kernel.launch.shared_mem
        extra_args = trtp.SymIntExprs.from_tuple(
            [trtp.SymInt32(value) for value in kernel.launch.scalar_args(total_tokens, num_pairs, num_heads)]
        )
        return kernel.name, kernel.ptx, launch, extra_args

    _state["registered"] = True
    return spec.PLUGIN_ID
