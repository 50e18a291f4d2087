"""The errors of the local Triton server tooling (triton_env.py, processes.py, triton_server.py), under
ettin_runtime's one root: the command line prints them in one line with exit status 2."""

from __future__ import annotations

from ettin_runtime.errors import EttinError


class TritonHarnessError(EttinError, RuntimeError):
    """Base class: every message says what went wrong and what to do."""


class EnvSetupError(TritonHarnessError):
    """The server environment cannot be created here (no shared libpython, no PyPI, ...)."""


class ServerStartError(TritonHarnessError):
    """The server exited early, did not become ready in time, or a model failed to load."""
