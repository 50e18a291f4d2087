"""What the real-server tests share: scripts/triton_server.py loaded as a module, and the server env."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "triton_server.py"


def load_harness():
    """scripts/triton_server.py as the module `triton_server` (loaded once per process)."""
    if "triton_server" in sys.modules:
        return sys.modules["triton_server"]
    spec = importlib.util.spec_from_file_location("triton_server", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


def server_env_or_skip():
    """The Triton server env, built on first use; skip with the reason when it cannot be built here, and
    fail instead when ETTIN_REQUIRE_TRITON is set (CI)."""
    pytest.importorskip("tritonclient.http", reason="the clients need: pip install 'tritonclient[http,grpc]'")
    pytest.importorskip("tritonclient.grpc", reason="the clients need: pip install 'tritonclient[http,grpc]'")
    harness = load_harness()
    try:
        return harness.ensure_env()
    except harness.EnvSetupError as exc:
        if os.environ.get("ETTIN_REQUIRE_TRITON"):
            pytest.fail(f"ETTIN_REQUIRE_TRITON is set but the Triton server env cannot be built: {exc}")
        pytest.skip(f"Triton server env cannot be built here (run `python scripts/triton_server.py setup` "
                    f"to see why): {exc}")
