"""User-facing errors.

Every problem a user can fix (a bad recipe, a missing checkpoint, an empty dataset, an output folder
that already exists) raises a ``TersaError`` whose message says what is wrong and how to fix it. The
CLI prints that message alone and exits with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class TersaError(Exception):
    """A problem with the user's input; the message names it and the fix."""

    exit_code = 2


class RecipeError(TersaError):
    """The recipe (YAML or the structures built from it) is invalid."""


class ModelError(TersaError):
    """The model cannot be found, read or handled."""


class DataError(TersaError):
    """The calibration or evaluation data cannot be found, read or used."""


class ExportError(TersaError):
    """An export folder cannot be written or read back."""


class ContainerError(ExportError):
    """A lossless container (``model.tersa``) is malformed, corrupt, truncated or over a limit."""
