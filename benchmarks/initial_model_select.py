"""When can `initial-model`'s random starts be told apart? Many single starts (seeds) of the job on one data set,
then each start's map after mini-batch iteration J compared with the others' (`initial-model --iter 0 --start MAPS
--final-passes 1`: one pass over all particles per map, at iteration J's resolution limit, the images' noise
spectrum for all), for several J; the last, J = --iter, is what `--starts N` compares. For every N-subset of the
seeds, the rule "keep the start whose pass has the highest summed log-likelihood" keeps one seed; the table gives
how often that seed's own job ended at or below --good Å against the truth, and the mini-batch iterations a job
comparing its N starts after iteration J and taking only the kept one on would cost (N x J + --iter - J).

usage: python benchmarks/initial_model_select.py --work DIR --data SIM_DIR --seeds 0 1 ... [--select-at 10 20 150]
                                                  [--parallel P] [--device auto] [--maps-from DIR ...]
                                                  [--good 20] [--json OUT.json] [-- initial-model options]

Each seed's job: `benchmarks/initial_model.py --work DIR/wS --data SIM_DIR --json DIR/seedS.json -- --seed S
[options] --starts 1` (the default job with one start unless options are given), P at a time (several jobs share
one GPU); a seed whose JSON is already there is not run again. The comparisons use initial-model's default search whatever the options after
``--`` (they are the seeds' jobs' options). ``--maps-from`` adds the seeds of other such work folders (their wS/run maps and
seedS.json), e.g. seeds computed on another machine, to the comparisons, which are run here.
"""
from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from mpi_em.initial.schedule import schedule  # noqa: E402


def run_seed(work, data, seed, device, extra):
    out = os.path.join(work, f"seed{seed}.json")
    if os.path.exists(out):
        return seed, 0.0, "kept"
    t = time.time()
    cmd = [sys.executable, os.path.join(HERE, "initial_model.py"), "--work", os.path.join(work, f"w{seed}"),
           "--data", data, "--device", device, "--json", out, "--", "--seed", str(seed)] + list(extra)
    if "--starts" not in extra:  # one start per seed: the study compares the starts itself
        cmd += ["--starts", "1"]
    with open(os.path.join(work, f"w{seed}.log"), "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    return seed, time.time() - t, f"exit {rc}"


def seeds_in(folder):
    """{seed: (work folder, final FSC 0.5 vs truth)} of the finished seed jobs in ``folder``."""
    out = {}
    for path in glob.glob(os.path.join(folder, "seed*.json")):
        s = int(re.findall(r"seed(\d+)\.json$", path)[0])
        out[s] = (folder, float(json.load(open(path))["fsc05_A"][0]))
    return out


def compare(work, data, seeds, j, res_A, device):
    """The seeds' maps after iteration j in one comparison job (the default search of initial-model's passes: order 1,
    offsets 3 px) -> {seed: summed log-likelihood}."""
    maps = [os.path.join(seeds[s][0], f"w{s}", "run", f"run_it{j:03d}_class001.mrc") for s in sorted(seeds)]
    out = os.path.join(work, f"cmp{j}")
    cmd = [sys.executable, "-m", "mpi_em", "initial-model", "--i", os.path.join(data, "particles_unaligned.star"),
           "--o", out, "--overwrite", "--device", device, "--iter", "0", "--start", *maps, "--ini-high", f"{res_A}",
           "--final-high", f"{res_A}", "--final-passes", "1"]
    with open(out + ".log", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"comparison at iteration {j} failed (exit {rc}): {out}.log")
    text = open(os.path.join(out, "run.log")).read()
    lls = [float(x) for x in re.findall(r"start \d+ of \d+: a pass over all \d+ particles at [\d.]+ Å, summed "
                                        r"log-likelihood (\S+)", text)]
    return dict(zip(sorted(seeds), lls))


def rule_table(final, lls, good, n_max):
    """For N = 1..n_max: (kept <= good, N-subsets, subsets holding a <= good seed, kept is the subset's best)."""
    rows = {}
    for n in range(1, n_max + 1):
        subs = list(itertools.combinations(sorted(final), n))
        kept = [max(c, key=lambda s: lls[s]) for c in subs]
        rows[n] = {"kept_good": sum(final[k] <= good for k in kept), "subsets": len(subs),
                   "any_good": sum(any(final[s] <= good for s in c) for c in subs),
                   "kept_best": sum(final[k] == min(final[s] for s in c) for k, c in zip(kept, subs))}
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True)
    p.add_argument("--data", required=True, help="a folder written by `mpi-em simulate` (truth.mrc, particles)")
    p.add_argument("--seeds", type=int, nargs="*", default=[], help="seeds to run here")
    p.add_argument("--select-at", type=int, nargs="*", default=[10, 20, 40, 150],
                   help="iterations after which the maps are compared (default 10 20 40 150; none given: the seeds' "
                        "jobs only, e.g. to count how often a schedule finds the structure)")
    p.add_argument("--iter", type=int, default=150, help="the jobs' --iter (default 150, initial-model's)")
    p.add_argument("--parallel", type=int, default=1, help="seed jobs at a time (default 1)")
    p.add_argument("--device", default="auto")
    p.add_argument("--maps-from", nargs="*", default=[], help="work folders of earlier invocations of this script")
    p.add_argument("--good", type=float, default=20.0, help="a found map: FSC 0.5 vs truth at or below this, Å")
    p.add_argument("--n-max", type=int, default=4, help="largest N of the table (default 4)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    os.makedirs(a.work, exist_ok=True)
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=max(1, a.parallel)) as pool:
        for s, dt, how in pool.map(lambda s: run_seed(a.work, a.data, s, a.device, extra), a.seeds):
            print(f"seed {s}: {how}, {dt:.1f} s", flush=True)
    t_seeds = time.time() - t0
    seeds = {}
    for folder in a.maps_from + [a.work]:
        seeds.update(seeds_in(folder))
    final = {s: v[1] for s, v in seeds.items()}
    print(f"{len(seeds)} seeds: final map vs truth (Å) " + " ".join(f"{s}:{final[s]:.1f}" for s in sorted(final)))
    n_good = sum(v <= a.good for v in final.values())
    print(f"{n_good} of {len(final)} seeds at or below {a.good:g} Å", flush=True)
    result = {"command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
              "seconds_seeds": t_seeds, "final_fsc05_A": final, "good_A": a.good,
              "n_good": n_good, "options": extra, "iter": a.iter, "select": {}}
    if a.select_at:
        print(f"| J | resolution of the pass | N | mini-batch iterations | kept <= {a.good:g} Å | a <= {a.good:g} Å start "
              "among them | kept is the subset's best |")
        print("|---|---|---|---|---|---|---|")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    for j in a.select_at:
        res = max(schedule(j, a.iter, 30.0, 15.0), 15.0)
        t = time.time()
        lls = compare(a.work, a.data, seeds, j, round(res, 2), a.device)
        rows = rule_table(final, lls, a.good, a.n_max)
        result["select"][j] = {"resolution_A": res, "loglike": lls, "seconds": time.time() - t,
                               "order": sorted(lls, key=lambda s: -lls[s]), "rule": rows}
        for n, r in rows.items():
            print(f"| {j} | {res:.1f} Å | {n} | {n * j + a.iter - j} | {r['kept_good']} / {r['subsets']} "
                  f"({100.0 * r['kept_good'] / r['subsets']:.0f}%) | {r['any_good']} | {r['kept_best']} |", flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(result, f, indent=1)
    for j, r in result["select"].items():
        print(f"J = {j}: order by log-likelihood " + " ".join(f"{s}({final[s]:.0f})" for s in r["order"]))


if __name__ == "__main__":
    main()
