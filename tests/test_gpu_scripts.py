"""The prepared GPU scripts dry-run on a CPU through every step the GPU run takes: scripts/gpu_kernel_check.py
(the AOT kernel as TensorRT launches it) and scripts/gpu_check.py (the kernel check as a child, the op,
then the packed model beside CrossEncoder), with ettin_export.parity.devices' stand-ins for CUDA. The
same step names, case names and report keys as on a GPU: a typo on a GPU-only line fails here."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ettin_export.parity.kernel import QUICK_CASES, TILE_EDGES, awkward_attention_cases, select_cases
from ettin_export.progress import JsonReport

from .test_aot import TENSORRT_ARGUMENTS, requires_triton

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _run(script, out, timeout, *extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPTS / script), str(out), "--dry-run", *extra],
                          capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _script_module(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _kernel_check_plan(module) -> set[str]:
    """Every step name the GPU run of gpu_kernel_check.py writes, from the script's own constants."""
    cases = awkward_attention_cases(0)
    names = {"environment", "aot_compile", "launcher"}
    names |= {f"accuracy/bf16/{case}/window{w}" for case in cases for w in (64, -1, 3)}
    names |= {f"accuracy/fp16/{TILE_EDGES}/window{w}" for w in module.WINDOWS}
    names |= {f"speed/L{length}/window{w}" for length in module.SPEED_LENGTHS for w in module.WINDOWS}
    return names


@requires_triton
@pytest.mark.slow
def test_gpu_kernel_check_dry_run_takes_every_step_of_the_gpu_run(tmp_path):
    _run("gpu_kernel_check.py", tmp_path, 300)
    result = json.loads((tmp_path / "gpu_kernel_check.json").read_text())
    steps = result["steps"]
    plan = _kernel_check_plan(_script_module("gpu_kernel_check"))
    assert plan <= set(steps), sorted(plan - set(steps))
    assert set(steps) - plan == {"interpreter_smoke_fp32"}  # the dry run's only extra: real kernel numerics
    assert all(steps[name]["ok"] is True for name in steps), {n: s for n, s in steps.items() if s["ok"] is not True}
    assert result["summary"]["steps_failed"] == [] and result["summary"]["dry_run"] is True
    compiled = steps["aot_compile"]["kernels"]
    assert all(e["entry_declared"] == TENSORRT_ARGUMENTS for e in compiled)
    # The stand-in driver is CUDA 12.0, the oldest that runs an H100 build: the build's own rule gives 8.0.
    assert steps["aot_compile"]["driver"] == {"version": "525.60.13", "cuda": "12.0"}
    assert steps["aot_compile"]["ptx_version_requested"] == "8.0" and {e["ptx_version"] for e in compiled} == {"8.0"}
    assert len({e["name"] for e in compiled}) == len(compiled)
    assert max(steps["interpreter_smoke_fp32"][f"max_error_window_{w}"] for w in (64, -1)) <= 1e-5
    # The launcher's checks ran: arguments bound as TensorRT binds them, grid from the kernel's formulas.
    assert steps["launcher"]["used"].startswith("stand-in")
    for name in (n for n in steps if n.startswith("accuracy/")):
        errors = steps[name]["errors_vs_fp32_reference"]
        assert {"triton_jit", "torch_sdpa", "torch_varlen_attn"} <= set(errors) and steps[name]["pass"] is True
    speed = steps["speed/L512/window64"]
    assert set(speed["median_ms"]) >= {"aot_tactic_1", "triton_jit", "torch_varlen_attn"}
    assert "speedup_vs_torch_varlen_attn" in speed and list(tmp_path.glob("*.ptx"))
    assert result["budget_started_after_s"] > 0  # the budget clock starts after the imports


@requires_triton
@pytest.mark.slow
def test_gpu_check_dry_run_takes_every_step_of_the_gpu_run(tmp_path):
    """The kernel check as its child, the op with both backends, the packed model (auto and the Triton
    kernel's backend) and CrossEncoder on the same pairs, and the GPU run's summary keys."""
    _run("gpu_check.py", tmp_path, 600)
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    steps, summary = result["steps"], result["summary"]
    assert summary["device"] == "cpu" and summary["steps_failed"] == [] and summary["skipped"] == {}, summary
    assert steps["kernel_check"]["ok"] and steps["kernel_check"]["ptx_version"] == "8.0"
    assert steps["kernel_check"]["steps_failed"] == []
    assert (tmp_path / "gpu_kernel_check.json").is_file()
    cases = awkward_attention_cases(0)
    expected = {f"{dtype}/{case}/window{w}" for dtype in ("fp32", "bf16") for case in cases for w in (64, -1)}
    assert set(summary["op_accuracy_pass"]) == expected and all(summary["op_accuracy_pass"].values())
    for name in expected:
        assert {"auto", "triton"} <= set(steps[f"op_accuracy/{name}"]["errors"])
    row = summary["pairs_per_s"]["17m"]
    for key in ("packed_auto", "packed_triton", "packed_auto_model_only", "packed_triton_model_only",
                "crossencoder_sdpa", "speedup_auto_vs_crossencoder", "speedup_triton_vs_crossencoder"):
        assert row[key] > 0, key
    assert list(steps).index("packed/17m") + 1 == list(steps).index("crossencoder/17m")


def test_the_quick_cases_are_cases():
    """gpu_check --quick once filtered on a name no case had, and silently dropped the tile edges."""
    for small in (False, True):
        cases = awkward_attention_cases(5, small=small)
        assert list(select_cases(cases, QUICK_CASES)) == list(QUICK_CASES)
        assert TILE_EDGES in cases and set(awkward_attention_cases(5, small=not small)) == set(cases)
    with pytest.raises(KeyError, match=r"unknown attention case\(s\) \['edges_63_64_65'\]"):
        select_cases(awkward_attention_cases(0), ["one_token", "edges_63_64_65"])
    assert {63, 64, 65, 129} <= set(awkward_attention_cases(0)[TILE_EDGES])


def test_gpu_check_quick_accuracy_keeps_the_tile_edges(tmp_path):
    import torch

    from ettin_export.parity.devices import StandInDevice

    gpu_check = _script_module("gpu_check")
    report = JsonReport(tmp_path / "report.json")
    gpu_check.op_accuracy(torch, report, StandInDevice(torch), quick=True)
    ran = {name.split("/")[2] for name in report.data["steps"]}
    assert ran == set(QUICK_CASES) and all(s["ok"] for s in report.data["steps"].values())


def test_budget_counts_from_the_end_of_the_imports():
    report = JsonReport(os.devnull, budget_s=45)
    report.t0 -= 30  # the imports took 30 s
    report.budget_t0 = report.t0
    assert report.remaining() < 16
    report.start_budget()
    assert 44 < report.remaining() <= 45 and report.elapsed() >= 30
    assert JsonReport(os.devnull).remaining() == float("inf")
