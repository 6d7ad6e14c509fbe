"""Errors that end a job with one clear line naming the file and the field."""
from __future__ import annotations


class MpiEmError(Exception):
    """A user-facing error: printed as one line, exit status 2 (bad input) or 1 (other)."""

    exit_code = 1


class InputError(MpiEmError):
    """Bad input: names the file and, where there is one, the field (STAR column, MRC header field, ...)."""

    exit_code = 2

    def __init__(self, path, message: str, field: str | None = None):
        self.path = str(path)
        self.field = field
        self.message = message
        where = f"{self.path}" + (f": field {field}" if field else "")
        super().__init__(f"{where}: {message}")


class OutputError(MpiEmError):
    """An output that cannot be written (unwritable folder, full disk, ...)."""

    exit_code = 3

    def __init__(self, path, message: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")
