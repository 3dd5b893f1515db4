"""The tool's own errors.

Every error a user can cause derives from `ReshardError`; the CLI prints its
message as one line and exits 1 (set `RESHARD_DEBUG=1` for the traceback).
Each subclasses the stdlib error it refines, so `except ValueError` callers
keep working.
"""

from __future__ import annotations


class ReshardError(Exception):
    """Base class: a problem with the user's input, printed as one line."""


class LayoutError(ReshardError, ValueError):
    """A layout string that does not parse, or that does not fit the model."""


class SourceError(ReshardError, OSError):
    """A source checkpoint that cannot be opened, or whose tensors are wrong."""


class ConversionError(ReshardError, ValueError):
    """Source keys that no converter maps, or target tensors with a wrong shape."""


class CheckpointError(ReshardError, OSError):
    """A sharded checkpoint directory that is unfinished, missing files or corrupt."""


class VerificationError(ReshardError):
    """A sharded checkpoint whose files or tensors do not match what they should."""


class OutputError(ReshardError, OSError):
    """An output directory that cannot be written: disk full, locked by another run, not ours."""
