"""Errors that end a job with one clear line naming the file and the field."""
from __future__ import annotations


class MpiEmError(Exception):
    """A user-facing error: printed as one line, exit status 2 (bad input), 3 (output) or 1 (other).
    Every subclass must survive pickling (the background writer process sends its error back)."""

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

    def __reduce__(self):  # pickled by the background writer process: rebuilt from the same arguments
        return (type(self), (self.path, self.message, self.field))


class OutputError(MpiEmError):
    """An output that cannot be written (unwritable folder, full disk, ...)."""

    exit_code = 3

    def __init__(self, path, message: str):
        self.path = str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}")

    def __reduce__(self):
        return (type(self), (self.path, self.message))


def out_of_memory_line(err: BaseException, out_dir: str | None = None) -> str | None:
    """One line for a job that ran out of host or GPU memory after its memory check (the model is an estimate),
    saying what the model said and what would lighten the job; None for any other error."""
    name = type(err).__name__
    if not (isinstance(err, MemoryError) or name == "OutOfMemoryError"):
        return None
    model = ""
    try:
        import json
        import os

        mem = json.load(open(os.path.join(out_dir, "run.json")))["memory"]
        model = (f"; the memory model estimated {mem['peak_bytes'] / 2 ** 30:.3g} GiB per rank at the peak "
                 f"({mem['peak_phase']}, {os.path.join(out_dir, 'run.json')})")
    except (OSError, KeyError, ValueError, TypeError):
        pass
    what = " ".join(str(err).split()) or name
    return (f"out of memory: {what}{model}. Rerun with --max-memory below what the device has (the job then "
            f"lightens itself before it allocates: smaller batches, single-precision accumulators, images read "
            f"from disk) or on more ranks")
