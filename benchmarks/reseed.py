"""How long the re-seeding of collapsed classes takes per call (``mpi_em.em.classes.reseed_classes``), as the
class2d/class3d jobs call it in every iteration after the M-step, on rank 0's host maps.

A 25-iteration class3d (K = 4, box 256) on one H100 re-seeded a class in 7 of its iterations, and those took
1.5-2.3 s where the others took 0.63-0.8 s (benchmarks/results/relion-side-by-side/h100-classes-25-iterations-2026-12-06/).
This measures the call alone on made-up maps of the jobs' shapes: per case one call where classes are re-seeded
(``--reseeded`` of K) and one where none is (an iteration without re-seeding).

    python benchmarks/reseed.py --json OUT.json
    PYTHONPATH=/tmp/old python benchmarks/reseed.py --json OLD.json     # an older tree, exported there
    python benchmarks/reseed.py --gpu --json GPU.json                   # transforms and split on the GPU (CuPy)

Prints one table (median seconds of ``--repeat`` calls, after one call not counted) and writes JSON. ``--gpu``: the
call as a GPU rank makes it (``xp`` = CuPy: the host maps in and out, the draws on the host); an older tree whose
``reseed_classes`` has no ``xp`` is timed on the host.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import mpi_em  # noqa: E402
from mpi_em.em.classes import reseed_classes  # noqa: E402

#: (name, K, box, dimensions, current size r px, classes re-seeded in the call)
CASES = [("class3d K=4 box 256", 4, 256, 3, 31, 1), ("class3d K=4 box 360", 4, 360, 3, 45, 1),
         ("class2d K=50 box 256", 50, 256, 2, 20, 46), ("class2d K=50 box 360", 50, 360, 2, 25, 46)]


def _time(fn, repeat):
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3, help="calls per case; the median is reported (default 3)")
    p.add_argument("--json", metavar="FILE", help="write the table as JSON")
    p.add_argument("--gpu", action="store_true", help="the transforms and the split on the GPU (CuPy), as a GPU rank")
    a = p.parse_args(argv)
    kw = {}
    device = "cpu"
    if a.gpu:
        import inspect

        import cupy

        if "xp" in inspect.signature(reseed_classes).parameters:
            kw, device = {"xp": cupy}, cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    rows = []
    for name, K, box, ndim, r, n_low in CASES:
        maps = np.random.default_rng(0).standard_normal((K,) + (box,) * ndim).astype(np.float32)
        low = np.full(n_low, 0.01 / K)
        prior = np.r_[np.full(K - n_low, (1 - low.sum()) / (K - n_low)), low]
        prior[0] *= 1.5
        prior /= prior.sum()
        even = np.full(K, 1.0 / K)
        reseed_classes(maps, prior, r, 0.2, 0, 6, box, 1.5, **kw)  # first call: FFT plans, kernels (not counted)
        t_re = _time(lambda: reseed_classes(maps, prior, r, 0.2, 0, 6, box, 1.5, **kw), a.repeat)
        t_none = _time(lambda: reseed_classes(maps, even, r, 0.2, 0, 6, box, 1.5, **kw), a.repeat)
        done = reseed_classes(maps, prior, r, 0.2, 0, 6, box, 1.5)[2]
        rows.append({"case": name, "K": K, "box": box, "r": r, "reseeded": len(done), "seconds_reseed": t_re,
                     "seconds_none": t_none})
    print(f"{'case':<24}{'r px':>6}{'re-seeded':>11}{'s (re-seeding)':>16}{'s (none)':>10}")
    for x in rows:
        print(f"{x['case']:<24}{x['r']:>6}{x['reseeded']:>11}{x['seconds_reseed']:>16.3f}{x['seconds_none']:>10.3f}")
    if a.json:
        rec = {"command": " ".join([os.path.basename(sys.argv[0])] + (argv or sys.argv[1:])),
               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "mpi_em": os.path.dirname(mpi_em.__file__),
               "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "load_average_1min": os.getloadavg()[0], "numpy": np.__version__, "repeat": a.repeat, "device": device,
               "rows": rows}
        with open(a.json, "w") as f:
            json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
