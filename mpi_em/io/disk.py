"""The disk an EM job writes to: whether the files of the iterations still allowed will fit."""
from __future__ import annotations

import glob
import os
import shutil

from .checkpoint import checkpoint_name


def disk_outlook(folder: str, first: int, iterations: int) -> str | None:
    """After iteration ``first``'s files are written (``run_itNNN_*``): their bytes, the checkpoint excepted (only
    the last one is kept, :func:`mpi_em.io.checkpoint.write_checkpoint`), times the iterations still allowed up to
    ``iterations``, plus one iteration's worth for the final copies (``run_*``), against the free space of the
    folder's file system. A warning text naming the figures and what to do when they would not fit, else None.
    An upper bound: a run that converges stops earlier."""
    from ..memory.model import fmt

    prefix = os.path.join(folder, f"run_it{first:03d}_")
    ck = os.path.join(folder, checkpoint_name(first))
    per_it = sum(os.path.getsize(f) for f in glob.glob(glob.escape(prefix) + "*") if f != ck)
    more = max(0, iterations - first)
    need = per_it * (more + 1)
    free = shutil.disk_usage(folder).free
    if need <= free:
        return None
    return (f"disk: iteration {first} wrote {fmt(per_it)}; up to {more} more iterations and the final files need "
            f"{fmt(need)}, {fmt(free)} free on {folder}: the job will stop with an error naming the file when the "
            f"disk is full (free space, e.g. the maps of early iterations, then --continue), or give it fewer "
            f"iterations (--iter)")
