"""Each engine backend's model folder is data (ettin_export.deploy.engines): one layout per backend, and
what a layout holds follows the artifact (its runtime, precision, files), not the backend's name alone."""

from __future__ import annotations

import dataclasses

import pytest

from ettin_export.deploy.checks import BUDGET_PAIRS, BUDGET_TOKENS, DeployError
from ettin_export.deploy.configs import ENGINE_BACKENDS
from ettin_export.deploy.engines import ENGINE_LAYOUTS, RUNTIME_REQUIREMENTS, onnxruntime_layout, python_layout
from ettin_runtime import Artifact
from ettin_runtime.artifact import TensorRTFacts


def test_every_engine_backend_has_a_layout():
    assert ENGINE_LAYOUTS.keys() == ENGINE_BACKENDS.keys()


def test_python_layout_runs_the_artifacts_own_runtime(tiny_artifact):
    artifact = Artifact.open(tiny_artifact)
    own = python_layout(artifact)
    assert own.parameters["runtime"] == "onnxruntime" and "inference_precision" not in own.parameters
    assert own.requirements == RUNTIME_REQUIREMENTS["onnxruntime"] and own.model_source == "ort_engine.py"
    assert own.files["model.onnx"] == artifact.engine.file
    assert own.parameters[BUDGET_TOKENS] == artifact.limits.max_batch_tokens  # the engine's own limits
    assert own.parameters[BUDGET_PAIRS] == artifact.limits.max_batch_pairs

    openvino = artifact.replace(engine=dataclasses.replace(artifact.engine, runtime="openvino"))
    layout = python_layout(openvino)
    assert layout.parameters["runtime"] == "openvino" and layout.parameters["inference_precision"] == "f32"
    assert layout.requirements == RUNTIME_REQUIREMENTS["openvino"]


def test_onnxruntime_layout_is_the_graph_alone(tiny_artifact):
    artifact = Artifact.open(tiny_artifact)
    layout = onnxruntime_layout(artifact)
    expected = {"model.onnx": artifact.engine.file}
    if artifact.engine.external_data:
        expected[artifact.engine.external_data] = artifact.engine.external_data
    assert layout.files == expected and layout.parameters is None and layout.model_source is None


def test_tensorrt_layout_refuses_a_plan_without_its_gpu_generation_or_its_file(tiny_artifact):
    artifact = Artifact.open(tiny_artifact)
    for capability, error in (("sm90", "compute_capability 'sm90'"), ("9.0", "has no model.plan")):
        facts = TensorRTFacts(tensorrt_version="10.9.0", compute_capability=capability)
        plan = artifact.replace(engine=dataclasses.replace(artifact.engine, format="tensorrt", file="model.plan",
                                                           tensorrt=facts))
        with pytest.raises(DeployError, match=error):
            ENGINE_LAYOUTS["tensorrt"](plan)
