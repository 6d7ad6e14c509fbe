"""One mpi-em job from two source trees on the same machine, their runs alternated: the wall clock and the job's
own per-part seconds, to tell what a change did to a whole job (its per-part benchmarks do not say that).

The trees are folders holding an ``mpi_em`` package: this checkout (``--after``, default the repository root) and
an older one exported beforehand, e.g. ``git archive 8d09251 mpi_em | tar -x -C /tmp/before``. Each job is started as
``MPIRUN -n RANKS python -c '<the tree first on sys.path, then mpi_em as __main__>' JOB ARGS --o OUT`` (the tree
ahead of the working folder and of an installed or editable mpi_em), in the order after, before, before, after, ...
(ABBA: a first run's one-time costs, such as kernel compilation and a cold page cache, and a drift of the machine
fall on both trees alike).

    python benchmarks/em_before_after.py --before /tmp/before --repeats 2 --json OUT.json -- \\
        class3d --i DATA/particles_unaligned.star --ref DATA/start.mrc --K 4 --iter 25 --device gpu

Prints one table (per run: tree, wall clock from launch to exit, the job's own seconds, the time to the end of its
first iteration, the sum of its later iterations' wall clock, and the sums of its E-step, M-step, references and
model update from ``run_timings.json``) and the median per tree; writes JSON with every run and the command.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PARTS = ("estep", "mstep", "references", "update")


def order(repeats: int) -> list[str]:
    """The order of the trees' jobs: after, before, before, after, ... (``repeats`` jobs per tree)."""
    pairs = [("after", "before") if k % 2 == 0 else ("before", "after") for k in range(repeats)]
    return [t for p in pairs for t in p]


def launcher(tree: str) -> str:
    """``python -c`` code that runs mpi-em from ``tree``: the tree first on sys.path (ahead of the working folder,
    PYTHONPATH and an editable install's finder), then the package as __main__ with the command line's options."""
    return (f"import sys; sys.path.insert(0, {tree!r}); import runpy; "
            "runpy.run_module('mpi_em', run_name='__main__', alter_sys=True)")


def job_figures(out: str) -> dict:
    """The job's own figures from its folder: seconds (run.log's '... finished: N iterations in S s'), the end of
    its first iteration and the wall clock of the later ones (``seconds_since_start``), and per part the sums of
    every rank-0 iteration's ``seconds_<part>`` (a tree without a part: None)."""
    fig = {"seconds_job": None, "first_iteration_end": None, "later_iterations": None, "iterations": 0}
    log = os.path.join(out, "run.log")
    if os.path.exists(log):
        for line in open(log, errors="replace"):
            if " finished: " in line and " iterations in " in line:
                fig["seconds_job"] = float(line.rsplit(" iterations in ", 1)[1].split(" s")[0])
    path = os.path.join(out, "run_timings.json")
    rows = json.load(open(path)) if os.path.exists(path) else []
    if rows:
        fig["iterations"] = len(rows)
        fig["first_iteration_end"] = float(rows[0]["seconds_since_start"])
        fig["later_iterations"] = float(rows[-1]["seconds_since_start"] - rows[0]["seconds_since_start"])
        for part in PARTS:
            vals = [r["per_rank"][0].get(f"seconds_{part}") for r in rows]
            fig[part] = None if any(v is None for v in vals) else float(sum(vals))
    return fig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, metavar="DIR", help="the older tree (a folder with mpi_em/ in it)")
    p.add_argument("--after", default=ROOT, metavar="DIR", help="the newer tree (default: this checkout)")
    p.add_argument("--repeats", type=int, default=2, help="jobs per tree (default 2: after, before, before, "
                                                          "after)")
    p.add_argument("--ranks", type=int, default=1, help="MPI ranks of each run (default 1)")
    p.add_argument("--mpirun", default=None, metavar="PATH", help="mpirun (default: the one beside this Python, "
                                                                 "else on PATH)")
    p.add_argument("--work", default=None, metavar="DIR", help="the runs' output folders (default: a temporary "
                                                               "folder, removed after)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run (default 600)")
    p.add_argument("--json", metavar="FILE", help="write every run's figures as JSON")
    p.add_argument("job", nargs=argparse.REMAINDER, help="-- then the mpi-em job and its options, without --o")
    a = p.parse_args(argv)
    job = a.job[1:] if a.job[:1] == ["--"] else a.job
    if not job:
        p.error("give the job after --, e.g. -- class3d --i particles.star --K 4")
    if "--o" in job:
        p.error("leave --o out: each run writes to its own folder")
    trees = {"after": os.path.abspath(a.after), "before": os.path.abspath(a.before)}
    for name, tree in trees.items():
        if not os.path.isfile(os.path.join(tree, "mpi_em", "__init__.py")):
            p.error(f"--{name} {tree}: no mpi_em package there")
    mpirun = a.mpirun or shutil.which("mpirun", path=os.path.dirname(sys.executable)) or shutil.which("mpirun")
    if mpirun is None:
        p.error("no mpirun found (--mpirun)")
    work = a.work or tempfile.mkdtemp(prefix="em_before_after_")
    done = []
    try:
        for k, tree in enumerate(order(a.repeats)):
            out = os.path.join(work, f"{k + 1:02d}_{tree}")
            shutil.rmtree(out, ignore_errors=True)
            cmd = [mpirun, "-n", str(a.ranks), sys.executable, "-c", launcher(trees[tree])] + job + ["--o", out]
            t = time.time()
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
            row = {"run": k + 1, "tree": tree, "path": trees[tree], "rc": r.returncode, "wall": time.time() - t}
            row.update(job_figures(out))
            if r.returncode:
                row["stderr_tail"] = r.stderr[-2000:]
            done.append(row)
            print(f"run {k + 1} ({tree}): exit {r.returncode}, {row['wall']:.1f} s", flush=True)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)

    def f(v, spec=".2f"):
        return "-" if v is None else format(v, spec)

    cols = ("wall", "seconds_job", "first_iteration_end", "later_iterations") + PARTS
    print(f"{'run':>4} {'tree':<7}" + "".join(f"{c:>20}" for c in cols))
    for row in done:
        print(f"{row['run']:>4} {row['tree']:<7}" + "".join(f"{f(row.get(c)):>20}" for c in cols))
    medians = {}
    for tree in ("after", "before"):
        ok = [x for x in done if (x["tree"], x["rc"]) == (tree, 0)]
        medians[tree] = {c: (statistics.median([x[c] for x in ok]) if ok and all(x.get(c) is not None for x in ok)
                             else None) for c in cols}
        print(f"{'med':>4} {tree:<7}" + "".join(f"{f(medians[tree][c]):>20}" for c in cols))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"command": shlex.join([os.path.basename(sys.argv[0])] + (argv or sys.argv[1:])),
                       "date": time.strftime("%Y-%m-%d %H:%M:%S"), "trees": trees, "job": job, "runs": done,
                       "medians": medians}, fh, indent=1)
    return 0 if all(r["rc"] == 0 for r in done) else 1


if __name__ == "__main__":
    sys.exit(main())
