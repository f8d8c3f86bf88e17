"""Errors with messages that say what was wrong, where, and how to fix it."""

from __future__ import annotations

from pathlib import Path


class SaescopeError(Exception):
    """Base class for errors saescope raises on bad input."""


class SAEFileError(SaescopeError, ValueError):
    """An SAE file that cannot be loaded: names the file, the key and what was expected."""

    def __init__(self, path: str | Path, problem: str, *, key: str | None = None, expected: str | None = None):
        self.path = str(path)
        self.key = key
        self.expected = expected
        parts = [f"{self.path}:"]
        if key is not None:
            parts.append(f"key '{key}':")
        parts.append(problem)
        message = " ".join(parts)
        if expected is not None:
            message += f" (expected {expected})"
        super().__init__(message)
