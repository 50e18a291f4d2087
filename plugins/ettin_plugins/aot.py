"""Ahead-of-time compile of the varlen-attention kernel to PTX, with its launch contract as plain data.

TensorRT-free and GPU-free: `triton.compile` with an explicit `GPUTarget` runs on a CPU. What comes out
is everything a launcher needs (TensorRT's AOT plugin, or a cuda-python / CuPy test launch): the entry
name, the PTX, the declared parameters in order, and launch formulas over shape values that work on
plain ints and on `tensorrt.plugin` shape expressions alike.

TensorRT passes exactly the declared arguments (inputs, int32 extra scalars, outputs). Triton appends
hidden trailing pointer parameters to every entry (global and profile scratch, triton >= 3.5);
`verify_entry` proves they are never read, so leaving them unset is safe.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from .spec import HEAD_DIM, INPUTS, OUTPUTS

DTYPES = ("bf16", "fp16", "fp32")
# Target presets a user may name (`ettin-export build --target h100`); Triton emits sm_90a for 90.
TARGET_PRESETS = {
    "h100": 90, "h200": 90, "hopper": 90, "gh200": 90,
    "a100": 80, "a10": 86, "a10g": 86, "l4": 89, "l40s": 89,
}
DEFAULT_TARGET = "sm_90a"
# A launch may use up to 48 KiB of dynamic shared memory without cuFuncSetAttribute; nothing says that
# TensorRT raises the limit for AOT plugin kernels, so every variant offered to it stays within this.
SHARED_MEM_LIMIT = 48 * 1024


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch shape of one compiled variant (one TensorRT tactic)."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2  # 3 stages need 64 KiB of shared memory at 128 x 64 (over SHARED_MEM_LIMIT)


# TensorRT times every tactic at build time and keeps the fastest, so the defaults travel with two
# neighbours instead of a guess. Tactic ids must be positive; all fit SHARED_MEM_LIMIT at D = 64
# (48, 40 and 40 KiB with triton 3.9).
TACTICS: dict[int, KernelConfig] = {
    1: KernelConfig(128, 64, 4, 2),
    2: KernelConfig(64, 64, 4, 2),
    3: KernelConfig(128, 32, 4, 3),
}


@dataclass(frozen=True)
class KernelParam:
    """One declared kernel parameter, in launch order."""

    name: str
    role: str  # "input" | "scalar" | "output"
    triton_type: str  # "*bf16", "*i32", "i32", ...

    @property
    def is_pointer(self) -> bool:
        return self.triton_type.startswith("*")

    @property
    def ptx_types(self) -> tuple[str, ...]:
        """PTX .param types this parameter may be declared with."""
        return ("u64", "b64") if self.is_pointer else ("u32", "s32", "b32")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def shape_values(q_shape, cu_seqlens_shape) -> tuple[Any, Any, Any]:
    """(T, B, H) from the input shapes; works on ints and on TensorRT shape expressions
    (which support `-` with the expression on the left, hence `shape[0] - 1`)."""
    return q_shape[0], cu_seqlens_shape[0] - 1, q_shape[1]


@dataclass(frozen=True)
class LaunchFormulas:
    """Launch geometry as functions of shape values (T, B, H) only.

    `cdiv` is passed in so the same formula evaluates on ints (default) and on `tensorrt.plugin`
    shape expressions (`trtp.cdiv`). Expressions keep the symbolic operand on the left, because
    TensorRT's ShapeExpr has no reflected operators.
    """

    block_m: int
    num_warps: int
    shared_mem: int

    def grid(self, total_tokens, num_pairs, num_heads, cdiv: Callable = ceil_div) -> tuple:
        # Each pair of length L needs cdiv(L, BLOCK_M) tiles; their sum is <= cdiv(T, BLOCK_M) + B.
        return (cdiv(total_tokens, self.block_m) + num_pairs, num_heads, 1)

    def block(self) -> tuple[int, int, int]:
        return (self.num_warps * 32, 1, 1)

    def scalar_args(self, total_tokens, num_pairs, num_heads) -> tuple:
        """Values of the declared int32 scalars, in order (here only num_pairs = B)."""
        return (num_pairs,)


@dataclass(frozen=True)
class CompiledKernel:
    name: str  # the PTX .entry name
    ptx: str
    ptx_version: str  # from the `.version` line, e.g. "8.7"
    target: str  # from the `.target` line, e.g. "sm_90a"
    dtype: str
    window: int
    head_dim: int
    config: KernelConfig
    params: tuple[KernelParam, ...]
    launch: LaunchFormulas
    scratch: dict = field(default_factory=dict)  # scratch sizes from Triton's metadata (must be 0)
    triton_version: str = ""


@dataclass(frozen=True)
class EntryCheck:
    """What `verify_entry` found in the PTX .entry."""

    declared: tuple[str, ...]  # PTX types of the declared (leading) parameters
    hidden: tuple[str, ...]  # PTX types of the trailing parameters Triton added


class AotContractError(RuntimeError):
    """The compiled PTX cannot be launched with the declared arguments alone."""


def declared_params(dtype: str) -> tuple[KernelParam, ...]:
    """The kernel's runtime parameters in launch order: inputs, int32 scalars, outputs."""
    element = f"*{dtype}"
    inputs = [KernelParam(f"{n}_ptr", "input", "*i32" if n == "cu_seqlens" else element) for n in INPUTS]
    scalars = [KernelParam("num_pairs", "scalar", "i32")]
    outputs = [KernelParam(f"{n}_ptr", "output", element) for n in OUTPUTS]
    return tuple(inputs + scalars + outputs)


def parse_target(target: str | int) -> int:
    """Compute capability (e.g. 90) from "sm_90a", "sm_90", "90", 90 or a preset such as "h100"."""
    if isinstance(target, int):
        return target
    key = target.strip().lower()
    if key in TARGET_PRESETS:
        return TARGET_PRESETS[key]
    match = re.fullmatch(r"(?:sm_?)?(\d{2,3})a?", key)
    if not match:
        raise ValueError(
            f"Unknown target {target!r}: use a compute capability such as 'sm_90a' or 90, "
            f"or one of the presets {sorted(TARGET_PRESETS)}."
        )
    return int(match.group(1))


def _import_triton():
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        raise ImportError(
            "The AOT compile step needs OpenAI Triton: `pip install triton` "
            "(or `pip install ettin-export[kernel]`). No GPU is needed to compile."
        ) from exc
    return triton, ASTSource, GPUTarget


def _ast_source(ASTSource, fn, signature: dict, constexprs: dict, attrs: dict):
    """ASTSource across Triton versions: 3.2 .. 3.9 take `constexprs=` by name, with constexpr
    parameters also listed in the signature as "constexpr"."""
    parameters = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" not in parameters:
        import triton

        raise RuntimeError(
            f"triton {triton.__version__} uses the pre-3.2 ASTSource(constants=...) interface; "
            "install triton >= 3.2 (`pip install -U triton`) for the AOT compile step."
        )
    full_signature = {**signature, **{name: "constexpr" for name in constexprs}}
    return ASTSource(fn, signature=full_signature, constexprs=constexprs, attrs=attrs)


@functools.lru_cache(maxsize=64)
def compile_varlen_attention(
    dtype: str = "bf16",
    window: int = -1,
    target: str | int = DEFAULT_TARGET,
    config: KernelConfig = KernelConfig(),
    head_dim: int = HEAD_DIM,
    ptx_version: int | None = None,
) -> CompiledKernel:
    """Compile one kernel variant (dtype, window, target, tiles) to PTX, on any machine.

    ptx_version (e.g. 84 for PTX ISA 8.4) lowers the `.version` line for older drivers: the driver
    that loads the PTX must support its ISA version. None keeps what the bundled ptxas supports.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}; got {dtype!r}.")
    if not isinstance(window, int) or window < -1:
        raise ValueError(f"window must be an int >= -1 (-1 = the whole pair); got {window!r}.")
    triton, ASTSource, GPUTarget = _import_triton()
    from .kernel import SUPPORTED_HEAD_DIMS, kernel_constexprs, varlen_attention_kernel

    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"Head dim {head_dim} is not supported; choose one of {SUPPORTED_HEAD_DIMS}.")
    if not isinstance(varlen_attention_kernel, triton.runtime.jit.JITFunction):
        raise RuntimeError(
            "The kernel was defined for Triton's interpreter (TRITON_INTERPRET=1 when ettin_plugins.kernel "
            "was imported) and cannot be compiled to PTX. Run the AOT step in a process without TRITON_INTERPRET."
        )
    params = declared_params(dtype)
    signature = {p.name: p.triton_type for p in params}
    constexprs = kernel_constexprs(head_dim, window, dtype, config.block_m, config.block_n)
    # Pointers are declared 16-byte aligned so loads vectorize: torch and TensorRT allocate with at
    # least 256-byte alignment. The int scalar gets no hint (B is any value).
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if p.is_pointer}
    source = _ast_source(ASTSource, varlen_attention_kernel, signature, constexprs, attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages, "enable_fp_fusion": True}
    if ptx_version is not None:
        options["ptx_version"] = ptx_version
    compiled = triton.compile(source, target=GPUTarget("cuda", parse_target(target), 32), options=options)

    ptx = compiled.asm["ptx"]
    metadata = compiled.metadata
    scratch = {
        key: int(getattr(metadata, key, 0) or 0) for key in ("global_scratch_size", "profile_scratch_size")
    }
    return CompiledKernel(
        name=metadata.name,
        ptx=ptx,
        ptx_version=_ptx_directive(ptx, "version"),
        target=_ptx_directive(ptx, "target"),
        dtype=dtype,
        window=window,
        head_dim=head_dim,
        config=config,
        params=params,
        launch=LaunchFormulas(config.block_m, metadata.num_warps, metadata.shared),
        scratch=scratch,
        triton_version=triton.__version__,
    )


def _ptx_directive(ptx: str, directive: str) -> str:
    match = re.search(rf"^\s*\.{directive}\s+(\S+)", ptx, flags=re.MULTILINE)
    if not match:
        raise AotContractError(f"The PTX has no .{directive} line; is it PTX at all?")
    return match.group(1).split(",")[0]


def parse_entry(ptx: str) -> tuple[str, list[tuple[str, str]]]:
    """(entry name, [(ptx type, param name), ...]) of the single .entry in the PTX."""
    entries = re.findall(r"\.visible\s+\.entry\s+(\w+)\s*\(([^)]*)\)", ptx)
    if len(entries) != 1:
        raise AotContractError(f"Expected exactly one .visible .entry in the PTX, found {len(entries)}.")
    name, body = entries[0]
    params = re.findall(r"\.param\s+\.(\w+)(?:\s+\.ptr)?(?:\s+\.global)?(?:\s+\.align\s+\d+)?\s+(\w+)", body)
    return name, params


def verify_entry(kernel: CompiledKernel) -> EntryCheck:
    """Check that the PTX launches with the declared arguments alone, as TensorRT launches it.

    - the .entry name is the kernel name, and the target is what was asked for;
    - the declared parameters are the LEADING .entry parameters, with matching PTX types;
    - every further (hidden) parameter is a pointer that the body never reads, and Triton reports
      no global or profile scratch memory, so nothing depends on the values TensorRT leaves unset;
    - the shared memory fits what a plain cuLaunchKernel may use (SHARED_MEM_LIMIT).
    """
    name, entry_params = parse_entry(kernel.ptx)
    if name != kernel.name:
        raise AotContractError(f"PTX entry is {name!r} but the kernel name is {kernel.name!r}.")
    if len(entry_params) < len(kernel.params):
        raise AotContractError(
            f"PTX entry {name} has {len(entry_params)} parameters, fewer than the "
            f"{len(kernel.params)} declared ({[p.name for p in kernel.params]})."
        )
    for index, (param, (ptx_type, _)) in enumerate(zip(kernel.params, entry_params)):
        if ptx_type not in param.ptx_types:
            raise AotContractError(
                f"Parameter {index} ({param.name}, {param.triton_type}) is .{ptx_type} in the PTX; "
                f"expected one of {param.ptx_types}. The kernel signature and the declared order disagree."
            )
    hidden = entry_params[len(kernel.params):]
    after_entry = kernel.ptx[kernel.ptx.index(f".entry {name}"):]
    body = after_entry[after_entry.index(")") + 1:]  # the code after the parameter list
    for ptx_type, param_name in hidden:
        if ptx_type not in ("u64", "b64"):
            raise AotContractError(f"Hidden trailing parameter {param_name} is .{ptx_type}, not a pointer.")
        if re.search(rf"\b{param_name}\b", body):
            raise AotContractError(
                f"The kernel body reads hidden parameter {param_name}, which TensorRT leaves unset: "
                "the kernel must not need global scratch (no device-side TMA descriptors, no printf)."
            )
    nonzero = {key: value for key, value in kernel.scratch.items() if value}
    if nonzero:
        raise AotContractError(f"Triton reports scratch memory {nonzero}; TensorRT AOT plugins cannot provide it.")
    if kernel.launch.shared_mem > SHARED_MEM_LIMIT:
        raise AotContractError(
            f"The kernel needs {kernel.launch.shared_mem} bytes of shared memory, over the {SHARED_MEM_LIMIT} a "
            f"launch gets without cuFuncSetAttribute; use fewer stages or smaller blocks than {kernel.config}."
        )
    return EntryCheck(declared=tuple(t for t, _ in entry_params[: len(kernel.params)]),
                      hidden=tuple(t for t, _ in hidden))
