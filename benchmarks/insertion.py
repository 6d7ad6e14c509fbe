"""Fourier insertion throughput (particles/s, voxel updates/s) at several boxes, CPU or GPU.

One "voxel update" is one stencil point of the trilinear back-projection (8 per in-ball image frequency);
each costs 3 float scatter-adds (real and imaginary part of F, and W). The scatter-add ceiling of the same
device is measured in the same run (random and sorted indices, float32 and float64), so the fraction of the
ceiling is a ratio from one run.

    python benchmarks/insertion.py --device gpu --box 64 128 256 --project --anchor-n 100000 --json OUT.json

On the GPU both paths are timed: 'stencil' (the array formulation: stencil arrays + atomic adds, cupy.add.at) and
'fused' (the CUDA kernels of mpi_em.kernels; selected by MPI_EM_FUSED_KERNELS).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mpi_em.backend import get_xp, scatter_add, synchronize  # noqa: E402
from mpi_em.fourier import SliceGeometry  # noqa: E402
from mpi_em.geometry import euler_to_matrix, random_rotations  # noqa: E402
from mpi_em.reconstruction import Accumulators, insert  # noqa: E402


def timed(fn, xp, repeats=3):
    fn()
    synchronize(xp)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        synchronize(xp)
        best = min(best, time.perf_counter() - t)
    return best


def scatter_ceiling(xp, size, n_adds, dtype, sorted_idx):
    rng = np.random.default_rng(0)
    idx = rng.integers(0, size, n_adds)
    if sorted_idx:
        idx.sort()
    idx = xp.asarray(idx)
    vals = xp.ones(n_adds, dtype=dtype)
    target = xp.zeros(size, dtype=dtype)
    t = timed(lambda: scatter_add(target, idx, vals), xp)
    return n_adds / t


def _path(fused: bool):
    os.environ["MPI_EM_FUSED_KERNELS"] = "1" if fused else "0"
    return "fused" if fused else "stencil"


def bench_project(xp, box, n, batch, fused):
    """Slice extraction from a complex64 reference (the E-step's fine pass): projections/s."""
    from mpi_em.fourier import project

    rng = np.random.default_rng(2)
    geom = SliceGeometry(box, xp=xp)
    vol = (xp.asarray(rng.normal(size=geom.vol_shape)) + 1j).astype(np.complex64)
    A = euler_to_matrix(*random_rotations(n, rng), xp=xp)
    path = _path(fused)

    def run():
        for s in range(0, n, batch):
            project(vol, A[s:s + batch], geom)

    t = timed(run, xp, repeats=2)
    return {"box": box, "path": path, "projections": n, "seconds": t, "projections_per_s": n / t,
            "points_per_s": n * geom.m / t, "gathers_per_s": 8 * n * geom.m / t}


def bench_symmetry_anchor(xp, box, n, n_sym, batch):
    """Umpalumpa's anchor: n projections of box^2 with n_sym symmetry copies each, two ways on the same data:
    every copy inserted (fused kernel, copies looped inside the thread) and RELION's way, each projection
    inserted once and the summed accumulators symmetrised (:func:`mpi_em.symmetrise.symmetrise`). Their results
    differ by the trilinear re-sampling of the sum: reported as the relative RMS difference of the two maps."""
    from mpi_em.fourier import reconstruct
    from mpi_em.symmetrise import symmetrise
    from mpi_em.geometry import random_rotations as rr

    rng = np.random.default_rng(3)
    geom = SliceGeometry(box, xp=xp)
    L = euler_to_matrix(*rr(n_sym, rng))
    A = euler_to_matrix(*random_rotations(n, rng), xp=xp)
    # the data: central slices of a phantom (smooth on the padded grid, as real accumulators are), CTF^2-like
    # weights; computed before timing
    from mpi_em.fourier import project, volume_fft
    from mpi_em.simulate import phantom

    Fv = volume_fft(xp.asarray(phantom(box, seed=5), dtype=xp.float64)).astype(xp.complex64)
    _path(True)
    data = xp.concatenate([project(Fv, A[s:s + batch], geom) for s in range(0, n, batch)])
    w = xp.asarray(rng.uniform(0.2, 1.0, (batch, geom.m))).astype(np.float32)
    accs = {}

    def run_copies():
        acc = accs["copies"] = Accumulators(geom, n_vol=1)
        for s in range(0, n, batch):
            e = min(n, s + batch)
            insert(acc, 0, A[s:e], data[s:e], w[:e - s], sym_mats=L)

    def run_once():
        acc = accs["once"] = Accumulators(geom, n_vol=1)
        for s in range(0, n, batch):
            e = min(n, s + batch)
            insert(acc, 0, A[s:e], data[s:e], w[:e - s])

    def run_symmetrise():
        symmetrise(accs["once"].F, accs["once"].W, L)

    t = timed(run_copies, xp, repeats=1)
    t_once = timed(run_once, xp, repeats=1)
    t_sym = timed(run_symmetrise, xp, repeats=1)  # (re-symmetrises: timing only; the result below is redone)
    run_once()
    run_symmetrise()
    ma = reconstruct(accs["copies"].F[0], accs["copies"].W[0], box)
    mb = reconstruct(accs["once"].F[0], accs["once"].W[0], box)
    rel = float(xp.sqrt(((ma - mb) ** 2).sum() / (ma ** 2).sum()))
    t2 = t_once + t_sym
    return {"box": box, "projections": n, "symmetry_copies": n_sym, "in_ball_points": geom.m,
            "half_plane_points": box * (box // 2 + 1), "seconds": t,
            "plane_insertions_per_s": n * n_sym / t, "voxel_updates_per_s": 8 * n * n_sym * geom.m / t,
            "seconds_scaled_to_full_half_plane": t * box * (box // 2 + 1) / geom.m,
            "symmetrised_sum": {"seconds_insert_once": t_once, "seconds_symmetrise": t_sym, "seconds": t2,
                                "seconds_scaled_to_full_half_plane": t_once * box * (box // 2 + 1) / geom.m + t_sym,
                                "relative_rms_map_difference_to_copies": rel}}


def bench_box(xp, box, n, batch, acc_dtype, fused=False):
    rng = np.random.default_rng(1)
    geom = SliceGeometry(box, xp=xp)
    acc = Accumulators(geom, n_vol=1, dtype=acc_dtype)
    A = euler_to_matrix(*random_rotations(n, rng), xp=xp)
    cdt = np.complex64
    data = (xp.asarray(rng.normal(size=(n, geom.m))) + 1j * xp.asarray(rng.normal(size=(n, geom.m)))).astype(cdt)
    w = xp.asarray(rng.random((n, geom.m))).astype(np.float32)

    path = _path(fused)

    def run():
        for s in range(0, n, batch):
            insert(acc, 0, A[s:s + batch], data[s:s + batch], w[s:s + batch])

    t = timed(run, xp, repeats=2)
    upd = n * geom.m * 8
    return {"box": box, "path": path, "particles": n, "batch": batch, "accumulator": np.dtype(acc_dtype).name,
            "in_ball_points": geom.m, "seconds": t, "particles_per_s": n / t, "voxel_updates_per_s": upd / t,
            "float_adds_per_s": 3 * upd / t}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--box", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--n", type=int, default=None, help="particles per box (default: 2000 CPU, 20000 GPU)")
    ap.add_argument("--batch", type=int, default=None, help="particles per batch (default 256 CPU, 2048 GPU)")
    ap.add_argument("--acc", default="complex128", choices=["complex64", "complex128"],
                    help="accumulator precision")
    ap.add_argument("--project", action="store_true", help="also time slice extraction (projection)")
    ap.add_argument("--anchor-n", type=int, default=0,
                    help="also time N box-64 projections x 78 symmetry copies (Umpalumpa's anchor: 100000)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    xp = get_xp(args.device)
    n = args.n or (20000 if args.device == "gpu" else 2000)
    batch = args.batch or (2048 if args.device == "gpu" else 256)
    info = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "device": args.device,
            "host": platform.node(), "python": platform.python_version(), "numpy": np.__version__}
    if args.device == "gpu":
        import cupy

        info["gpu"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        info["cupy"] = cupy.__version__
    size, n_adds = (2 ** 26, 2 ** 25) if args.device == "gpu" else (2 ** 22, 2 ** 22)
    ceilings = {}
    for dt in ("float32", "float64"):
        for srt in (False, True):
            key = f"{dt}_{'sorted' if srt else 'random'}"
            ceilings[key] = scatter_ceiling(xp, size, n_adds, np.dtype(dt), srt)
    paths = [False, True] if args.device == "gpu" else [False]
    rows = [bench_box(xp, b, n if b <= 128 else max(n // 4, 500), batch if b <= 128 else max(batch // 4, 64),
                      np.dtype(args.acc), fused) for b in args.box for fused in paths
            if not (fused and args.acc != "complex128")]
    proj = [bench_project(xp, b, n, batch, fused) for b in args.box for fused in paths] if args.project else []
    anchor = bench_symmetry_anchor(xp, 64, args.anchor_n, 78, 1024) if args.anchor_n else None
    acc_real = "float64" if args.acc == "complex128" else "float32"
    for r in rows:
        r["fraction_of_random_ceiling"] = r["float_adds_per_s"] / ceilings[f"{acc_real}_random"]
        r["fraction_of_sorted_ceiling"] = r["float_adds_per_s"] / ceilings[f"{acc_real}_sorted"]
    print(f"device {info.get('gpu', args.device)}; scatter-add ceilings (G adds/s): " +
          ", ".join(f"{k} {v / 1e9:.3g}" for k, v in ceilings.items()))
    print(f"{'box':>5} {'path':>8} {'acc':>10} {'particles/s':>12} {'G vox upd/s':>12} {'G adds/s':>9} "
          f"{'% random':>9} {'% sorted':>9}")
    for r in rows:
        print(f"{r['box']:>5} {r['path']:>8} {r['accumulator']:>10} {r['particles_per_s']:>12.0f} "
              f"{r['voxel_updates_per_s'] / 1e9:>12.2f} {r['float_adds_per_s'] / 1e9:>9.2f} "
              f"{100 * r['fraction_of_random_ceiling']:>8.1f}% {100 * r['fraction_of_sorted_ceiling']:>8.1f}%")
    for p in proj:
        print(f"projection box {p['box']:>4} {p['path']:>8}: {p['projections_per_s']:>12.0f} projections/s, "
              f"{p['gathers_per_s'] / 1e9:.1f} G trilinear gathers/s")
    if anchor:
        print(f"symmetry anchor: {anchor['projections']} projections of box {anchor['box']} x {anchor['symmetry_copies']} "
              f"copies in {anchor['seconds']:.2f} s ({anchor['seconds_scaled_to_full_half_plane']:.2f} s scaled to the "
              f"full {anchor['half_plane_points']}-point half plane; Umpalumpa: 6.3 s on 2x RTX 3090)")
        ss = anchor["symmetrised_sum"]
        print(f"  symmetrised sum (RELION): insert once {ss['seconds_insert_once']:.3f} s + symmetrise "
              f"{ss['seconds_symmetrise']:.3f} s = {ss['seconds']:.3f} s ({ss['seconds_scaled_to_full_half_plane']:.3f} s "
              f"scaled); relative RMS difference of the maps to per-copy insertion {ss['relative_rms_map_difference_to_copies']:.2e}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"info": info, "ceilings_adds_per_s": ceilings, "results": rows, "projection": proj,
                       "symmetry_anchor": anchor}, f, indent=2)


if __name__ == "__main__":
    main()
