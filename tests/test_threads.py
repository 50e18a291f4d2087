"""Threads per CPU run: `threads=` where a caller gives it, else $ETTIN_CPU_THREADS, else the runtime's
default (one per core). The suite's two workers run on one thread each through it (tests/conftest.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ettin_runtime import Reranker
from ettin_runtime.machine import THREADS_ENV, cpu_threads

PAIRS = [("what is a packed batch", "tokens of many pairs in one row, " * k) for k in (1, 9, 40)]


def test_threads_come_from_the_caller_then_the_environment(monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert cpu_threads() is None and cpu_threads(3) == 3
    monkeypatch.setenv(THREADS_ENV, " 2 ")
    assert cpu_threads() == 2 and cpu_threads(1) == 1
    for bad in ("0", "-1", "two", "1.5"):
        monkeypatch.setenv(THREADS_ENV, bad)
        with pytest.raises(ValueError, match=f"{THREADS_ENV}='{bad}': give a whole number of threads, 1 or more"):
            cpu_threads()
        assert cpu_threads(2) == 2  # a caller's own count needs no environment


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_both_cpu_runtimes_run_on_the_threads_asked_for(tiny_artifact, monkeypatch, runtime):
    pytest.importorskip(runtime)

    def threads(reranker) -> int:
        if runtime == "onnxruntime":
            return reranker.session.get_session_options().intra_op_num_threads
        return int(reranker.compiled.get_property("INFERENCE_NUM_THREADS"))

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one core: OpenVINO caps its threads at the cores, so no count differs from its default")
    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert threads(Reranker.load(tiny_artifact, runtime=runtime)) != 1  # ONNX Runtime: 0; OpenVINO: the cores
    monkeypatch.setenv(THREADS_ENV, "1")
    from_env = Reranker.load(tiny_artifact, runtime=runtime)
    assert threads(from_env) == 1
    given = Reranker.load(tiny_artifact, runtime=runtime, threads=2)
    assert threads(given) == 2  # the caller's count wins over the environment
    np.testing.assert_allclose(from_env.predict(PAIRS), given.predict(PAIRS), rtol=0, atol=1e-5)


def test_a_bad_thread_setting_is_one_line_and_exit_2(tiny_artifact, tmp_path, monkeypatch, capsys):
    from ettin_export.cli import main

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"query": "q", "document": "d"}\n')
    monkeypatch.setenv(THREADS_ENV, "all")
    assert main(["score", str(tiny_artifact), "--pairs", str(pairs)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{THREADS_ENV}='all': give a whole number of threads" in err, err
