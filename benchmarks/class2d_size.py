"""class2d's current image size: how each setting's size follows the resolution, what it costs and how well the
classes group the views.

One `mpi-em class2d` job per ``--job``, all on the same particles (simulated: the truth's poses in ``--truth``).
Per iteration: the current size used (r, px; from the run log), the reported resolution, the E-step's seconds
(run_timings.json), the classes holding >= 10 particles and the view spread (`mpi_em.evaluate.view_spread`: the mean
angle between a particle's true projection direction and its class's mean one; lower is better). A job's tree is
put first on PYTHONPATH (``.`` = this checkout), so an exported older tree runs side by side with this one.

    python benchmarks/class2d_size.py --i P.star --truth T.star --work DIR --K 50 --iter 6 \\
        --job "before=/tmp/before:" --job "after=.:--incr-size 10" [--json out.json] -- [class2d options]

Prints one table; writes JSON. CPU, one rank per job (OMP_NUM_THREADS as set by the caller).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def _alive(star, K):
    from mpi_em.io import read_particles

    n = np.bincount(read_particles(star).particles["rlnClassNumber"].to_numpy(), minlength=K + 1)[1:]
    return int((n >= 10).sum())


def _sizes(log_text: str, n_iter: int, box: int) -> list:
    """The r each iteration used: the first from the 'first current size' line (trees without it started at
    box / 4), then each iteration line's r (the next iteration's)."""
    first = re.search(r"first current size: r (\d+) px", log_text)
    nexts = [int(m) for m in re.findall(r"iteration \d+: E-step.*? r (\d+) px", log_text)]
    return [int(first.group(1)) if first else box // 4] + nexts[:n_iter - 1]


def run_job(name, tree, opts, args, extra):
    from mpi_em.evaluate import view_spread
    import starfile

    out = os.path.join(args.work, re.sub(r"[^A-Za-z0-9]+", "_", name))
    cmd = [sys.executable, "-m", "mpi_em", "class2d", "--i", args.i, "--o", out, "--K", str(args.K),
           "--iter", str(args.iter), "--device", "cpu"] + opts + extra
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if r.returncode:
        raise SystemExit(f"{name}: failed\n{r.stderr[-3000:]}")
    text = open(os.path.join(out, "run.log")).read()
    box = int(re.search(r"box (\d+)", text).group(1))
    sizes = _sizes(text, args.iter, box)
    timings = json.load(open(os.path.join(out, "run_timings.json")))
    rows = []
    for it in range(1, args.iter + 1):
        model = starfile.read(os.path.join(out, f"run_it{it:03d}_model.star"), always_dict=True)
        data = os.path.join(out, f"run_it{it:03d}_data.star")
        rows.append({"iteration": it, "r": sizes[it - 1],
                     "resolution": float(model["model_general"]["rlnCurrentResolution"].iloc[0]),
                     "seconds_estep": float(timings[it - 1]["per_rank"][0]["seconds_estep"]),
                     "seconds_iteration": float(timings[it - 1]["seconds_iteration"]),
                     "alive": _alive(data, args.K), "view_spread": float(view_spread(data, args.truth))})
    return {"job": name, "tree": tree, "options": opts, "wall": wall, "iterations": rows}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--i", required=True, help="particles STAR (unaligned)")
    p.add_argument("--truth", required=True, help="STAR with the particles' true poses")
    p.add_argument("--work", required=True, help="folder for the jobs")
    p.add_argument("--K", type=int, default=50)
    p.add_argument("--iter", type=int, default=6)
    p.add_argument("--job", action="append", required=True, metavar="NAME=TREE:OPTIONS",
                   help="a job: its name, the tree put first on PYTHONPATH, class2d options (space-separated)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    results = []
    for spec in args.job:
        name, rest = spec.split("=", 1)
        tree, opts = rest.split(":", 1)
        results.append(run_job(name, tree, opts.split(), args, extra))
        res = results[-1]
        print(f"{name}: {res['wall']:.1f} s", flush=True)
    print("| job | r per iteration (px) | resolution per iteration (Å) | E-step s per iteration | classes >= 10 | "
          "view spread ° per iteration | wall s |")
    print("|---|---|---|---|---|---|---|")
    for res in results:
        it = res["iterations"]

        def col(key, fmt="{}"):
            return " ".join(fmt.format(x[key]) for x in it)

        print(f"| {res['job']} | {col('r')} | {col('resolution', '{:.1f}')} | {col('seconds_estep', '{:.1f}')} | "
              f"{col('alive')} | {col('view_spread', '{:.1f}')} | {res['wall']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": argv, "class2d_options": extra, "jobs": results,
                       "date": time.strftime("%Y-%m-%d"), "machine": os.uname().machine,
                       "cpus": os.cpu_count()}, f, indent=1)


if __name__ == "__main__":
    main()
