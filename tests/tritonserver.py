"""What the real-server tests share: the server harness (ettin_export.serving.triton_server) and its env
(ettin_export.serving.triton_env)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ettin_export.serving import triton_env
from ettin_export.serving import triton_server as harness

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "triton_server.py"


def server_env_or_skip():
    """The Triton server env, built on first use; skip with the reason when it cannot be built here, and
    fail instead when ETTIN_REQUIRE_TRITON is set (CI)."""
    pytest.importorskip("tritonclient.http", reason="the clients need: pip install 'tritonclient[http,grpc]'")
    pytest.importorskip("tritonclient.grpc", reason="the clients need: pip install 'tritonclient[http,grpc]'")
    try:
        return triton_env.ensure_env()
    except triton_env.EnvSetupError as exc:
        if os.environ.get("ETTIN_REQUIRE_TRITON"):
            pytest.fail(f"ETTIN_REQUIRE_TRITON is set but the Triton server env cannot be built: {exc}")
        pytest.skip(f"Triton server env cannot be built here (run `python scripts/triton_server.py setup` "
                    f"to see why): {exc}")
