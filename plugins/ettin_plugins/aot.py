"""Ahead-of-time compile of the varlen-attention kernel to PTX, with its launch contract as plain data.

TensorRT-free and GPU-free: `triton.compile` with an explicit `GPUTarget` runs on a CPU. What comes out
is everything a launcher needs (TensorRT's AOT plugin, or a cuda-python / CuPy test launch): the entry
name, the PTX, the declared parameters in order, and launch formulas over shape values that work on
plain ints and on `tensorrt.plugin` shape expressions alike.

The PTX handed out is rewritten from Triton's in two ways, so that it matches how TensorRT launches it:
- TensorRT passes exactly the declared arguments (inputs, int32 extra scalars, outputs). Triton appends
  hidden trailing pointer parameters to every entry (global and profile scratch, triton >= 3.5). The
  compile proves the body never reads them and Triton reports no scratch memory, then removes them from
  the `.entry`, so the entry declares exactly what TensorRT passes.
- Triton names every entry after the Python function. Each variant (dtype, window, head dim, tiles)
  gets its own entry name instead (`entry_name`), so no two kernels of one engine share a name.

The PTX ISA version (`.version`) must be one the loading driver accepts: `ptx_version` lowers it from
what Triton's bundled ptxas would write (the build chooses it from the driver; see
ettin_export.tensorrt_build.kernel_ptx_version).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from ettin_runtime.errors import MissingDependency

from .spec import HEAD_DIM, INPUTS, OUTPUTS

DTYPES = ("bf16", "fp16", "fp32")
# Target presets a user may name (`ettin-export build --target h100`); Triton emits sm_90a for 90.
TARGET_PRESETS = {
    "h100": 90, "h200": 90, "hopper": 90, "gh200": 90,
    "a100": 80, "a10": 86, "a10g": 86, "l4": 89, "l40s": 89,
}
DEFAULT_TARGET = "sm_90a"
# The OpenAI Triton releases this compile step is written for. The floor: ASTSource's `attrs` in the
# dict form used below ({(index,): [[name, value]]}) needs 3.3. The ceiling: every minor release so far
# has changed something this file depends on (hidden entry parameters, where the PTX version comes
# from), so a new one is admitted only after its PTX passed tests/test_aot.py. pyproject.toml's
# `kernel` extra states the same range (a test keeps the two equal).
TRITON_RANGE = ((3, 3), (3, 10))  # [lowest, first unsupported), as (major, minor)
TRITON_REQUIREMENT = "triton>=3.3,<3.10"
# The lowest PTX ISA version each architecture accepts (PTX ISA "Target ISA notes"; checked against
# triton 3.9's LLVM and ptxas, which refuse one below): a lower ptx_version is refused here, because
# LLVM aborts the whole process on it.
MIN_PTX_FOR_ARCH = {80: 70, 86: 71, 89: 78, 90: 80}
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
    hidden: tuple[str, ...] = ()  # PTX types of Triton's hidden trailing parameters, removed from the entry
    triton_name: str = ""  # the entry name Triton gave it, before renaming


@dataclass(frozen=True)
class EntryCheck:
    """What `verify_entry` found in the PTX .entry."""

    declared: tuple[str, ...]  # PTX types of the entry's parameters: exactly the declared ones
    hidden: tuple[str, ...]  # PTX types of the hidden parameters Triton had added (removed from the entry)


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


def triton_version_problem(version: str) -> str | None:
    """Why this OpenAI Triton cannot run the AOT compile (None when it can)."""
    match = re.match(r"(\d+)\.(\d+)", str(version))
    (low, high), wanted = TRITON_RANGE, TRITON_REQUIREMENT.removeprefix("triton")
    if match and low <= (int(match.group(1)), int(match.group(2))) < high:
        return None
    return (f"OpenAI Triton {version} is outside the range the AOT compile step supports ({wanted}): older "
            "releases lack the ASTSource interface it uses, newer ones are not yet checked for the kernel "
            f"entry it rewrites. Install a supported one: pip install '{TRITON_REQUIREMENT}'.")


class TritonVersionError(MissingDependency):
    """The installed OpenAI Triton is outside TRITON_RANGE (an ImportError: as good as not installed)."""


def _import_triton():
    try:
        import triton
    except ImportError as exc:
        raise MissingDependency(
            f"The AOT compile step needs OpenAI Triton: pip install '{TRITON_REQUIREMENT}' "
            "(or `pip install ettin-export[kernel]`). No GPU is needed to compile."
        ) from exc
    problem = triton_version_problem(getattr(triton, "__version__", "(unknown version)"))
    if problem:
        raise TritonVersionError(problem)
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    return triton, ASTSource, GPUTarget


def ptx_version_text(version: int) -> str:
    """84 -> "8.4" (Triton's integer form -> the PTX `.version` form)."""
    return f"{version // 10}.{version % 10}"


def ptx_version_number(text: str) -> int:
    """"8.4" -> 84."""
    major, _, minor = str(text).partition(".")
    return int(major) * 10 + int(minor or 0)


def min_ptx_version(target: str | int) -> int:
    """The lowest PTX ISA version (e.g. 80) the target architecture accepts."""
    arch = parse_target(target)
    if arch not in MIN_PTX_FOR_ARCH:
        raise ValueError(f"No lowest PTX ISA version is recorded for sm_{arch}; add it to MIN_PTX_FOR_ARCH "
                         f"(known: {sorted(MIN_PTX_FOR_ARCH)}).")
    return MIN_PTX_FOR_ARCH[arch]


def triton_default_ptx_version(target: str | int = DEFAULT_TARGET) -> int:
    """The PTX ISA version Triton writes for this target when not told otherwise (e.g. 94 with triton
    3.9, whose bundled ptxas for sm_90 is CUDA 13.4): what its own compiler derives from that ptxas."""
    _import_triton()
    try:
        from triton.backends.nvidia import compiler as nvidia

        return int(nvidia.get_ptx_version_from_options(nvidia.CUDAOptions(), parse_target(target)))
    except (ImportError, AttributeError, TypeError):  # a release that derives it elsewhere: ask a compile
        return ptx_version_number(compile_varlen_attention("bf16", -1, target).ptx_version)


def entry_name(dtype: str, window: int, head_dim: int, config: KernelConfig) -> str:
    """The PTX entry name of one variant, unique per (dtype, window, head dim, tiles)."""
    span = "global" if window < 0 else f"window{window}"
    tiles = f"m{config.block_m}n{config.block_n}w{config.num_warps}s{config.num_stages}"
    return f"ettin_varlen_attention_{dtype}_{span}_d{head_dim}_{tiles}"


def _ast_source(ASTSource, fn, signature: dict, constexprs: dict, attrs: dict):
    """ASTSource as triton >= 3.3 takes it: constexpr parameters are listed in the signature as
    "constexpr" and their values passed by name."""
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
    """Compile one kernel variant (dtype, window, target, tiles) to PTX, on any machine, and rewrite its
    entry to the launch contract: exactly the declared parameters, under `entry_name(...)`.

    ptx_version (e.g. 84 for PTX ISA 8.4) lowers the `.version` line for older drivers: the driver
    that loads the PTX must support its ISA version. None keeps what Triton's bundled ptxas writes.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}; got {dtype!r}.")
    if not isinstance(window, int) or window < -1:
        raise ValueError(f"window must be an int >= -1 (-1 = the whole pair); got {window!r}.")
    if ptx_version is not None and ptx_version < min_ptx_version(target):
        raise ValueError(
            f"PTX ISA {ptx_version_text(ptx_version)} is below what sm_{parse_target(target)} accepts "
            f"({ptx_version_text(min_ptx_version(target))}); a driver that old cannot run this GPU's kernels."
        )
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

    metadata = compiled.metadata
    scratch = {
        key: int(getattr(metadata, key, 0) or 0) for key in ("global_scratch_size", "profile_scratch_size")
    }
    nonzero = {key: value for key, value in scratch.items() if value}
    if nonzero:
        raise AotContractError(f"Triton reports scratch memory {nonzero} for this kernel; TensorRT AOT plugins "
                               "cannot provide it (no device-side TMA descriptors, no printf in the kernel).")
    ptx, hidden = strip_hidden_parameters(compiled.asm["ptx"], len(params))
    name = entry_name(dtype, window, head_dim, config)
    ptx = rename_entry(ptx, name)
    return CompiledKernel(
        name=name,
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
        hidden=hidden,
        triton_name=metadata.name,
    )


def _ptx_directive(ptx: str, directive: str) -> str:
    match = re.search(rf"^\s*\.{directive}\s+(\S+)", ptx, flags=re.MULTILINE)
    if not match:
        raise AotContractError(f"The PTX has no .{directive} line; is it PTX at all?")
    return match.group(1).split(",")[0]


_ENTRY = re.compile(r"\.visible\s+\.entry\s+(\w+)\s*\(([^)]*)\)")
_PARAM = re.compile(r"\.param\s+\.(\w+)(?:\s+\.ptr)?(?:\s+\.global)?(?:\s+\.align\s+\d+)?\s+(\w+)")


def _single_entry(ptx: str) -> re.Match:
    entries = list(_ENTRY.finditer(ptx))
    if len(entries) != 1:
        raise AotContractError(f"Expected exactly one .visible .entry in the PTX, found {len(entries)}.")
    return entries[0]


def parse_entry(ptx: str) -> tuple[str, list[tuple[str, str]]]:
    """(entry name, [(ptx type, param name), ...]) of the single .entry in the PTX."""
    entry = _single_entry(ptx)
    return entry.group(1), _PARAM.findall(entry.group(2))


def strip_hidden_parameters(ptx: str, declared: int) -> tuple[str, tuple[str, ...]]:
    """Remove the parameters past the first `declared` from the entry, once it is proven that the body
    never reads them; returns (the PTX, the PTX types removed). Raises AotContractError otherwise.

    TensorRT passes inputs, extra scalars and outputs, nothing else; whether it tolerates an entry that
    declares more is not documented, so the entry is made to declare exactly that."""
    entry = _single_entry(ptx)
    declarations = [d.strip() for d in entry.group(2).split(",") if d.strip()]
    params = [_PARAM.search(d) for d in declarations]
    if len(params) < declared or not all(params):
        raise AotContractError(
            f"PTX entry {entry.group(1)} declares {len(declarations)} parameters, which are not the {declared} "
            "the kernel signature names followed by Triton's hidden pointers."
        )
    body = ptx[entry.end():]
    hidden = [(m.group(1), m.group(2)) for m in params[declared:]]
    for ptx_type, param_name in hidden:
        if ptx_type not in ("u64", "b64"):
            raise AotContractError(f"Hidden trailing parameter {param_name} is .{ptx_type}, not a pointer.")
        if re.search(rf"\b{param_name}\b", body):
            raise AotContractError(
                f"The kernel body reads hidden parameter {param_name}, which TensorRT does not pass: the kernel "
                "must not need global scratch (no device-side TMA descriptors, no printf)."
            )
    kept = "\n\t" + ",\n\t".join(declarations[:declared]) + "\n"
    return ptx[: entry.start(2)] + kept + ptx[entry.end(2):], tuple(t for t, _ in hidden)


def rename_entry(ptx: str, new_name: str) -> str:
    """The PTX with its entry, and every reference to it (its parameters `<name>_param_<i>`, the
    `.globl` note), renamed to `new_name`."""
    old_name, _ = parse_entry(ptx)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", new_name):
        raise ValueError(f"{new_name!r} is not a PTX identifier.")
    renamed = re.sub(rf"\b{re.escape(old_name)}(?=_param_\d+\b|\b)", new_name, ptx)
    if re.search(rf"\b{re.escape(old_name)}(?:_param_\d+)?\b", renamed) or parse_entry(renamed)[0] != new_name:
        raise AotContractError(f"Renaming entry {old_name} to {new_name} left references to the old name.")
    return renamed


def verify_entry(kernel: CompiledKernel) -> EntryCheck:
    """Check that the PTX launches with the declared arguments alone, as TensorRT launches it.

    - the .entry is named `entry_name(...)` of this variant (and is the kernel's name);
    - it declares exactly the kernel's parameters, in order, with matching PTX types (inputs, int32
      scalars, outputs: what TensorRT passes), and nothing after them;
    - Triton reports no global or profile scratch memory;
    - the shared memory fits what a plain cuLaunchKernel may use (SHARED_MEM_LIMIT).
    """
    name, entry_params = parse_entry(kernel.ptx)
    expected_name = entry_name(kernel.dtype, kernel.window, kernel.head_dim, kernel.config)
    if name != kernel.name or name != expected_name:
        raise AotContractError(f"PTX entry is {name!r}; the kernel is {kernel.name!r} and its variant's entry name "
                               f"is {expected_name!r}.")
    if len(entry_params) != len(kernel.params):
        raise AotContractError(
            f"PTX entry {name} declares {len(entry_params)} parameters; TensorRT passes exactly the "
            f"{len(kernel.params)} declared ({[p.name for p in kernel.params]})."
        )
    for index, (param, (ptx_type, _)) in enumerate(zip(kernel.params, entry_params)):
        if ptx_type not in param.ptx_types:
            raise AotContractError(
                f"Parameter {index} ({param.name}, {param.triton_type}) is .{ptx_type} in the PTX; "
                f"expected one of {param.ptx_types}. The kernel signature and the declared order disagree."
            )
    nonzero = {key: value for key, value in kernel.scratch.items() if value}
    if nonzero:
        raise AotContractError(f"Triton reports scratch memory {nonzero}; TensorRT AOT plugins cannot provide it.")
    if kernel.launch.shared_mem > SHARED_MEM_LIMIT:
        raise AotContractError(
            f"The kernel needs {kernel.launch.shared_mem} bytes of shared memory, over the {SHARED_MEM_LIMIT} a "
            f"launch gets without cuFuncSetAttribute; use fewer stages or smaller blocks than {kernel.config}."
        )
    return EntryCheck(declared=tuple(t for t, _ in entry_params), hidden=kernel.hidden)
