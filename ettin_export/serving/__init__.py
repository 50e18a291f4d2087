"""Serving helpers: a real Triton Inference Server (python backend) on a CPU-only box (triton_server.py),
for the tests and the local serving path of docs/serving.md."""
