"""The prepared GPU scripts dry-run on a CPU: scripts/gpu_kernel_check.py (the AOT kernel as TensorRT
launches it) and scripts/gpu_check.py (which runs the kernel check as a child, then the op, the packed
model and CrossEncoder). On a GPU they run for real; see the README for what they prove there."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .test_aot import TENSORRT_ARGUMENTS, requires_triton

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _run(script, out, timeout):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPTS / script), str(out), "--dry-run"],
                          capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


@requires_triton
@pytest.mark.slow
def test_gpu_kernel_check_script_dry_run(tmp_path):
    """The prepared GPU script must at least parse its arguments, compile, and write its JSON here."""
    _run("gpu_kernel_check.py", tmp_path, 300)
    result = json.loads((tmp_path / "gpu_kernel_check.json").read_text())
    steps = result["steps"]
    assert steps["aot_compile"]["ok"] and steps["interpreter_smoke_fp32"]["ok"], steps
    compiled = steps["aot_compile"]["kernels"]
    assert all(e["entry_declared"] == TENSORRT_ARGUMENTS for e in compiled)
    # On a CPU it compiles at sm_90a's floor, the ISA the oldest driver that runs an H100 build loads.
    assert steps["aot_compile"]["ptx_version_requested"] == "8.0" and {e["ptx_version"] for e in compiled} == {"8.0"}
    assert len({e["name"] for e in compiled}) == len(compiled)
    assert max(steps["interpreter_smoke_fp32"][f"max_error_window_{w}"] for w in (64, -1)) <= 1e-5
    assert steps["speed"]["skipped"] and list(tmp_path.glob("*.ptx"))


@requires_triton
@pytest.mark.slow
def test_gpu_check_script_dry_run(tmp_path):
    """Every step that needs no CUDA, at toy scale: the kernel check as its child, the op in fp32 against
    the reference, one packed size and CrossEncoder on the same pairs."""
    _run("gpu_check.py", tmp_path, 600)
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    steps, summary = result["steps"], result["summary"]
    assert summary["device"] == "cpu" and summary["steps_failed"] == [], summary
    assert steps["kernel_check"]["ok"] and steps["kernel_check"]["ptx_version"] == "8.0"
    assert (tmp_path / "gpu_kernel_check.json").is_file()
    assert all(summary["op_accuracy_pass"][name] for name in summary["op_accuracy_pass"] if name.startswith("fp32/"))
    assert summary["pairs_per_s"]["17m"]["packed_auto"] > 0 and summary["pairs_per_s"]["17m"]["crossencoder_sdpa"] > 0
