"""Serving: the /v1/rerank API (rerank_api.py: the schema and its rules; gateway.py: the app and its
backends) and a real Triton Inference Server (python backend) on a CPU-only box, for the tests and the
local serving path of docs/serving.md: its environment (triton_env.py), start/wait/stop
(triton_server.py), the processes it runs (processes.py), its statistics (triton_stats.py), the clients
bench-serving drives (clients.py) and their errors (errors.py). `ettin-export triton-server` is its CLI."""
