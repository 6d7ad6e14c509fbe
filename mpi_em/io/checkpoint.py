"""The EM jobs' checkpoints: one HDF5 file per finished iteration (``run_itNNN_checkpoint.h5``: arrays and a JSON
state attribute), then ``checkpoint.json``, the pointer that ``--continue`` reads (each written atomically, the
pointer last); the checkpoint the pointer named before is then removed (only the last one is needed to continue:
at box 512 each held the two half maps, ~1 GB, and a 30-iteration refine3d had filled a 64 GB disk; float32 maps are
now held by reference to the iteration's map files). What the arrays and the state mean is
:class:`mpi_em.em.state.EMState`'s business."""
from __future__ import annotations

import json
import os

from ..errors import InputError
from .atomic import atomic_path
from .mrc import read_hdf5, write_hdf5

POINTER = "checkpoint.json"


def checkpoint_name(it: int) -> str:
    return f"run_it{it:03d}_checkpoint.h5"


def write_checkpoint(out: str, it: int, mode: str, arrays: dict, attrs: dict, pointer: dict) -> None:
    """Iteration ``it``'s arrays and attributes, then the pointer to them (with ``pointer``'s entries)."""
    ck = checkpoint_name(it)
    write_hdf5(os.path.join(out, ck), arrays, attrs=attrs)
    path = os.path.join(out, POINTER)
    try:
        with open(path) as f:
            before = json.load(f).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        before = None
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump({"iteration": it, "checkpoint": ck, "mode": mode, **pointer}, f, indent=1)
    if before and before != ck and os.path.basename(before) == before:
        try:
            os.remove(os.path.join(out, before))
        except FileNotFoundError:
            pass


def read_checkpoint(folder: str, mode: str) -> tuple[dict, dict, dict]:
    """(pointer, arrays, attributes) of the last checkpoint in ``folder``; a one-line error when there is none or
    it is of another mode."""
    path = os.path.join(folder, POINTER)
    if not os.path.exists(path):
        raise InputError(path, "no checkpoint to continue from (no finished iteration in this folder)")
    with open(path) as f:
        ptr = json.load(f)
    if ptr.get("mode") != mode:
        raise InputError(path, f"checkpoint is of a {ptr.get('mode')} run, not {mode}", field="mode")
    arrays, attrs = read_hdf5(os.path.join(folder, ptr["checkpoint"]))
    return ptr, arrays, attrs
