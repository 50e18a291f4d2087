"""The exporter's user-facing errors, all under ettin_runtime's one root (`EttinError`): the command
line prints them in one line with exit status 2; any other exception is a bug and shows a traceback."""

from __future__ import annotations

from ettin_runtime.errors import ArtifactError, EttinError, MissingDependency, RuntimeRefused


class UsageError(EttinError, ValueError):
    """A command line that cannot be carried out as given."""


class CheckpointError(EttinError, ValueError):
    """The checkpoint cannot be used: the message says what was found and what to do."""


class ExportError(EttinError, RuntimeError):
    """The exported graph does not satisfy the contract; the message names what differs."""


class BuildError(EttinError, RuntimeError):
    """The build stopped; the message says why and what to do. Nothing at --out was changed."""


class DeployError(EttinError, ValueError):
    """`deploy` refused: the message says what is wrong and what to do. Nothing was written."""


__all__ = ["ArtifactError", "BuildError", "CheckpointError", "DeployError", "EttinError", "ExportError",
           "MissingDependency", "RuntimeRefused", "UsageError"]
