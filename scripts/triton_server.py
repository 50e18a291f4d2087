#!/usr/bin/env python3
"""Start and stop a real Triton Inference Server (python backend only) on a CPU-only Linux box:
`python scripts/triton_server.py setup | start | status | stop`, the same as
`ettin-export triton-server ...` (ettin_export/commands/triton_server.py)."""

import sys

from ettin_export.commands.triton_server import main

if __name__ == "__main__":
    sys.exit(main())
