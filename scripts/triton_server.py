#!/usr/bin/env python3
"""Start and stop a real Triton Inference Server (python backend only) on a CPU-only Linux box:
`python scripts/triton_server.py setup | start | status | stop` (see ettin_export.serving.triton_server)."""

import sys

from ettin_export.serving.triton_server import main

if __name__ == "__main__":
    sys.exit(main())
