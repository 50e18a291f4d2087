"""Python-backend model sources that `ettin-export deploy triton` copies into a model repository as
`<model>/1/model.py`. They run inside Triton's python-backend stub (numpy, plus onnxruntime or
tokenizers), never inside ettin-export: nothing here is imported by the exporter."""
