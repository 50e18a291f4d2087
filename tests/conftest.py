"""Shared fixtures: tiny random checkpoints made offline, and a session cache for random-weights sizes."""

from __future__ import annotations

import os

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
