"""Atomic file writes and output-folder checks."""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import tempfile
import time
import uuid

from ..errors import InputError, OutputError

#: errno values of a write that fails for lack of room (full disk or quota) or of a failing device
NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG}


def _os_error_in(e: BaseException):
    """The OSError behind ``e`` (itself, or in its cause/context chain: libraries such as h5py or matplotlib
    raise their own exception from the OSError), or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


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
        if isinstance(e, OutputError):
            raise
        os_err = _os_error_in(e) if isinstance(e, Exception) else None
        if os_err is not None:
            raise OutputError(final_path, f"cannot write: {os_error_text(os_err)}") from e
        raise


def os_error_text(e: OSError) -> str:
    """One line for an OSError: the system's text for its errno (h5py puts the errno inside a long multi-line
    message: 'errno = 28, error message = ...'), else its message on one line."""
    import re

    code = e.errno
    if not code:
        m = re.search(r"errno = (\d+)", str(e))
        code = int(m.group(1)) if m else None
    if code:
        return os.strerror(code)
    text = " ".join(str(e.strerror or e).split())
    return text if len(text) <= 200 else text[:197] + "..."


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


def _write_in_child(conn, fn, args, kwargs):
    """The writer process: run the call, send back None or its exception (the child never touches MPI or the
    GPU; it leaves through multiprocessing's os._exit, so no atexit handler such as MPI's finalize runs)."""
    try:
        fn(*args, **kwargs)
        conn.send(None)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        try:
            conn.send(e)
        except Exception:  # noqa: BLE001 - an exception that does not pickle
            conn.send(RuntimeError(f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def _quietly(fn) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - an optional head start (see BackgroundWriter's preload)
        pass


class BackgroundWriter:
    """Runs ``fn(*args)`` in the background: :meth:`submit` starts it and returns at once, so that rank 0 writes an
    iteration's outputs while every rank computes the next one; :meth:`wait` blocks until the last submission's
    calls have finished and re-raises the first one's exception. One submission at a time (submit waits for the previous one first), so
    files are written in iteration order; each file is still written atomically, and a job killed while a write
    runs leaves the previous checkpoint as the last complete one. :meth:`submit_all` starts several calls that
    write different files side by side (each in its own process).

    The call is made in a forked process where the platform forks (Linux), otherwise in a thread. A thread shares
    Python's global lock with the rank's main thread: formatting a 50 000-row STAR file there slowed the GPU
    E-step's kernel launches by more than the writing it hid (benchmarks/results/refine3d-convergence/writer-h200-2026-12-01/: 25.2 s of iterations with the files
    written in the main thread, 40.8 s with a writer thread). A forked child has its own interpreter and a
    copy-on-write snapshot of the arguments; its side effects are the files it writes.

    ``preload`` (a callable, e.g. importing the plotting library) runs once in this process, in a thread started
    at once, and has finished before the first call starts: forked writers inherit its imports instead of
    repeating them each iteration. Its failure is ignored (the calls then import for themselves)."""

    def __init__(self, use_process: bool | None = None, preload=None):
        import multiprocessing as mp
        import threading

        if use_process is None:
            use_process = "fork" in mp.get_all_start_methods()
        self._ctx = mp.get_context("fork") if use_process else None
        self._pool = None
        if not use_process:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mpi_em-writer")
        self._jobs = []
        self._preload = None
        if preload is not None:
            self._preload = threading.Thread(target=_quietly, args=(preload,), daemon=True,
                                             name="mpi_em-writer-preload")
            self._preload.start()

    def submit(self, fn, *args, **kwargs) -> None:
        self.submit_all([(fn, args, kwargs)])

    def submit_all(self, calls) -> None:
        """Start every ``(fn, args, kwargs)`` of ``calls`` at once, each in its own writer (forked process), after
        the previous calls have finished; :meth:`wait` waits for all of them. For calls that write different files
        and need not be in order (an iteration's data files and its figures)."""
        self.wait()
        if self._preload is not None:  # never fork while the preload's thread may hold an import lock
            self._preload.join()
            self._preload = None
        if self._ctx is None:
            self._jobs = [self._pool.submit(fn, *args, **kwargs) for fn, args, kwargs in calls]
            return
        import warnings

        jobs = []
        for fn, args, kwargs in calls:
            recv, send = self._ctx.Pipe(duplex=False)
            proc = self._ctx.Process(target=_write_in_child, args=(send, fn, args, kwargs), daemon=True,
                                     name="mpi_em-writer")
            with warnings.catch_warnings():  # Python 3.12+: fork of a multi-threaded process (the child only writes)
                warnings.simplefilter("ignore", DeprecationWarning)
                proc.start()
            send.close()
            jobs.append((proc, recv))
        self._jobs = jobs

    def wait(self) -> None:
        """Wait for every call of the last submission; re-raise the first failure (in the calls' order)."""
        jobs, self._jobs = self._jobs, []
        errors = []
        for job in jobs:
            try:
                self._wait_one(job)
            except BaseException as e:  # noqa: BLE001 - every writer waited for, then the first failure raised
                errors.append(e)
        if errors:
            raise errors[0]

    def _wait_one(self, job) -> None:
        if self._ctx is None:
            job.result()
            return
        proc, recv = job
        try:
            err = recv.recv()
        except EOFError:
            proc.join()
            raise OutputError("(background writer)", f"the writer process died (exit code {proc.exitcode}) "
                              "before finishing an iteration's files") from None
        finally:
            recv.close()
        proc.join()
        if err is not None:
            raise err

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)


# ------------------------------------------------------------------------------ output folders: runs and locks
LOCK_NAME = ".mpi_em.lock"
#: files that show a folder holds the results of a job (reconstruct, refine3d, class3d, class2d)
RUN_FILES = ("checkpoint.json", "run.json", "run_timings.json", "half1.mrc", "half2.mrc", "map.mrc")
RUN_PATTERNS = ("run_it[0-9][0-9][0-9]_*", "run_*.mrc", "run_*.mrcs", "run_*.star", "run_*.png")
#: besides those: the other files a run writes, removed too by --overwrite
OTHER_RUN_FILES = ("fsc.star", "fsc.png", "run.log")

_held_locks = []  # lock files held by this process for its life (released by the kernel when it ends)


def previous_run_files(folder) -> list[str]:
    """Names of the files in ``folder`` that a previous job wrote (sorted; [] for none)."""
    folder = os.fspath(folder)
    found = {f for f in RUN_FILES if os.path.isfile(os.path.join(folder, f))}
    for pat in RUN_PATTERNS:
        found.update(os.path.basename(f) for f in glob.glob(os.path.join(glob.escape(folder), pat))
                     if os.path.isfile(f))
    return sorted(found)


def lock_folder(folder) -> bool:
    """Take ``folder``'s lock file for the life of this process (flock: released by the kernel when the process
    ends, however it ends, so a killed job leaves no stale lock). Raises OutputError naming the job that holds it;
    returns False (and takes no lock) where the file system does not support locks."""
    import fcntl
    import socket
    import sys

    path = os.path.join(os.fspath(folder), LOCK_NAME)
    try:
        f = open(path, "a+")
    except OSError as e:
        raise OutputError(path, f"cannot create the lock file: {e.strerror or e}") from e
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise OutputError(os.fspath(folder), f"in use by another mpi-em job ({holder}): wait for it to end, or "
                          "choose another output folder") from None
    except OSError as e:  # no lock support (some network file systems): go on without
        f.close()
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        raise OutputError(path, f"cannot lock: {e.strerror or e}") from e
    with contextlib.suppress(OSError):
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                f"mpi-em {' '.join(sys.argv[1:])}\n")
        f.flush()
    _held_locks.append(f)
    return True


def claim_output(folder, continuing: bool = False, overwrite: bool = False) -> dict:
    """Rank 0, before a job writes anything: the output folder of a new run (created) or of a continued one (must
    exist), locked for the job's life. A new run refuses a folder that holds another run unless ``overwrite``,
    which removes that run's files first. Returns {'folder', 'locked', 'removed'}."""
    folder = os.path.abspath(os.fspath(folder))
    if continuing:
        if not os.path.isdir(folder):
            raise InputError(folder, "no such folder: nothing to continue (--continue takes the output folder of "
                             "an earlier run)")
    else:
        check_writable_dir(folder)
    locked = lock_folder(folder)
    removed = []
    if not continuing:
        found = previous_run_files(folder)
        if found and not overwrite:
            shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
            raise OutputError(folder, f"holds another run ({shown}): choose another --o, resume it with "
                              "--continue, or pass --overwrite to replace it")
        if found:
            for name in found + [f for f in OTHER_RUN_FILES if os.path.isfile(os.path.join(folder, f))]:
                try:
                    os.remove(os.path.join(folder, name))
                except OSError as e:
                    raise OutputError(os.path.join(folder, name), f"cannot remove (--overwrite): "
                                      f"{e.strerror or e}") from e
                removed.append(name)
    return {"folder": folder, "locked": locked, "removed": removed}
