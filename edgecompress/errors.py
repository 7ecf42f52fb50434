"""User-facing errors: each names the problem and the fix, and maps to an exit code."""

from __future__ import annotations


class EdgeCompressError(Exception):
    """Base class for errors shown to a user as one clear message (no traceback)."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        msg = super().__str__()
        return f"{msg}\n  hint: {self.hint}" if self.hint else msg


class RecipeError(EdgeCompressError):
    """A recipe that does not validate (unknown key, wrong type, bad value)."""


class ModelLoadError(EdgeCompressError):
    """A model that cannot be found or loaded (unknown alias, missing or corrupt file)."""


class DataError(EdgeCompressError):
    """Calibration or evaluation data that is missing, unreadable or too short."""


class ArtifactError(EdgeCompressError):
    """An artifact folder that is missing, corrupt, or would be overwritten."""


class CheckFailed(EdgeCompressError):
    """An accuracy check whose metric crossed the recipe's threshold."""

    exit_code = 3
