"""Checks of a particle set before a job's first iteration: errors for what cannot work (odd box, empty half set),
warnings for values that are legal but absurd (defocus), and the record of the input that ``--continue``
compares with."""
from __future__ import annotations

import hashlib
import logging
import os

import numpy as np

from ..errors import InputError

log = logging.getLogger("mpi_em")

#: defocus values outside [0, DEFOCUS_MAX] Å are warned about (a value in µm or nm, a sign error)
DEFOCUS_MAX = 1e6


def check_box(star) -> int:
    """The particles' box: even (the Fourier grids, RELION's centre N/2 and the half-ball packing assume it) and
    at least 8 pixels. Raises InputError naming the STAR file and rlnImageSize."""
    box = int(star.box[0])
    if box % 2 or box < 8:
        raise InputError(star.path, f"box {box} px is {'odd' if box % 2 else 'too small'}: mpi-em needs an even box "
                         "of at least 8 px (re-extract the particles, or crop them with relion_image_handler "
                         "--new_box)", field="rlnImageSize")
    return box


def check_half_sets(star, halves) -> None:
    """Gold-standard jobs: both half sets must hold particles (else a half map is empty: NaN, or a resolution
    read off noise). Raises InputError."""
    halves = np.asarray(halves)
    n = len(halves)
    if n < 2:
        raise InputError(star.path, f"{n} particle{'s' if n != 1 else ''}: gold-standard half maps need at least 2 "
                         "(one in each half set)")
    counts = [int(np.count_nonzero(halves == h)) for h in (1, 2)]
    for h, c in zip((1, 2), counts):
        if c == 0:
            raise InputError(star.path, f"every particle is in half set {3 - h}: half set {h} is empty (remove the "
                             "column to have the half sets assigned at random, or set it to 1 and 2)",
                             field="rlnRandomSubset")


def warn_absurd_values(star) -> list[str]:
    """Warnings (logged, and returned) for values that are legal but almost certainly wrong."""
    out = []
    for field, values in (("rlnDefocusU", star.defocus_u), ("rlnDefocusV", star.defocus_v)):
        v = np.asarray(values, dtype=np.float64)
        bad = np.flatnonzero((v < 0) | (v > DEFOCUS_MAX))
        if bad.size:
            i = int(bad[0])
            out.append(f"{star.path}: field {field}: {bad.size} particle(s) with a defocus below 0 or above "
                       f"{DEFOCUS_MAX:.0e} Å (row {i + 1}: {v[i]:g} Å): the CTF expects Å")
    for w in out:
        log.warning("warning: %s", w)
    return out


def input_record(star) -> dict:
    """What ``--continue`` checks the input against: absolute path, particle count, box, pixel size, and a digest
    of the image names in their order."""
    names = star.particles["rlnImageName"].astype(str).tolist() if "rlnImageName" in star.particles else []
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    return {"path": os.path.abspath(star.path), "n": int(star.n), "box": int(star.box[0]),
            "pixel_size": float(star.pixel_size[0]), "image_names_sha256": digest}


def check_same_input(now: dict, then: dict, folder) -> None:
    """Raise InputError (one line: what changed) when ``now`` (:func:`input_record` of the input read) differs
    from ``then`` (recorded in the checkpoint in ``folder``)."""
    changes = []
    field = None
    if now["n"] != then.get("n"):
        changes.append(f"{now['n']} particles instead of {then.get('n')}")
        field = field or "rlnImageName"
    if now["box"] != then.get("box"):
        changes.append(f"box {now['box']} px instead of {then.get('box')}")
        field = field or "rlnImageSize"
    if then.get("pixel_size") is not None and abs(now["pixel_size"] - then["pixel_size"]) > 1e-6 * then["pixel_size"]:
        changes.append(f"pixel size {now['pixel_size']:g} Å instead of {then['pixel_size']:g}")
        field = field or "rlnImagePixelSize"
    if not changes and now["image_names_sha256"] != then.get("image_names_sha256"):
        changes.append("other images (or another order) than the run's")
        field = "rlnImageName"
    if changes:
        raise InputError(now["path"], f"changed since the run started in {folder}: {', '.join(changes)} "
                         "(--continue needs the run's own particles)", field=field)
