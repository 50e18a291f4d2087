"""The parity gate of `ettin-export build --target h100`, driven through injected EngineHooks.

A TEST OF THE GATE'S LOGIC ONLY. The "engine" here is the exported bf16 graph widened to fp32 and run by
ONNX Runtime on the CPU, and both references are the packed PyTorch model on the CPU (fp32, and bf16
with the reference attention: there is no flash kernel on a CPU). No TensorRT, GPU or flash attention
takes part, so nothing here says anything about the real engine's accuracy; what is checked is that
`build` judges the candidate against the bf16 reference's own error, writes the report into the
artifact, publishes only what passes, exits 1 on a failure, leaves the artifact already at --out
untouched and keeps the rejected build beside it. The real gate runs in tests/test_tensorrt_build.py
(skipped without TensorRT and an H100/H200)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ettin_export.pipeline import BuildOptions, EngineHooks, run_build
from ettin_export.checkpoint import load_checkpoint
from ettin_export.targets import get_target
from ettin_runtime import Artifact, PackedBatchReranker
from ettin_runtime.artifact import MANIFEST_NAME
from ettin_runtime.packing import PairEncoder

H100 = get_target("h100")
STAND_IN = "ONNX Runtime CPU stand-in (widened bf16 graph)"


class StandInEngine(PackedBatchReranker):
    """What the gate sees as the engine: the plan file holds the widened bf16 graph; `shift` adds an
    injected error to every score."""

    def __init__(self, artifact: Artifact, shift: float):
        import onnxruntime

        super().__init__(PairEncoder.from_dir(artifact.root, artifact.max_length),
                         max_batch_tokens=artifact.limits.max_batch_tokens,
                         max_batch_pairs=artifact.limits.max_batch_pairs)
        model = artifact.path(artifact.engine.file).read_bytes()
        self.session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
        self.shift = shift

    def _score(self, batch):
        (scores,) = self.session.run(["scores"], {"input_ids": batch.input_ids, "cu_seqlens": batch.cu_seqlens})
        return scores.reshape(-1) + np.float32(self.shift)


def stand_in_hooks(shift: float = 0.0, calls: list | None = None) -> EngineHooks:
    from ettin_export.engine import rules as tensorrt_build
    from ettin_export.parity.references import bf16_references

    calls = [] if calls is None else calls

    def preflight(target):
        calls.append("preflight")
        return {"tensorrt_version": "none (stand-in)", "gpu_name": "none (CPU)"}

    def build_engine(onnx_path, plan_path, limits, target, timing_cache, steps):
        import onnx

        from ettin_export.graph.validate import bf16_as_fp32

        calls.append("build_engine")
        proto = onnx.load(str(onnx_path), load_external_data=False)
        nodes = tensorrt_build.check_parser_rules(proto)  # the real rules check runs on the real bf16 export
        Path(plan_path).write_bytes(bf16_as_fp32(proto, Path(onnx_path).parent).SerializeToString())
        return {"tensorrt_version": "none (stand-in)", "compute_capability": "9.0", "ptx_version": None,
                "gpu_name": STAND_IN, "plugin_layers": nodes, "attention_nodes": nodes,
                "timing_cache": {"path": str(timing_cache)}}

    def load_runtime(artifact):
        calls.append("load_runtime")
        return StandInEngine(artifact, shift)

    def references(checkpoint, pairs, encoder, anchor):
        calls.append("references")
        return bf16_references(checkpoint, pairs, encoder, "cpu", anchor)

    return EngineHooks(preflight=preflight, build_engine=build_engine, engine_profile=tensorrt_build.engine_profile,
                       load_runtime=load_runtime, references=references)


def options_for(out: Path, **changes) -> BuildOptions:
    settings = dict(out=out, target=H100, max_length=200, max_batch_pairs=16, parity_queries=2,
                    check_crossencoder=False, quiet=True, command_line=["ettin-export", "build", "(test)"])
    settings.update(changes)
    return BuildOptions(**settings)


@pytest.fixture(scope="module")
def passed_build(tmp_path_factory, tiny_checkpoint):
    """A build whose stand-in engine is the widened bf16 graph: it must pass the gate."""
    out = tmp_path_factory.mktemp("gate") / "tiny-h100"
    calls: list = []
    status = run_build(lambda: load_checkpoint(str(tiny_checkpoint), max_length=200), options_for(out),
                       stand_in_hooks(0.0, calls))
    return out, status, calls


def test_gate_passes_the_widened_bf16_graph_and_publishes_with_its_report(passed_build):
    out, status, calls = passed_build
    assert status == 0
    assert calls == ["preflight", "build_engine", "load_runtime", "references"]
    artifact = Artifact.open(out)
    assert artifact.engine.format == "tensorrt" and artifact.engine.file == "model.plan"
    assert artifact.engine.runtime == "tensorrt" and artifact.target == "h100" and artifact.precision == "bf16"
    assert artifact.engine.tensorrt.plugin_layers == artifact.engine.tensorrt.attention_nodes == 4
    assert artifact.limits.profile.pairs == (1, 16, 16) and artifact.limits.max_batch_pairs == 16
    assert json.loads((out / "manifest.json").read_text())["limits"]["profile"]["num_pairs_plus_1"] == [2, 17, 17]
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] and artifact.parity.passed
    assert report["candidate"] == f"tensorrt bf16 ({STAND_IN})"
    assert report["reference"].startswith("packed PyTorch fp64") and report["anchor_precision"] == "fp64"
    assert report["reference_lowp"].startswith("packed PyTorch bf16 (CPU")
    lowp = report["reference_lowp_metrics"]["max_abs_diff"]
    assert lowp > 0  # the bf16 reference has an error of its own, and the bound is relative to it
    assert report["bounds"]["max_abs_diff"] == pytest.approx(1.5 * lowp)
    assert report["metrics"]["max_abs_diff"] <= 1.5 * lowp
    assert not list(out.parent.glob(f".{out.name}.*"))  # no staging left behind


def test_gate_rejects_an_engine_beyond_1_5x_the_reference_error(passed_build, tiny_checkpoint, tmp_path):
    good, _, _ = passed_build
    out = shutil.copytree(good, tmp_path / "tiny-h100")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    lowp = json.loads((good / "parity.json").read_text())["reference_lowp_metrics"]["max_abs_diff"]
    shift = 3.0 * lowp  # a uniform shift: ranking is untouched, only the error bound can catch it
    status = run_build(lambda: load_checkpoint(str(tiny_checkpoint), max_length=200),
                       options_for(out, force=True), stand_in_hooks(shift))
    assert status == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the good artifact is untouched
    rejected = tmp_path / "tiny-h100.rejected"
    assert (rejected / MANIFEST_NAME).is_file() and (rejected / "model.plan").is_file()
    report = json.loads((rejected / "parity.json").read_text())
    assert not report["passed"]
    assert report["metrics"]["max_abs_diff"] > 1.5 * report["reference_lowp_metrics"]["max_abs_diff"]
    (failure,) = report["failures"]  # only the error bound: a uniform shift keeps every ranking metric
    assert "1.5 x the own error of packed PyTorch bf16" in failure
    assert not list(tmp_path.glob(".tiny-h100.*"))  # staging removed
