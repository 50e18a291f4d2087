"""OpenVINO: an artifact's model.onnx behind the common Reranker contract, in fp32 or bf16.

OpenVINO's ONNX frontend has no conversion rule for the custom-domain `ettin::VarlenAttention` node and
does not expand model-local functions ("No conversion rule found for operations: ettin.VarlenAttention",
OpenVINO 2026.4), so the graph is read with its local functions inlined (onnx.inliner) in memory: the
file on disk stays the one graph every runtime reads, and the attention runs as the function's standard
ops. A bf16 artifact is that same fp32 graph compiled with INFERENCE_PRECISION_HINT=bf16 (matrix products
in bf16 on AVX512_BF16 / AMX; OpenVINO keeps its own choice of what stays in fp32).

No torch. One compiled model; each thread gets its own infer request, so one OpenVinoReranker can serve
concurrent threads.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np

from ..artifact import CU_SEQLENS, INPUT_IDS, Artifact
from ..errors import ArtifactError, MissingDependency
from ..loading import LoadOptions
from ..machine import openvino_config
from ..packing import PackedBatch, PairEncoder
from ..reranker import PackedBatchReranker

INSTALL_HINT = "pip install 'ettin-export[openvino]'  (or: pip install openvino onnx)"
# The artifact's precision -> OpenVINO's inference precision. int8 artifacts hold ONNX Runtime's
# quantized graph (MatMulInteger): OpenVINO runs it slower and with other results, so it is refused.
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16"}
# Token budget per run when the caller sets none (a longer pair runs alone): LATENCY-hint runs of ~2K tokens were fastest at 17m
# (2-core AMD EPYC Zen 5, bf16: 1024 / 2048 / 4096 tokens gave 361 / 392 / 393 pairs/s).
DEFAULT_BATCH_TOKENS = 2048


def _import():
    try:
        import onnx
        import onnx.inliner
        import openvino
    except ImportError as error:
        raise MissingDependency(f"The OpenVINO runtime needs openvino and onnx: {INSTALL_HINT}.") from error
    return openvino, onnx


def read_graph(core, onnx, path):
    """The artifact's graph as an OpenVINO model: local functions inlined in memory (external data, if
    any, read from beside the file)."""
    proto = onnx.inliner.inline_local_functions(onnx.load(str(path)))
    return core.read_model(proto.SerializeToString())


def cpu_supports_bf16(core) -> bool:
    try:
        return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # noqa: BLE001 - an OpenVINO without the property: assume not
        return False


def computed_precision(compiled, asked: str) -> str:
    """'bf16' or 'fp32': the inference precision the compiled model reports (the asked one where it
    reports none)."""
    try:
        reported = str(compiled.get_property("INFERENCE_PRECISION_HINT")).lower()
    except Exception:  # noqa: BLE001 - an OpenVINO without the property
        reported = asked
    return "bf16" if "bf16" in reported or "bfloat16" in reported else "fp32"


class OpenVinoReranker(PackedBatchReranker):
    def __init__(self, compiled, encoder: PairEncoder, artifact: Artifact, *, max_batch_tokens: int,
                 max_batch_pairs: int, inference_precision: str, token_limit: int | None = None):
        super().__init__(encoder, activation=artifact.score_activation, max_batch_tokens=max_batch_tokens,
                         max_batch_pairs=max_batch_pairs, token_limit=token_limit)
        self.compiled = compiled
        self.artifact = artifact
        self.inference_precision = inference_precision
        # What OpenVINO compiled, not what was asked: a bf16 hint on a CPU without bf16 compiles to f32.
        self.computed_precision = computed_precision(compiled, inference_precision)
        self._local = threading.local()

    @classmethod
    def from_artifact(cls, artifact: Artifact, options: LoadOptions) -> OpenVinoReranker:
        openvino, onnx = _import()
        if artifact.engine.format != "onnx":
            raise ArtifactError(f"{artifact.root} holds a {artifact.engine.format} engine; OpenVINO runs ONNX graphs.")
        artifact.require_complete()
        if artifact.precision not in INFERENCE_PRECISION:
            raise ArtifactError(
                f"{artifact.root} is a {artifact.precision} artifact (ONNX Runtime's quantized graph); OpenVINO runs "
                f"the {' and '.join(INFERENCE_PRECISION)} ones. Load it with its own runtime (runtime='onnxruntime')."
            )
        if options.device not in ("auto", "cpu"):
            raise ArtifactError(f"the OpenVINO runtime runs on the CPU here; device {options.device!r} was asked for.")
        core = openvino.Core()
        precision = INFERENCE_PRECISION[artifact.precision]
        if precision == "bf16" and not cpu_supports_bf16(core):
            # Measured: OpenVINO 2026.4 computes a bf16 hint in fp32 on AVX2 CPUs (Zen 3) but emulates bf16 with
            # AVX-512 where AVX512_BF16 is missing (Ice Lake): bf16 numerics, ~30x slower than fp32 on the 17m.
            warnings.warn("this CPU has no bf16 instructions (AVX512_BF16 / AMX): OpenVINO runs this bf16 artifact "
                          "in fp32 (AVX2) or emulates bf16 (AVX-512), far slower than the artifact was built for; "
                          "build --precision fp32 or int8 for this machine.", RuntimeWarning, stacklevel=2)
        config = openvino_config({"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"},
                                 options.threads)
        compiled = core.compile_model(read_graph(core, onnx, artifact.path(artifact.engine.file)), "CPU", config)
        encoder = PairEncoder.from_dir(artifact.root, options.max_length or artifact.max_length)
        tokens = options.max_batch_tokens or min(DEFAULT_BATCH_TOKENS, artifact.limits.max_batch_tokens)
        return cls(compiled, encoder, artifact, max_batch_tokens=tokens,
                   max_batch_pairs=options.max_batch_pairs or artifact.limits.max_batch_pairs,
                   inference_precision=precision, token_limit=max(artifact.limits.max_batch_tokens, tokens))

    def _score(self, batch: PackedBatch) -> np.ndarray:
        if self.compiled is None:
            raise ArtifactError(f"this reranker of {self.artifact.root} was closed; load the artifact again.")
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        request.infer({INPUT_IDS: batch.input_ids, CU_SEQLENS: batch.cu_seqlens})
        return np.array(request.get_output_tensor(0).data, dtype=np.float32).reshape(-1)

    def close(self) -> None:
        self.compiled = None
        self._local = threading.local()
