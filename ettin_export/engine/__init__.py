"""Stage 6, the engine: the TensorRT plan with the AOT attention plugin (tensorrt.py). The CPU target's
engine is the ONNX graph itself, run by ONNX Runtime (ettin_runtime.backends.onnxruntime)."""
