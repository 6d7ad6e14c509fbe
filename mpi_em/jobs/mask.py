"""`mpi-em mask`: a soft solvent mask from a map, as RELION's `relion_mask_create`.

Optional low-pass of the map first (RELION's raised-cosine filter), binarisation at ``--threshold``, extension (or
shrinking) by ``--extend`` pixels, raised-cosine edge ``--soft-edge`` pixels wide; the mask is written as MRC with
the map's voxel size. Rank 0 does the work (the map is small next to the reconstruction), other ranks wait.
"""
from __future__ import annotations

import logging

import numpy as np

from ..distributed import root_step
from ..errors import InputError
from ..io import read_map, write_map
from ..masks import lowpass_map, threshold_mask

log = logging.getLogger("mpi_em")


def add_arguments(p) -> None:
    p.add_argument("--i", dest="input", required=True, metavar="MRC", help="map to threshold (MRC)")
    p.add_argument("--o", dest="output", required=True, metavar="MRC", help="output mask (MRC)")
    p.add_argument("--threshold", type=float, required=True,
                   help="density at which the map is binarised (after --lowpass), RELION's --ini_threshold")
    p.add_argument("--extend", type=float, default=0.0, metavar="PX",
                   help="extend the binary mask by this many pixels (negative: shrink), RELION's --extend_inimask "
                        "(default 0)")
    p.add_argument("--soft-edge", type=float, default=0.0, metavar="PX",
                   help="width of the raised-cosine soft edge in pixels, RELION's --width_soft_edge (default 0)")
    p.add_argument("--lowpass", type=float, default=0.0, metavar="A",
                   help="low-pass the map at this resolution in Å before binarising (default 0: none)")
    p.add_argument("--angpix", type=float, default=0.0, metavar="A",
                   help="voxel size in Å (default: the map's header)")
    p.add_argument("--invert", action="store_true", help="write 1 - mask")


def make_mask(args) -> dict:
    vol, header_apix = read_map(args.input)
    apix = args.angpix if args.angpix > 0 else header_apix
    if apix <= 0:
        raise InputError(args.input, "voxel size is 0 in the header; give --angpix", field="voxel_size")
    if args.soft_edge < 0:
        raise InputError("--soft-edge", f"must be >= 0, got {args.soft_edge}")
    if args.lowpass > 0:
        if args.lowpass < 2 * apix:
            raise InputError("--lowpass", f"{args.lowpass} Å is beyond Nyquist ({2 * apix:g} Å)")
        vol = lowpass_map(vol, args.lowpass, apix)
    mask = threshold_mask(vol, args.threshold, args.extend, args.soft_edge)
    if not (mask > 0).any():
        raise InputError(args.input, f"no voxel reaches --threshold {args.threshold:g} (map maximum "
                                     f"{float(np.max(vol)):.4g}{' after --lowpass' if args.lowpass > 0 else ''})",
                         field="data")
    if args.invert:
        mask = 1.0 - mask
    write_map(args.output, mask, apix)
    info = {"voxels_inside": int((mask >= 0.5).sum()), "fraction": float(mask.mean()), "pixel_size": apix,
            "map_max": float(np.max(vol))}
    log.info("mask %s: %d voxels >= 0.5 (mean %.3f), %.3f Å/px; map maximum %.4g%s", args.output,
             info["voxels_inside"], info["fraction"], apix, info["map_max"],
             " after the low-pass" if args.lowpass > 0 else "")
    return info


def run(args, comm) -> dict:
    return root_step(comm, make_mask, args)
