"""class2d's re-seeding of collapsed classes: how many classes stay alive and how well they group the views.

For each simulated data set (truth known) and each re-seeding setting, one `mpi-em class2d` job; per iteration the
number of classes holding >= 10 particles, and at the last iteration the view spread (`mpi_em.evaluate.view_spread`:
the mean angle between a particle's true projection direction and its class's mean one; lower is better) beside
that of random classes of the same sizes. With `--relion-bin DIR`, RELION's 2D classification of the same
particles with the same K, iterations, psi step, tau2 fudge and offsets as a reference row.

    python benchmarks/class2d_reseed.py --work /tmp/reseed [--relion-bin /usr/bin] [--json out.json]

Prints one table; writes JSON. CPU, one rank per job.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

DATA = {  # name: mpi-em simulate options
    "compact-s1": ["--box", 32, "--apix", 5, "--n", 1000, "--snr", 1, "--seed", 1],
    "compact-s2": ["--box", 32, "--apix", 5, "--n", 1000, "--snr", 1, "--seed", 2],
    "lumpy-s1": ["--box", 32, "--apix", 4, "--n", 1000, "--snr", 1, "--seed", 1, "--domains", 4,
                 "--domain-spread", 0.12, "--domain-distance", 0.8],
}
SETTINGS = {  # name: class2d options
    "no re-seeding": ["--reseed-below", 0],
    "amplitude 0.02": ["--reseed-amplitude", 0.02],
    "amplitude 0.05 (default)": ["--reseed-amplitude", 0.05],
    "amplitude 0.1": ["--reseed-amplitude", 0.1],
    "amplitude 0.2 (before)": ["--reseed-amplitude", 0.2],
}


def _run(cmd, cwd=None):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    if r.returncode:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}\n{r.stderr[-2000:]}")
    return r


def _alive(star, K):
    from mpi_em.io import read_particles

    n = np.bincount(read_particles(star).particles["rlnClassNumber"].to_numpy(), minlength=K + 1)[1:]
    return int((n >= 10).sum())


def _random_spread(star, truth, seed=0):
    """The view spread of classes of the same sizes drawn at random (the particles' classes permuted)."""
    import starfile

    from mpi_em.evaluate import view_spread

    blocks = starfile.read(star, always_dict=True)
    p = blocks["particles"].copy()
    p["rlnClassNumber"] = np.random.default_rng(seed).permutation(p["rlnClassNumber"].to_numpy())
    out = str(star).replace(".star", "_permuted.star")
    starfile.write({**blocks, "particles": p}, out, overwrite=True)
    return view_spread(out, truth)


def _absolute_copy(data):
    """The unaligned particles' STAR with absolute image paths (RELION works in another folder)."""
    import starfile

    blocks = starfile.read(os.path.join(data, "particles_unaligned.star"), always_dict=True)
    p = blocks["particles"].copy()
    p["rlnImageName"] = [f"{s.split('@')[0]}@{os.path.join(data, s.split('@')[1])}" for s in p["rlnImageName"]]
    out = os.path.join(data, "particles_unaligned_abs.star")
    starfile.write({**blocks, "particles": p}, out, overwrite=True)
    return out


def main(argv=None):
    from mpi_em.evaluate import view_spread

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="folder for the data sets and jobs")
    ap.add_argument("--K", type=int, default=20, help="classes (default 20)")
    ap.add_argument("--iter", type=int, default=10, help="iterations (default 10)")
    ap.add_argument("--relion-bin", default=None, help="folder with relion_refine: a RELION reference row")
    ap.add_argument("--json", default=None, help="JSON output (default WORK/class2d_reseed.json)")
    a = ap.parse_args(argv)
    os.makedirs(a.work, exist_ok=True)
    mpi_em = [sys.executable, "-m", "mpi_em"]
    rows = []
    for dname, sim in DATA.items():
        data = os.path.abspath(os.path.join(a.work, dname))
        if not os.path.exists(os.path.join(data, "particles.star")):
            _run(mpi_em + ["simulate", "--out", data] + sim)
        truth = os.path.join(data, "particles.star")
        jobs = [(s, opts) for s, opts in SETTINGS.items()] + ([("RELION 3.1 EM", None)] if a.relion_bin else [])
        for sname, opts in jobs:
            out = os.path.join(a.work, f"{dname}-{len(rows)}")
            t0 = time.time()
            if opts is not None:
                _run(mpi_em + ["--quiet", "class2d", "--i", os.path.join(data, "particles_unaligned.star"), "--o",
                               out, "--K", a.K, "--iter", a.iter, "--overwrite"] + opts)
                star = lambda it: os.path.join(out, f"run_it{it:03d}_data.star")  # noqa: E731
            else:
                os.makedirs(out, exist_ok=True)
                diameter = 0.8 * float(sim[sim.index("--box") + 1]) * float(sim[sim.index("--apix") + 1])
                _run([os.path.join(a.relion_bin, "relion_refine"), "--i", _absolute_copy(data), "--o",
                      os.path.join(out, "run"), "--K", a.K, "--iter", a.iter, "--psi_step", 10, "--tau2_fudge", 2,
                      "--ctf", "--pad", 2, "--particle_diameter", diameter, "--offset_range", 3, "--offset_step",
                      2, "--oversampling", 1, "--flatten_solvent", "--zero_mask", "--dont_combine_weights_via_disc",
                      "--pool", 30, "--j", 2, "--dont_check_norm", "--random_seed", 1])
                star = lambda it: os.path.join(out, f"run_it{it:03d}_data.star")  # noqa: E731
            alive = [_alive(star(it), a.K) for it in range(1, a.iter + 1)]
            last = star(a.iter)
            row = {"data": dname, "setting": sname, "seconds": round(time.time() - t0, 1),
                   "alive_per_iteration": alive, "alive_min_from_3": min(alive[2:]), "alive_last": alive[-1],
                   "view_spread_deg": round(view_spread(last, truth), 1),
                   "random_spread_deg": round(_random_spread(last, truth), 1)}
            rows.append(row)
            print(f"{dname:11s} {sname:26s} alive>=10 per it {alive}  view spread {row['view_spread_deg']:5.1f} "
                  f"(random {row['random_spread_deg']:5.1f})  {row['seconds']:.0f} s", flush=True)
    out = a.json or os.path.join(a.work, "class2d_reseed.json")
    with open(out, "w") as f:
        json.dump({"command": " ".join(sys.argv), "K": a.K, "iter": a.iter, "data": DATA, "rows": rows}, f,
                  indent=1, default=str)
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
