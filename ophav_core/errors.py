"""Errors a user can act on. The CLI maps them to exit codes (2 usage/config, 1 runtime) and prints one line."""
from __future__ import annotations


class OphavError(Exception):
    """A runtime failure with a message meant for a person (exit code 1)."""

    exit_code = 1


class UsageError(OphavError):
    """Bad input or configuration, found before any work starts (exit code 2)."""

    exit_code = 2


class ComponentNotFound(UsageError):
    pass


class DuplicateComponent(OphavError):
    pass


class InvalidData(OphavError):
    """A stage produced or received data that breaks its contract (wrong shape, NaN, count mismatch)."""


class WeightsMissing(OphavError):
    """A weights file a component needs is not on disk; the message names the file and where to get it."""


class NoFaceFound(OphavError):
    pass


class UnreadableCheckpoint(InvalidData):
    """A file given as a checkpoint is empty, damaged, not a PyTorch file, or holds Python objects beyond
    tensors (which could run code, so it is never unpickled)."""
