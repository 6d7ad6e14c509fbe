"""3D references prepared for projection on one rank (:class:`mpi_em.em.references.References`): the padded
transform and, on CPU ranks, the centred layout of the CPU projector (:class:`mpi_em.fourier.CentredVolumes`), of
the whole padded grid or only within the reach of the E-step's r_max (``reach``: what initial-model passes), and one
projection of a pose grid from each. Random maps, K volumes.

    python benchmarks/references.py --box 128 256 --r 13 26 [--K 1] [--poses 576] [--repeats 3] [--json OUT.json]

Prints one table (median seconds) and writes JSON; CPU ranks (the GPU projects from the FFT layout).
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the scripts' shared parts

from mpi_em.em.references import References  # noqa: E402
from mpi_em.fourier import SliceGeometry, padded_reach  # noqa: E402
from mpi_em.geometry import euler_to_matrix, random_rotations  # noqa: E402
from mstep import _time  # noqa: E402 - median seconds after a first call


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--box", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--r", type=float, nargs="+", default=[13.0, 26.0], help="the E-step's r_max (px); one per box")
    ap.add_argument("--K", type=int, default=1)
    ap.add_argument("--pad", type=int, default=2)
    ap.add_argument("--poses", type=int, default=576)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    for box, r in zip(a.box, a.r):
        maps = rng.normal(size=(a.K, box, box, box)).astype(np.float32)
        geom = SliceGeometry(box, r_max=r, pad=a.pad)
        A = euler_to_matrix(*random_rotations(a.poses, rng))
        vol = np.zeros(a.poses, dtype=np.int64)
        row = {"box": box, "r": r, "K": a.K, "poses": a.poses}
        for name, reach in (("whole", None), ("reach", padded_reach(r, a.pad))):
            row[f"prepare_{name}"] = _time(lambda: References(maps, 3, a.pad, reach=reach), np, a.repeats)
            refs = References(maps, 3, a.pad, reach=reach)
            row[f"project_{name}"] = _time(lambda: refs.project(A, vol, geom), np, a.repeats)
            row[f"layout_bytes_{name}"] = int(refs.centred.C.nbytes)
        rows.append(row)
    print(f"| box | r px | prepare, whole grid, s | within the reach, s | project {a.poses} poses, whole, s | "
          "within the reach, s | layout MB, whole | within the reach |")
    print("|---|---|---|---|---|---|---|---|")
    for x in rows:
        print(f"| {x['box']} | {x['r']:.0f} | {x['prepare_whole']:.3f} | {x['prepare_reach']:.3f} | "
              f"{x['project_whole']:.3f} | {x['project_reach']:.3f} | {x['layout_bytes_whole'] / 1e6:.0f} | "
              f"{x['layout_bytes_reach'] / 1e6:.1f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "device": "cpu", "machine": platform.node(), "cpus": os.cpu_count(),
                       "threads": os.environ.get("OMP_NUM_THREADS"), "date": time.strftime("%Y-%m-%d"),
                       "argv": sys.argv[1:] if argv is None else argv}, f, indent=1)


if __name__ == "__main__":
    main()
