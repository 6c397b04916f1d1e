"""Exceptions raised for bad user input.

Every message names the offending file (and row or column where there is one) and says what
to do about it, so a user can fix the input without reading a traceback.
"""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Raised when an input file or parameter is missing, malformed or inconsistent."""
