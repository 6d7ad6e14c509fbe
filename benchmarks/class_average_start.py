"""Measure the class-average route to an ab-initio start: 2D classes of the particles (`mpi-em class2d`), an
ab-initio map from the class averages (`mpi-em initial-model --no-ctf` on them, several seeds), each map then used
as the start (`--start`) of an `initial-model` job on the particles, measured against the truth with
benchmarks/initial_model.py.

usage: python benchmarks/class_average_start.py --work DIR --data SIM_DIR [--K 40] [--class2d-iter 15]
                                                [--min-particles 20] [--seeds 0 1 2 3]
                                                [--avg-options "..."] [--particle-options "..."]

The class averages of `class2d` are CTF-corrected (Wiener averages: sum CTF X / (sum CTF^2 + 1 / tau^2)), so the
ab-initio job on them ignores the CTF (`--no-ctf`); WORK/averages/classes.star lists those of the classes that hold
at least --min-particles particles (a defocus of 0: not used). Each seed's row: the map vs truth FSC(0.5) after
the job on the particles (benchmarks/initial_model.py's measurement, its poses against the true ones). Rows go to
WORK/class_average_start.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys

import mrcfile
import numpy as np
import pandas as pd
import starfile

from mpi_em.io import write_stack


def class_average_star(class2d_dir: str, out_dir: str, n_particles: int, min_particles: int) -> int:
    """The final class averages holding >= min_particles particles -> out_dir/classes.mrcs + classes.star."""
    model = starfile.read(os.path.join(class2d_dir, "run_model.star"))["model_classes"]
    with mrcfile.open(os.path.join(class2d_dir, "run_classes.mrcs"), permissive=True) as f:
        avgs, apix = np.asarray(f.data, dtype=np.float32), float(f.voxel_size.x)
    keep = np.flatnonzero(model.rlnClassDistribution.values * n_particles >= min_particles)
    os.makedirs(out_dir, exist_ok=True)
    write_stack(os.path.join(out_dir, "classes.mrcs"), avgs[keep], apix)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["classes"], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                           "rlnImagePixelSize": [apix], "rlnImageSize": [avgs.shape[-1]],
                           "rlnImageDimensionality": [2]})
    parts = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@classes.mrcs" for i in range(len(keep))],
                          "rlnOpticsGroup": 1, "rlnDefocusU": 0.0, "rlnDefocusV": 0.0, "rlnDefocusAngle": 0.0})
    starfile.write({"optics": optics, "particles": parts}, os.path.join(out_dir, "classes.star"), overwrite=True)
    return len(keep)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True)
    p.add_argument("--data", required=True, help="a `mpi-em simulate` output")
    p.add_argument("--K", type=int, default=40, help="2D classes (default 40)")
    p.add_argument("--class2d-iter", type=int, default=15)
    p.add_argument("--min-particles", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--avg-options", default="--iter 40 --batch-size 10 --healpix-order 1 --ini-high 60",
                   help="initial-model options on the class averages")
    p.add_argument("--particle-options",
                   default="--iter 1 --batch-size 3000 --healpix-order 1 --ini-high 20 --sigma2-fudge 1",
                   help="initial-model options on the particles, started from each class-average map")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "gpu"])
    a = p.parse_args(argv)
    py = [sys.executable, "-m", "mpi_em", "--quiet"]
    os.makedirs(a.work, exist_ok=True)
    c2d = os.path.join(a.work, "class2d")
    if not os.path.exists(os.path.join(c2d, "run_classes.mrcs")):
        shutil.rmtree(c2d, ignore_errors=True)
        subprocess.run(py + ["class2d", "--i", os.path.join(a.data, "particles_unaligned.star"), "--o", c2d,
                             "--K", str(a.K), "--iter", str(a.class2d_iter), "--device", a.device], check=True)
    n = len(starfile.read(os.path.join(a.data, "particles.star"))["particles"])
    avg_dir = os.path.join(a.work, "averages")
    n_avg = class_average_star(c2d, avg_dir, n, a.min_particles)
    rows = []
    for s in a.seeds:
        out = os.path.join(avg_dir, f"seed{s}")
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run(py + ["initial-model", "--i", os.path.join(avg_dir, "classes.star"), "--o", out, "--no-ctf",
                             "--seed", str(s), "--device", a.device] + shlex.split(a.avg_options)
                       + ([] if "--starts" in a.avg_options else ["--starts", "1"]), check=True)  # a start per seed
        w = os.path.join(a.work, f"particles_seed{s}")
        subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "initial_model.py"), "--work", w,
                        "--data", a.data, "--device", a.device, "--"] + shlex.split(a.particle_options)
                       + ["--start", os.path.join(out, "run_class001.mrc")], check=True, capture_output=True)
        with open(os.path.join(w, "initial_model.json")) as f:
            row = json.load(f)
        rows.append({"seed": s, "class_averages": n_avg, "fsc05_A": row["fsc05_A"][0], "hand": row["hand"][0]})
        print(f"seed {s}: {n_avg} class averages -> map vs truth FSC 0.5 {rows[-1]['fsc05_A']:.1f} Å "
              f"({rows[-1]['hand']})", flush=True)
    with open(os.path.join(a.work, "class_average_start.json"), "w") as f:
        json.dump({"K": a.K, "avg_options": a.avg_options, "particle_options": a.particle_options, "rows": rows},
                  f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
