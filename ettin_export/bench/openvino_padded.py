"""The padded-export baseline for the CPU's reduced precisions: the same checkpoint as CrossEncoder runs
it (ModernBERT -> pooling -> Dense -> LayerNorm -> Dense), exported to ONNX with padded
`input_ids` / `attention_mask` [batch, length] inputs — the graph optimum's export gives
sentence-transformers' `backend="onnx"` / `"openvino"` — and run by OpenVINO at the candidate's
inference precision on CrossEncoder's own padded, length-sorted batches.

sentence-transformers 6.2 cannot build that backend for ModernBERT itself (a dependency conflict with
optimum-onnx; optimum-intel refuses to export ModernBERT), so the graph is exported here with
torch.onnx from the very modules CrossEncoder runs; its scores are checked against CrossEncoder's
before anything is timed.

    ettin-export bench ARTIFACT --baseline openvino-padded
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from ettin_runtime.machine import openvino_config

from ettin_export.bench.measure import CrossEncoderContender
from ettin_export.errors import UsageError

# The artifact's precision -> OpenVINO's inference precision for the baseline (int8 is compared with
# OpenVINO's fp32: OpenVINO has no int8 path for an fp32 graph without its own quantizer).
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
MAX_SCORE_DIFF_F32 = 1e-3  # the export is the same fp32 function (padding, another kernel order)


def export_padded(crossencoder, path: Path) -> Path:
    """ONNX of CrossEncoder's modules with dynamic batch and length, opset 20 (torch.onnx, dynamo)."""
    import torch

    class Padded(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model({"input_ids": input_ids, "attention_mask": attention_mask})["scores"]

    module = Padded(crossencoder).eval()
    features = crossencoder.preprocess([("what is a query", "a short document"),
                                        ("another question here?", "a longer document " * 9)])
    sample = (features["input_ids"], features["attention_mask"])
    batch, length = torch.export.Dim("batch", min=1), torch.export.Dim("length", min=2, max=8192)
    from ettin_export.graph.export import quiet_exporter

    with torch.no_grad(), quiet_exporter():
        torch.onnx.export(module, sample, str(path), dynamo=True, input_names=["input_ids", "attention_mask"],
                          output_names=["scores"], opset_version=20, verbose=False,
                          dynamic_shapes={"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}})
    return path


class PaddedExportContender(CrossEncoderContender):
    """A padded export of the CrossEncoder's modules, batched as CrossEncoder batches (its `prepare`);
    a subclass runs one padded batch (`_run`) on its runtime."""

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict(self, pairs, batch_size: int | None = None) -> np.ndarray:
        return self.forward(self.prepare(pairs, batch_size))

    def forward(self, prepared) -> np.ndarray:
        count, batches = prepared
        scores = np.empty(count, dtype=np.float32)
        for indices, features in batches:
            out = self._run(features["input_ids"].numpy(), features["attention_mask"].numpy())
            scores[indices] = np.asarray(out, dtype=np.float32).reshape(-1)
        return scores


class OpenVinoPaddedContender(PaddedExportContender):
    """CrossEncoder's tokenization and padded batches; the forward pass is OpenVINO on the padded export."""

    def __init__(self, path: str, max_length: int, batch_size: int | str, precision: str, log=lambda message: None,
                 threads: int | None = None):
        try:
            import openvino
        except ImportError as error:
            raise UsageError("--baseline openvino-padded needs OpenVINO: pip install 'ettin-export[openvino]'.") from error
        super().__init__(path, max_length, batch_size, "cpu", "float32")
        self._folder = tempfile.TemporaryDirectory(prefix="ettin-padded-")
        log("exporting the padded baseline graph (torch.onnx) ...")
        onnx_path = export_padded(self.model, Path(self._folder.name) / "padded.onnx")
        self.inference_precision = INFERENCE_PRECISION[precision]
        core = openvino.Core()
        self.compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU", openvino_config({
            "INFERENCE_PRECISION_HINT": self.inference_precision, "PERFORMANCE_HINT": "LATENCY"}, threads))
        self.request = self.compiled.create_infer_request()
        self.description = {**self.description, "kind": "OpenVINO on a padded ONNX export of the CrossEncoder modules",
                            "version": openvino.__version__, "inference_precision": self.inference_precision,
                            "dtype": f"inference precision {self.inference_precision}"}
        from ettin_export.synthetic.text import random_pairs

        self.check_against_crossencoder(random_pairs(12, seed=5))

    def check_against_crossencoder(self, pairs) -> float:
        """max |OpenVINO padded - CrossEncoder| on `pairs` (f32 only: a bad export must not be timed)."""
        ours = self.predict(pairs)
        theirs = CrossEncoderContender.predict(self, pairs)
        worst = float(np.max(np.abs(ours - theirs))) if len(pairs) else 0.0
        if self.inference_precision == "f32" and worst > MAX_SCORE_DIFF_F32:
            raise RuntimeError(f"the padded export differs from CrossEncoder by {worst:.3g} in fp32: not a fair baseline.")
        self.description["max_abs_diff_vs_crossencoder"] = worst
        return worst

    def _run(self, input_ids, attention_mask):
        self.request.infer({"input_ids": input_ids, "attention_mask": attention_mask})
        return self.request.get_output_tensor(0).data
