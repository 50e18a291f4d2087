"""One error root for everything ettin-export raises on purpose.

An `EttinError` is a user-facing refusal: its message says what was wrong and what to do, and the
command line prints it in one line (exit status 2). Anything else that escapes a command is a bug and
is shown as one, with its traceback. Subclasses keep the builtin base their callers used to catch
(ValueError, ImportError, RuntimeError), so `except ValueError` still works where it did.
"""

from __future__ import annotations


class EttinError(Exception):
    """A refusal with a message that says what was wrong and what to do."""


class ArtifactError(EttinError, ValueError):
    """An artifact that cannot be used as is: missing, corrupt, too new, unfinished, or for another runtime."""


class BadSetting(EttinError, ValueError):
    """An environment setting the project reads (e.g. ETTIN_CPU_THREADS) holds a value it cannot use."""


class MissingDependency(EttinError, ImportError):
    """An optional dependency is not installed; the message carries the exact `pip install` command."""


class RuntimeRefused(EttinError, RuntimeError):
    """A runtime (a server, an engine) refused or failed a request; the message says which and why."""
