"""How long a GPU rank's MRC header statistics of its maps take (``mpi_em.io.mrc.map_statistics``: min, max, mean and
standard deviation per map, computed in the M-step from the device maps so that the writer need not compute them
on the host), against the same four statistics as one reduction per map and statistic.

A box-256 class3d (K = 4) on one H100 spent ~0.08 s more per M-step with the one-reduction-per-map form than the tree
before the device statistics (benchmarks/results/relion-side-by-side/h100-box256-class3d-to-the-end-2026-12-06/
before-after/): a reduction of few long rows gets as many GPU blocks as rows. ``map_statistics`` reduces segments
of 512 voxels first and their results on the host.

    python benchmarks/map_statistics.py --json OUT.json            # NumPy on the host
    python benchmarks/map_statistics.py --gpu --json OUT.json      # CuPy: maps on the GPU

Prints one table (median seconds of ``--repeat`` calls after one not counted, the device synchronised) and writes
JSON.
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

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import mpi_em  # noqa: E402
from mpi_em.io.mrc import map_statistics  # noqa: E402


def one_reduction_per_map(maps):
    """The statistics as four reductions of the (V, voxels) maps along their voxels."""
    from mpi_em.backend import to_host, xp_of

    xp = xp_of(maps)
    flat = maps.reshape(maps.shape[0], -1)
    out = xp.stack([flat.min(axis=1).astype(xp.float64), flat.max(axis=1).astype(xp.float64),
                    flat.mean(axis=1, dtype=xp.float64), flat.std(axis=1, dtype=xp.float64)], axis=1)
    return to_host(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="maps on the GPU (CuPy)")
    p.add_argument("--boxes", type=int, nargs="+", default=[128, 256, 360])
    p.add_argument("--maps", type=int, default=4, help="maps per call (class3d's K; default 4)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", metavar="FILE")
    a = p.parse_args(argv)
    if a.gpu:
        import cupy as xp

        sync = xp.cuda.Device().synchronize
        device = xp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    else:
        xp, sync, device = np, (lambda: None), platform.processor() or platform.machine()
    rows = []
    for box in a.boxes:
        maps = xp.asarray(np.random.default_rng(0).standard_normal((a.maps, box, box, box), dtype=np.float32))
        row = {"box": box, "maps": a.maps}
        for name, fn in (("one_reduction_per_map", one_reduction_per_map), ("two_stages", map_statistics)):
            fn(maps)
            sync()
            ts = []
            for _ in range(a.repeat):
                t = time.perf_counter()
                s = fn(maps)
                sync()
                ts.append(time.perf_counter() - t)
            row[name] = statistics.median(ts)
            row[name + "_values"] = s.tolist()
        assert np.allclose(row["two_stages_values"], row["one_reduction_per_map_values"], rtol=1e-6, atol=1e-7)
        rows.append(row)
        del maps
    print(f"device: {device}")
    print(f"{'box':>5} {'maps':>5} {'one reduction per map s':>25} {'two stages s':>14} {'ratio':>7}")
    for r in rows:
        print(f"{r['box']:>5} {r['maps']:>5} {r['one_reduction_per_map']:>25.4f} {r['two_stages']:>14.4f} "
              f"{r['one_reduction_per_map'] / r['two_stages']:>7.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": device, "gpu": a.gpu, "mpi_em_version": mpi_em.__version__, "repeat": a.repeat,
                       "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
                       "date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
