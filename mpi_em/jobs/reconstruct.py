"""`mpi-em reconstruct`: distributed reconstruction from known poses, with gold-standard half maps and FSC.

Data path: rank 0 reads and checks the STAR file and the stacks' headers, assigns half sets, partitions the
particles and scatters the plan (metadata only). Each rank reads its own images, prepares CTF.X and CTF^2 and
inserts them into two half-set accumulators. The accumulators are summed over ranks (MPI reduce), rank 0
reconstructs half 1, half 2 and the combined map, computes the FSC and writes every output atomically.
"""
from __future__ import annotations

import json
import logging
import os
import time

import numpy as np

from ..backend import get_xp, synchronize, to_host
from ..ctf import ctf_images
from ..distributed import collective_step, make_plan, reduce_sum, root_step, select_device
from ..fourier import SliceGeometry, default_r_max, reconstruct
from ..fsc import fsc, resolution_at, shell_frequencies
from ..geometry import euler_to_matrix
from ..io import atomic_path, check_stacks, check_writable_dir, read_particles, write_map
from ..particles import iter_batches
from ..reconstruction import Accumulators, insert_images
from ..symmetry import symmetry_matrices

log = logging.getLogger("mpi_em")


def add_arguments(p) -> None:
    p.add_argument("--i", dest="input", required=True, metavar="STAR",
                   help="particles STAR file (RELION 3.1+; rlnImageName, CTF and pose columns)")
    p.add_argument("--o", dest="output", required=True, metavar="DIR",
                   help="output folder (created; half1.mrc, half2.mrc, map.mrc, fsc.star, fsc.png, run.json)")
    p.add_argument("--sym", default="C1", help="point-group symmetry: C<n>, D<n>, T, O, I (default C1)")
    p.add_argument("--batch", type=int, default=256, help="particles per insertion batch (default 256)")
    p.add_argument("--r-max", type=float, default=None,
                   help="highest frequency inserted, in Fourier pixels (default box/2 - 1)")
    p.add_argument("--pad", type=int, default=2, help="Fourier padding factor of the volume (default 2)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"],
                   help="auto: one GPU per rank when CuPy sees one, else CPU")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for half-set assignment when rlnRandomSubset is absent (default 0)")
    p.add_argument("--no-ctf", action="store_true", help="ignore the CTF (images are not CTF-corrected)")


def _load(args, size):
    check_writable_dir(args.output)
    star = read_particles(args.input)
    check_stacks(star)
    symmetry_matrices(args.sym)  # validates the name before any rank starts reading
    plans = make_plan(star, size, seed=args.seed)
    meta = {"box": int(star.box[0]), "pixel_size": float(star.pixel_size[0]), "n": star.n}
    return plans, meta


def insert_plan(plan, acc: Accumulators, box: int, pixel_size: float, batch: int, sym_mats, use_ctf=True,
                progress=None) -> int:
    """Insert a rank's particles into ``acc`` (volume = half set - 1). Returns the number inserted."""
    xp = acc.geom.xp
    done = 0
    for sl, imgs in iter_batches(plan, batch):
        A = euler_to_matrix(plan["rot"][sl], plan["tilt"][sl], plan["psi"][sl], xp=xp)
        ctf = None
        if use_ctf:
            ctf = ctf_images(box, pixel_size, plan["defocus_u"][sl], plan["defocus_v"][sl],
                             plan["defocus_angle"][sl], plan["voltage"][sl], plan["cs"][sl],
                             plan["amp_contrast"][sl], plan["phase_shift"][sl], plan["bfactor"][sl], xp=xp)
        shifts = np.stack([plan["origin_x"][sl], plan["origin_y"][sl]], axis=1) / pixel_size
        insert_images(acc, plan["half"][sl] - 1, xp.asarray(imgs), A, ctf, shifts, sym_mats)
        done += sl.stop - sl.start
        if progress:
            progress(done)
    synchronize(xp)
    return done


def run(args, comm) -> dict:
    t0 = time.time()
    plans, meta = root_step(comm, _load, args, comm.size)
    plan = comm.scatter(plans, root=0)
    del plans
    device = collective_step(comm, select_device, comm, args.device)
    xp = get_xp(device)
    box, apix = meta["box"], meta["pixel_size"]
    r_max = default_r_max(box) if args.r_max is None else args.r_max
    if comm.rank == 0:
        log.info("reconstruct: %d particles, box %d, %.3f Å/px, %s, %d rank(s); rank 0 on %s",
                 meta["n"], box, apix, args.sym, comm.size, device)
    sym = symmetry_matrices(args.sym)
    sym_mats = None if len(sym) == 1 else sym

    def _insert():
        geom = SliceGeometry(box, r_max=r_max, pad=args.pad, xp=xp)
        acc = Accumulators(geom, n_vol=2)
        n_local = len(plan["index"])
        step = max(1, n_local // 10)
        last = [0]

        def progress(done):
            if comm.rank == 0 and (done - last[0] >= step or done == n_local):
                last[0] = done
                log.info("  inserted %d / %d particles on rank 0 (%.0f%%)", done, n_local,
                         100.0 * done / max(n_local, 1))
        insert_plan(plan, acc, box, apix, args.batch, sym_mats, not args.no_ctf, progress)
        return acc

    t_ins = time.time()
    acc = collective_step(comm, _insert)
    t_ins = time.time() - t_ins
    t_red = time.time()
    F = reduce_sum(comm, acc.F)
    W = reduce_sum(comm, acc.W)
    t_red = time.time() - t_red

    def _finish():
        half1 = to_host(reconstruct(F[0], W[0], box, args.pad, r_max)).astype(np.float32)
        half2 = to_host(reconstruct(F[1], W[1], box, args.pad, r_max)).astype(np.float32)
        full = to_host(reconstruct(F[0] + F[1], W[0] + W[1], box, args.pad, r_max)).astype(np.float32)
        curve = fsc(half1, half2)
        res = resolution_at(curve, box, apix)
        freqs = shell_frequencies(box, apix)
        out = args.output
        write_map(os.path.join(out, "half1.mrc"), half1, apix)
        write_map(os.path.join(out, "half2.mrc"), half2, apix)
        write_map(os.path.join(out, "map.mrc"), full, apix)
        write_fsc_star(os.path.join(out, "fsc.star"), freqs, curve)
        from ..plots import fsc_png

        fsc_png(os.path.join(out, "fsc.png"), freqs, {"half1 vs half2": curve},
                title=f"gold-standard FSC: {res:.2f} Å at 0.143")
        summary = {"n_particles": meta["n"], "box": box, "pixel_size": apix, "sym": args.sym,
                   "ranks": comm.size, "device_rank0": device, "resolution_0143": res,
                   "seconds_total": time.time() - t0, "seconds_insert": t_ins, "seconds_reduce": t_red}
        with atomic_path(os.path.join(out, "run.json")) as tmp:
            with open(tmp, "w") as f:
                json.dump(summary, f, indent=2)
        log.info("gold-standard resolution %.2f Å (FSC 0.143); outputs in %s (%.1f s)", res, out,
                 summary["seconds_total"])
        return summary

    return root_step(comm, _finish)


def write_fsc_star(path, freqs, curve) -> None:
    import pandas as pd
    import starfile

    with np.errstate(divide="ignore"):
        ang = np.where(freqs > 0, 1.0 / np.where(freqs > 0, freqs, 1), 999.0)
    df = pd.DataFrame({"rlnSpectralIndex": np.arange(len(curve)), "rlnResolution": freqs,
                       "rlnAngstromResolution": ang, "rlnFourierShellCorrelation": np.asarray(curve)})
    with atomic_path(path) as tmp:
        starfile.write({"fsc": df}, tmp, float_format=None)
