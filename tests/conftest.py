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
    from ettin_export.random_checkpoint import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", None, seed=11, max_seq_length=200)


@pytest.fixture(scope="session")
def ettin17m_reduced(tmp_path_factory):
    """The exact 17m config at 4 layers (global 0 and 3, local 1 and 2: window 64), max length 320."""
    from ettin_export.random_checkpoint import write_random_checkpoint

    return write_random_checkpoint(
        tmp_path_factory.mktemp("e17m") / "ckpt", "17m", seed=5, num_layers=4, max_seq_length=320
    )
