"""How long a large particles STAR file takes to write, by one formatting process and by several
(``mpi_em.io.star_write``: row ranges formatted at once by forked processes through ``starfile.write`` and joined).

Every EM iteration writes the particles STAR of the whole data set in rank 0's background writer; when that takes
longer than an iteration, the job waits for it. A RELION-like table (image and micrograph names, coordinates, CTF,
optics group) with the columns an iteration sets; each count of processes writes the same text (checked).

    python benchmarks/star_write.py --n 750000 --workers 1 2 4 8 --json OUT.json

Prints one table and writes JSON. CPU only; the files go to a new folder under the temporary directory.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mpi_em.io.star_write import format_workers, write_particles  # noqa: E402


def table(n: int, seed: int = 0):
    import pandas as pd

    rng = np.random.default_rng(seed)
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
                           "rlnImagePixelSize": [1.06], "rlnImageSize": [256], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                           "rlnImageDimensionality": [2]})
    particles = pd.DataFrame({
        "rlnImageName": [f"{i % 1000 + 1:06d}@Extract/job012/Movies/mic_{i // 1000:05d}.mrcs" for i in range(n)],
        "rlnMicrographName": [f"MotionCorr/job002/Movies/mic_{i // 1000:05d}.mrc" for i in range(n)],
        "rlnCoordinateX": rng.uniform(0, 4000, n), "rlnCoordinateY": rng.uniform(0, 4000, n),
        "rlnDefocusU": rng.uniform(8000, 25000, n), "rlnDefocusV": rng.uniform(8000, 25000, n),
        "rlnDefocusAngle": rng.uniform(0, 180, n), "rlnCtfBfactor": np.zeros(n), "rlnCtfScalefactor": np.ones(n),
        "rlnPhaseShift": np.zeros(n), "rlnOpticsGroup": np.ones(n, int), "rlnGroupNumber": rng.integers(1, 200, n)})
    updates = {"rlnAnglePsi": rng.uniform(0, 360, n), "rlnOriginXAngst": rng.normal(0, 2, n),
               "rlnOriginYAngst": rng.normal(0, 2, n), "rlnClassNumber": rng.integers(1, 100, n),
               "rlnMaxValueProbDistribution": rng.uniform(0, 1, n),
               "rlnLogLikeliContribution": rng.normal(1e5, 1e3, n), "rlnNrOfSignificantSamples": rng.integers(1, 50, n)}
    return optics, particles, updates


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=750_000, help="particles (rows; default 750 000)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8],
                    help="formatting processes to time (default 1 2 4 8); the default choice is timed too")
    ap.add_argument("--repeat", type=int, default=2, help="writes per count (default 2; the best is reported)")
    ap.add_argument("--json", default=None, help="write the rows here")
    a = ap.parse_args(argv)
    optics, particles, updates = table(a.n)
    work = tempfile.mkdtemp(prefix="mpi_em_star_write_")
    counts = list(dict.fromkeys(list(a.workers) + [format_workers(a.n)]))
    rows, reference = [], None
    try:
        for w in counts:
            path = os.path.join(work, f"w{w}.star")
            secs = []
            for _ in range(a.repeat):
                t = time.perf_counter()
                write_particles(path, (optics, particles), updates=updates, workers=w)
                secs.append(time.perf_counter() - t)
            with open(path) as f:
                text = f.read().split("\n", 1)[1]   # starfile's time stamp aside
            reference = text if reference is None else reference
            rows.append({"workers": w, "default": w == format_workers(a.n), "seconds": min(secs),
                         "seconds_all": secs, "bytes": os.path.getsize(path), "same_text": text == reference})
            os.remove(path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = rows[0]["seconds"]
    print(f"particles STAR, {a.n} rows x {len(particles.columns) + len(updates)} columns "
          f"({rows[0]['bytes'] / 1e6:.0f} MB), {len(os.sched_getaffinity(0))} cores for this process")
    print(f"{'processes':>10} {'seconds':>8} {'speed-up':>9}  same text")
    for r in rows:
        print(f"{r['workers']:>10} {r['seconds']:8.2f} {base / r['seconds']:8.2f}x  {r['same_text']}"
              f"{'  (default)' if r['default'] else ''}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"command": " ".join([os.path.basename(sys.argv[0])] + (argv or sys.argv[1:])),
                       "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(),
                       "cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
                       "n": a.n, "rows": rows}, f, indent=2)
    return 0 if all(r["same_text"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
