"""`mpi-em align-symmetry`: rotate (and re-centre) a map so that its symmetry axes lie on a point group's standard
axes (RELION's convention), then symmetrise it, as RELION's `relion_align_symmetry` (which writes the rotated map
only: ``--no-symmetrise``). The search is :func:`mpi_em.symaxis.find_symmetry_frame`; rank 0 does the work.

``--frame JSON`` writes the frame (rotation, shift in pixels, scores) so that particle poses can follow the map
(:func:`mpi_em.symaxis.poses_in_frame`); its ``euler_rot_tilt_psi`` are the angles of the rotation in RELION's
convention, what relion_align_symmetry prints as its solution (up to the group's normaliser).
"""
from __future__ import annotations

import json
import logging

import numpy as np

from ..distributed import root_step
from ..errors import InputError
from ..io import atomic_path, read_map, write_map
from ..symmetry import canonical_symmetry_name

log = logging.getLogger("mpi_em")


def add_arguments(p) -> None:
    p.add_argument("--i", dest="input", required=True, metavar="MRC", help="map made without symmetry (MRC)")
    p.add_argument("--o", dest="output", required=True, metavar="MRC", help="aligned (and symmetrised) map (MRC)")
    p.add_argument("--sym", required=True, help="target point group: C<n>, D<n>, T, O, I, I1-I4 (RELION's names)")
    p.add_argument("--angpix", type=float, default=0.0, metavar="A",
                   help="voxel size in Å (default: the map's header)")
    p.add_argument("--box-size", type=int, default=32, metavar="PX",
                   help="box of the low-passed working copy of the search (even, default 32; RELION's --box_size)")
    p.add_argument("--keep-centre", action="store_true",
                   help="do not re-centre the map on its centre of mass (RELION's --keep_centre)")
    p.add_argument("--no-symmetrise", action="store_true",
                   help="write the rotated map without averaging over the group (what relion_align_symmetry writes)")
    p.add_argument("--frame", metavar="JSON", help="also write the frame found (rotation, shift, scores) as JSON")


def align(args) -> dict:
    from ..symaxis import apply_symmetry_frame, find_symmetry_frame

    try:
        group = canonical_symmetry_name(args.sym)
    except ValueError as e:
        raise InputError("--sym", str(e)) from None
    if args.box_size < 8 or args.box_size % 2:
        raise InputError("--box-size", f"must be even and >= 8, got {args.box_size}")
    vol, header_apix = read_map(args.input)
    if len(set(vol.shape)) != 1:
        raise InputError(args.input, f"expected a cubic map, got shape {vol.shape}", field="nx/ny/nz")
    if not np.isfinite(vol).all():
        raise InputError(args.input, "non-finite values", field="data")
    apix = args.angpix if args.angpix > 0 else header_apix
    if apix <= 0:
        raise InputError(args.input, "voxel size is 0 in the header; give --angpix", field="voxel_size")
    frame = find_symmetry_frame(np.asarray(vol, dtype=np.float64), group, apix=apix, work_box=args.box_size,
                                centre=np.zeros(3) if args.keep_centre else None)
    out = apply_symmetry_frame(np.asarray(vol, dtype=np.float64), frame, "C1" if args.no_symmetrise else group)
    from ..geometry import matrix_to_euler

    rot, tilt, psi = (float(a[0]) for a in matrix_to_euler(frame.R))
    info = {"sym": group, "rotation": frame.R.tolist(), "euler_rot_tilt_psi": [rot, tilt, psi],
            "shift_px": frame.shift.tolist(), "score": frame.score, "c1_score": frame.c1_score,
            "sym_cc": frame.sym_cc, "step_deg": frame.step_deg, "pixel_size": apix}
    write_map(args.output, out, apix)
    if args.frame:
        with atomic_path(args.frame) as tmp, open(tmp, "w") as f:
            json.dump(info, f, indent=1)
    log.info("align-symmetry %s: %s axes at rot %.2f tilt %.2f psi %.2f deg, shift (%.2f, %.2f, %.2f) px; score "
             "%.3f (orientations not aligned: %.3f), symmetrised correlation %.3f -> %s", args.input, group, rot, tilt,
             psi, *frame.shift, frame.score, frame.c1_score, frame.sym_cc, args.output)
    return info


def run(args, comm) -> dict:
    return root_step(comm, align, args)
