"""What each engine backend puts in its model folder, as data: one layout function per
`configs.ENGINE_BACKENDS` key, from the artifact to the files, parameters and server needs of
`<name><suffix>/1/`. The repository writer (repository._write) calls the backend's layout and knows
no backend by name."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ettin_runtime.artifact import Artifact

from ettin_export.deploy.checks import BUDGET_PAIRS, BUDGET_TOKENS, DeployError
from ettin_export.deploy.configs import ENGINE_BACKENDS, plan_filename

# What the python models need in the server's Python (the Triton container's has neither tokenizers nor
# onnxruntime). numpy<2: the 24.xx python backend (pybind11 2.10) silently corrupts tensors under numpy 2
# (INT64 [1,2,3] arrives as [1,1,1]; python_backend PR #384 fixed it later).
FRONT_REQUIREMENTS = ("numpy<2", "tokenizers>=0.20,<1")
# The python engine model's, by the artifact's runtime.
RUNTIME_REQUIREMENTS = {"onnxruntime": ("onnxruntime>=1.17",), "openvino": ("openvino>=2025.0", "onnx>=1.17")}
# The artifact's precision -> OpenVINO's inference precision, for an OpenVINO artifact's engine model.
OPENVINO_PRECISION = {"fp32": "f32", "bf16": "bf16"}


@dataclass(frozen=True)
class EngineLayout:
    """One engine model's folder: files (path under 1/ -> artifact file), its config's parameters, the
    model.py a python backend runs, and what the server must provide."""

    files: dict[str, str]
    parameters: dict | None = None
    compute_capability: str | None = None  # a TensorRT plan's: the repository maps the plan by it
    model_source: str | None = None  # a file of ettin_export/deploy/models/, written as 1/model.py
    requirements: tuple[str, ...] = ()  # in the server's Python, beside the front's
    tensorrt_version: str | None = None  # the server's TensorRT must be this one
    serving_notes: tuple[str, ...] = ()  # which container and driver the engine needs
    warnings: tuple[str, ...] = ()  # known faults of the engine's release


def tensorrt_serving_notes(facts) -> tuple[list[str], list[str]]:
    """(what the server needs, known faults of its TensorRT) for a TensorRT artifact's facts."""
    from ettin_runtime.backends.tensorrt import cuda_version_text, driver_needed_for_ptx, tensorrt_version_warnings

    version = facts.tensorrt_version
    notes = [
        f"The plan loads only in TensorRT {version}, the release that built it: serve it in the Triton container "
        f"(nvcr.io/nvidia/tritonserver:<yy.mm>-py3) whose release notes list TensorRT {version}, i.e. the same "
        "<yy.mm> as the TensorRT or PyTorch container it was built in (check libnvinfer.so.* in both), or rebuild "
        "the artifact inside the serving release.",
    ]
    needed = driver_needed_for_ptx(facts.ptx_version)
    if needed:
        notes.append(
            f"Its attention kernels are PTX ISA {facts.ptx_version} for {facts.ptx_target or 'the GPU'}, "
            f"which the server's NVIDIA driver JIT-compiles: it must support CUDA {cuda_version_text(needed)} or newer "
            f"(the build machine's: {facts.driver_version or '?'}, "
            f"CUDA {cuda_version_text(facts.cuda_driver_version) or '?'})."
        )
    return notes, tensorrt_version_warnings(version)


def _onnx_files(artifact: Artifact) -> dict[str, str]:
    engine = artifact.engine
    files = {"model.onnx": engine.file}
    if engine.external_data:
        files[engine.external_data] = engine.external_data
    return files


def tensorrt_layout(artifact: Artifact) -> EngineLayout:
    """tensorrt_plan platform: the plan, named for the GPU generation it was built for."""
    engine = artifact.engine
    compute_capability = engine.tensorrt.compute_capability
    if not compute_capability or not re.fullmatch(r"\d+\.\d+", str(compute_capability)):
        raise DeployError(
            f"The TensorRT artifact records compute_capability {compute_capability!r}; a plan runs only on the "
            "GPU generation it was built for, so the repository maps it by that (e.g. \"9.0\"). Rebuild it."
        )
    if not artifact.path(engine.file).is_file():
        raise DeployError(f"{artifact.root} has no {engine.file} (the TensorRT plan).")
    notes, warnings = tensorrt_serving_notes(engine.tensorrt)
    return EngineLayout({plan_filename(compute_capability): engine.file}, compute_capability=compute_capability,
                        tensorrt_version=engine.tensorrt.tensorrt_version, serving_notes=tuple(notes),
                        warnings=tuple(warnings))


def onnxruntime_layout(artifact: Artifact) -> EngineLayout:
    """Triton's onnxruntime backend: the graph (and its external data) as they are."""
    return EngineLayout(_onnx_files(artifact))


def python_layout(artifact: Artifact) -> EngineLayout:
    """python backend: the graph under the artifact's own runtime (ONNX Runtime or OpenVINO), refusing
    beyond the engine's own limits (the front packs within its budget, below them)."""
    engine, limits = artifact.engine, artifact.limits
    parameters = {"onnx_file": "model.onnx", "max_length": artifact.max_length,
                  "vocab_size": artifact.model.vocab_size, "intra_op_threads": 0, "allow_spinning": 0,
                  BUDGET_TOKENS: limits.max_batch_tokens, BUDGET_PAIRS: limits.max_batch_pairs,
                  "runtime": engine.runtime}
    if engine.runtime == "openvino":  # its compute precision is a compile option, not in the graph
        parameters["inference_precision"] = OPENVINO_PRECISION[artifact.precision]
    return EngineLayout(_onnx_files(artifact), parameters, model_source="ort_engine.py",
                        requirements=RUNTIME_REQUIREMENTS[engine.runtime])


ENGINE_LAYOUTS = {"tensorrt": tensorrt_layout, "onnxruntime": onnxruntime_layout, "python": python_layout}
assert ENGINE_LAYOUTS.keys() == ENGINE_BACKENDS.keys(), "every engine backend needs its layout"
