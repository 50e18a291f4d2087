"""The int8 peer on the CPU: ONNX Runtime's dynamic int8 quantization of the padded export of the
CrossEncoder modules (bench.openvino_padded.export_padded), on CrossEncoder's own padded, length-sorted
batches — what a user gets from sentence-transformers' ONNX backend with a dynamically quantized model
(`quantize_dynamic` with its defaults: int8 weights per tensor, full 8-bit range, uint8 activations per
batch). Its fp32 export is checked against CrossEncoder before it is quantized.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from ettin_runtime.machine import ort_cpu_session

from ettin_export.bench.measure import CrossEncoderContender
from ettin_export.bench.openvino_padded import MAX_SCORE_DIFF_F32, PaddedExportContender, export_padded


class OnnxRuntimeInt8PaddedContender(PaddedExportContender):
    """`int8=False`: the same padded export in fp32 (what sentence-transformers' backend="onnx" runs)."""

    def __init__(self, path: str, max_length: int, batch_size: int | str, log=lambda message: None, *,
                 int8: bool = True):
        import onnxruntime
        from onnxruntime.quantization import QuantType, quantize_dynamic

        super().__init__(path, max_length, batch_size, "cpu", "float32")
        self._folder = tempfile.TemporaryDirectory(prefix="ettin-padded-int8-")
        folder = Path(self._folder.name)
        log("exporting the padded peer graph (torch.onnx) and quantizing it (ONNX Runtime dynamic int8) ...")
        fp32 = export_padded(self.model, folder / "padded.onnx")
        self.session = ort_cpu_session(onnxruntime, fp32)
        from ettin_export.synthetic.text import random_pairs

        sample = random_pairs(12, seed=5)
        worst = float(np.max(np.abs(self.predict(sample) - CrossEncoderContender.predict(self, sample))))
        if worst > MAX_SCORE_DIFF_F32:
            raise RuntimeError(f"the padded export differs from CrossEncoder by {worst:.3g} in fp32: not a fair peer.")
        if not int8:
            self.description = {**self.description, "kind": "ONNX Runtime fp32 on a padded ONNX export of the "
                                "CrossEncoder modules", "version": onnxruntime.__version__,
                                "fp32_export_max_abs_diff_vs_crossencoder": worst}
            return
        quantize_dynamic(str(fp32), str(folder / "padded-int8.onnx"), weight_type=QuantType.QInt8)
        self.session = ort_cpu_session(onnxruntime, folder / "padded-int8.onnx")
        self.description = {**self.description, "kind": "ONNX Runtime dynamic int8 on a padded ONNX export of the "
                            "CrossEncoder modules", "version": onnxruntime.__version__,
                            "recipe": "quantize_dynamic defaults (QInt8 weights per tensor, 8-bit range)",
                            "fp32_export_max_abs_diff_vs_crossencoder": worst}

    def _run(self, input_ids, attention_mask):
        return self.session.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})[0]
