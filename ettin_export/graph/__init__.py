"""Stage 5, the ONNX graph: the export with VarlenAttention nodes and their local-function body
(export.py), and its contract and value checks (validate.py)."""
