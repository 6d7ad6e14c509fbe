"""The 3D M-step on one rank, part by part: the per-shell statistics of the accumulators
(:func:`mpi_em.em.model.shell_statistics`, with and without the mean |F/W|^2 that only the prior without a gold
standard or reference power uses) and the whole reconstruction of a classification
(:func:`mpi_em.em.model.reduce_and_reconstruct_3d` with RELION's prior from the references' power), on random
accumulators of K volumes in the layout the E-step accumulates into: the cube its current size reaches
(:func:`mpi_em.fourier.projector.cropped_size`; ``--layout cube``, the default, random everywhere) or the full
pad x box one (``--layout full``, initial-model's running sums: random inside the insertion's reach,
:func:`mpi_em.fourier.padded_reach`, zero past it, as the E-step leaves them).

    python benchmarks/mstep.py --box 128 256 --K 4 --r 20 40 [--layout full] [--device gpu] [--repeats 5]
        [--json OUT.json]

Prints one table (median seconds) and writes JSON. On a GPU each call is synchronised before the clock stops.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mpi_em.backend import get_xp, synchronize  # noqa: E402
from mpi_em.distributed import world  # noqa: E402
from mpi_em.em import model  # noqa: E402
from mpi_em.fourier import padded_reach, radius_3d  # noqa: E402
from mpi_em.fourier.projector import cropped_size  # noqa: E402


def _time(fn, xp, repeats):
    fn()  # first call: plans, imports, the pool
    synchronize(xp)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        synchronize(xp)
        out.append(time.perf_counter() - t)
    return float(np.median(out))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--box", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--r", type=float, nargs="+", default=[20.0, 40.0], help="current sizes (px); one per box")
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--pad", type=int, default=2)
    ap.add_argument("--layout", choices=["cube", "full"], default="cube")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    xp = get_xp(a.device)
    comm = world()
    rows = []
    for box, r in zip(a.box, a.r):
        side = cropped_size(r, a.pad, a.pad * box) if a.layout == "cube" else a.pad * box
        n_shells = box // 2 + 1
        rng = np.random.default_rng(0)
        shape = (a.K, side, side, side // 2 + 1)
        F = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
        W = rng.uniform(0.0, 1.0, shape).astype(np.float32)
        if a.layout == "full":  # nothing past the insertion's reach
            past = radius_3d(side) > padded_reach(r, a.pad)
            F[:, past], W[:, past] = 0, 0
        F, W = xp.asarray(F), xp.asarray(W)
        planes = np.arange(side)
        tau2_ref = np.full((a.K, n_shells), 1.0)
        row = {"box": box, "r": r, "K": a.K, "layout_side": side, "layout": a.layout}
        # as the M-step calls it: inside the insertion's reach where the function takes one (since 2026-12-07)
        reach = {"reach": padded_reach(r, a.pad)} if "reach" in inspect.signature(model.shell_statistics).parameters \
            else {}
        for power in (True, False):
            row[f"stats_power_{power}"] = _time(lambda: model.shell_statistics(comm, F, W, planes, side, a.pad,
                                                                               n_shells, power=power, **reach),
                                                xp, a.repeats)
        row["reconstruct_class3d"] = _time(lambda: model.reduce_and_reconstruct_3d(
            comm, F.copy(), W.copy(), box, a.pad, r, 4.0, False, tau2_ref=tau2_ref), xp, a.repeats)
        row["copy_accumulators"] = _time(lambda: (F.copy(), W.copy()), xp, a.repeats)
        rows.append(row)
        del F, W
    print(f"| box | r px | layout side | shell statistics with the mean power, s | without, s | class3d M-step "
          f"(reconstruct, K = {a.K}), s | of it the accumulators' copy, s |")
    print("|---|---|---|---|---|---|---|")
    for x in rows:
        print(f"| {x['box']} | {x['r']:.0f} | {x['layout_side']} | {x['stats_power_True']:.4f} | "
              f"{x['stats_power_False']:.4f} | {x['reconstruct_class3d']:.4f} | {x['copy_accumulators']:.4f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "device": a.device, "machine": platform.node(), "cpus": os.cpu_count(),
                       "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:] if argv is None else argv}, f,
                      indent=1)


if __name__ == "__main__":
    main()
