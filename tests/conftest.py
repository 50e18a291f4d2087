"""Shared fixtures: tiny random checkpoints made offline, and a session cache for random-weights sizes."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import signal
import sys
import tempfile

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Random-weights checkpoints made by the CLI go to a per-session cache, never the user's."""
    cache = tmp_path_factory.mktemp("ettin-cache")
    previous = os.environ.get("ETTIN_EXPORT_CACHE")
    os.environ["ETTIN_EXPORT_CACHE"] = str(cache)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    yield cache
    if previous is None:
        os.environ.pop("ETTIN_EXPORT_CACHE", None)
    else:
        os.environ["ETTIN_EXPORT_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Tiny custom config: 4 layers (global 0 and 3), local half-window 16, max length 200."""
    from ettin_export.synthetic.checkpoints import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", None, seed=11, max_seq_length=200)


@pytest.fixture(scope="session")
def ettin17m_reduced(tmp_path_factory):
    """The exact 17m config at 4 layers (global 0 and 3, local 1 and 2: window 64), max length 320."""
    from ettin_export.synthetic.checkpoints import write_random_checkpoint

    return write_random_checkpoint(
        tmp_path_factory.mktemp("e17m") / "ckpt", "17m", seed=5, num_layers=4, max_seq_length=320
    )


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, tiny_checkpoint):
    """An fp32 CPU artifact of the tiny checkpoint, built through the real `build` path."""
    from ettin_export.pipeline import BuildOptions, run_build
    from ettin_export.checkpoint import load_checkpoint
    from ettin_export.targets import get_target

    out = tmp_path_factory.mktemp("artifacts") / "tiny-cpu"
    options = BuildOptions(out=out, target=get_target("cpu"), max_length=200, parity_queries=2, quiet=True,
                           runtime="onnxruntime")  # the tests that assert ONNX Runtime facts; OpenVINO is timed elsewhere
    assert run_build(lambda: load_checkpoint(str(tiny_checkpoint), max_length=200), options) == 0
    return out


# --- two test workers on one machine (pytest-xdist: `-n auto --dist loadfile` in pyproject) -------------
# Much of the suite's time is single-threaded Python (exports, graph rewrites, tokenization), so it runs in
# two worker processes, each test file in one of them, and each worker's CPU runs on one thread
# ($ETTIN_CPU_THREADS for ONNX Runtime and OpenVINO, $OMP_NUM_THREADS for torch): two workers with a thread
# per core each spent more CPU time than one process and finished barely sooner (docs/design.md, Threads).
# `python -m pytest -n 0` runs it all in one process, on every core.
# Tests that time something and judge a ratio are marked `exclusive`: each test holds a shared lock for its
# whole run (setup, call, teardown); an exclusive one holds it alone, on every core, and while it waits for
# it no other test starts.

SLOWEST_FILES_FIRST = ("test_trained_gates.py", "test_parity.py", "test_same_scores.py", "test_bad_inputs.py",
                       "test_precisions.py", "test_readme_serving.py", "test_bench.py", "test_onnx_export.py",
                       "test_gpu_scripts.py")  # so that neither worker is left with a long file at the end


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _worker_id(config) -> str | None:
    return getattr(config, "workerinput", {}).get("workerid")


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core this process may use, at most 2 (every worker builds again the session
    fixtures its files need; measured on the 2-core CI machine only)."""
    return max(1, min(2, _cores()))


def pytest_configure(config):
    if _worker_id(config) is None:
        return

    # xdist's workers ignore SIGINT, and a child process inherits that: the Ctrl-C tests' builds would
    # never see their KeyboardInterrupt. A handler (not an ignore) is reset to the default in a child.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.update({"ETTIN_CPU_THREADS": "1", "OMP_NUM_THREADS": "1"})


def pytest_unconfigure(config):
    """A worker that is done removes the lock files; one still running keeps its open ones (flock needs no
    name), and a worker that has finished takes no lock again."""
    run_id = getattr(config, "workerinput", {}).get("testrunuid")
    if run_id is not None:
        for suffix in (".gate", ".lock"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_share_base(run_id) + suffix)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept


@functools.cache
def _share_files(run_id: str):
    """The run's two lock files (the gate, the lock), opened once per worker and held for its life."""
    base = _share_base(run_id)
    return open(base + ".gate", "a+"), open(base + ".lock", "a+")  # noqa: SIM115


def _share_base(run_id: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"ettin-tests-{run_id}")


@contextlib.contextmanager
def _machine_share(run_id: str, exclusive: bool):
    """A readers-writer lock across the workers (flock): a test holds the lock shared, an exclusive one
    alone; the gate lets a waiting exclusive test go before tests that have not started yet."""
    gate, lock = _share_files(run_id)
    if exclusive:
        fcntl.flock(gate, fcntl.LOCK_EX)  # no new test starts
        fcntl.flock(lock, fcntl.LOCK_EX)  # the running one finishes
    else:
        fcntl.flock(gate, fcntl.LOCK_SH)
        fcntl.flock(lock, fcntl.LOCK_SH)
        fcntl.flock(gate, fcntl.LOCK_UN)
    try:
        with _every_core() if exclusive else contextlib.nullcontext():
            yield
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        if exclusive:
            fcntl.flock(gate, fcntl.LOCK_UN)


@contextlib.contextmanager
def _every_core():
    """An exclusive test runs as a single process would: the runtimes' default threads, torch's too."""
    saved = {name: os.environ.pop(name, None) for name in ("ETTIN_CPU_THREADS", "OMP_NUM_THREADS")}
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch else None
    if torch:
        torch.set_num_threads(_cores())
    try:
        yield
    finally:
        os.environ.update({name: value for name, value in saved.items() if value is not None})
        if torch:
            torch.set_num_threads(threads)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    run_id = getattr(item.config, "workerinput", {}).get("testrunuid")
    if run_id is None:  # one process: nothing to share
        yield
        return
    with _machine_share(run_id, item.get_closest_marker("exclusive") is not None):
        yield
