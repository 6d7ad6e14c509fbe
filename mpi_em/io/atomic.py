"""Atomic file writes and output-folder checks."""
from __future__ import annotations

import contextlib
import os
import tempfile
import uuid

from ..errors import OutputError


def _temp_name(final_path: str) -> str:
    folder, base = os.path.split(os.path.abspath(final_path))
    ext = os.path.splitext(base)[1]
    # Hidden, unique, and keeps the extension at the end (".map.mrc.tmp-123-ab12.mrc").
    return os.path.join(folder, f".{base}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{ext}")


@contextlib.contextmanager
def atomic_path(final_path):
    """Yield a temporary path next to ``final_path``; on success move it onto
    ``final_path`` with ``os.replace``, on any exception remove it.

    The caller's writer writes to the yielded path. The final file therefore
    either keeps its old content or gets the complete new content, never a
    partial one. OSErrors (unwritable folder, full disk) become OutputError.
    """
    final_path = os.fspath(final_path)
    folder = os.path.dirname(os.path.abspath(final_path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise OutputError(final_path, f"cannot create output folder {folder}: {e.strerror or e}") from e
    tmp = _temp_name(final_path)
    try:
        yield tmp
        os.replace(tmp, final_path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise OutputError(final_path, f"cannot write: {e.strerror or e}") from e
        raise


def check_writable_dir(path) -> str:
    """Create folder ``path`` if needed and prove it is writable (create and
    remove a temporary file). Returns the absolute path; raises OutputError."""
    path = os.path.abspath(os.fspath(path))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise OutputError(path, f"cannot create output folder: {e.strerror or e}") from e
    if not os.path.isdir(path):
        raise OutputError(path, "output path exists and is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".mpi_em-write-test-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise OutputError(path, f"output folder is not writable: {e.strerror or e}") from e
    return path


class BackgroundWriter:
    """One writer thread: :meth:`submit` starts ``fn(*args)`` and returns at once, so that rank 0 writes an
    iteration's outputs while every rank computes the next one; :meth:`wait` blocks until the last submitted call
    has finished and re-raises its exception. One call at a time (submit waits for the previous one first), so
    files are written in iteration order; each file is still written atomically, and a job killed while a write
    runs leaves the previous checkpoint as the last complete one."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mpi_em-writer")
        self._fut = None

    def submit(self, fn, *args, **kwargs) -> None:
        self.wait()
        self._fut = self._pool.submit(fn, *args, **kwargs)

    def wait(self) -> None:
        fut, self._fut = self._fut, None
        if fut is not None:
            fut.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)
