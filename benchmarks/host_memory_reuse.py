"""CPU jobs with glibc's allocator defaults against freed memory kept (mpi_em/hostmem.py, the default since
2026-12-07; ``MPI_EM_KEEP_FREED_MEMORY=0`` restores glibc's): wall, user and system seconds, peak resident memory
and minor page faults of whole jobs on one CPU rank, the two settings interleaved, and whether the maps are the same
bit for bit.

    python benchmarks/host_memory_reuse.py --work /tmp/hostmem --repeats 2 --json OUT.json

Jobs (simulated data, made once in WORK): initial-model at box 32 (3 000 particles, SNR 0.5, 20 mini-batches, no
final pass) and at box 64 (3 000 particles, SNR 0.05, 10 mini-batches, one final pass), refine3d at box 48 (1 000
particles, SNR 0.25, from the truth low-passed to 21 Å, 3 iterations), reconstruct at box 64 (3 000 particles,
known poses). Prints one table (medians) and writes JSON with every run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _cli(args, env=None):
    """Run ``python -m mpi_em ARGS`` -> its wall seconds and the child's own rusage (stderr to a file: a pipe
    read only after the child ends would block a job whose log fills it)."""
    import tempfile

    e = dict(os.environ, OMP_NUM_THREADS="1", MPI_EM_DEVICE="cpu", PYTHONPATH=ROOT)
    e.update(env or {})
    with tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-m", "mpi_em"] + [str(a) for a in args], env=e,
                             stdout=subprocess.DEVNULL, stderr=err, text=True)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise SystemExit(f"mpi-em {' '.join(map(str, args))} failed:\n{err.read()[-3000:]}")
    return {"wall_s": wall, "user_s": ru.ru_utime, "sys_s": ru.ru_stime, "maxrss_mib": ru.ru_maxrss / 1024,
            "minor_faults": ru.ru_minflt}


def _data(work):
    # box, Å/px, particles, SNR, and the start map's resolution for the refine3d job (its --ini-high)
    sets = {"d32": (32, 5.0, 3000, 0.5, None), "d64": (64, 2.5, 3000, 0.05, None), "d48": (48, 2.67, 1000, 0.25, 21.36)}
    for name, (box, apix, n, snr, start) in sets.items():
        d = os.path.join(work, name)
        if not os.path.exists(os.path.join(d, "start.mrc" if start else "particles.star")):
            _cli(["simulate", "--out", d, "--box", box, "--apix", apix, "--n", n, "--snr", snr, "--seed", 1]
                 + (["--start-lowpass", start] if start else []))
    d = os.path.join(work, "d48")
    return {
        "initial-model box 32": (["initial-model", "--i", f"{work}/d32/particles_unaligned.star", "--seed", 1,
                                  "--iter", 20, "--no-final-pass"], "run_class001.mrc"),
        "initial-model box 64": (["initial-model", "--i", f"{work}/d64/particles_unaligned.star", "--seed", 1,
                                  "--iter", 10, "--final-passes", 1, "--starts", 1], "run_class001.mrc"),
        "refine3d box 48": (["refine3d", "--i", f"{work}/d48/particles_unaligned.star", "--ref", f"{d}/start.mrc",
                             "--ini-high", 21.36, "--iter", 3], "run_class001.mrc"),
        "reconstruct box 64": (["reconstruct", "--i", f"{work}/d64/particles.star"], "map.mrc"),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="folder for the data sets and the jobs' outputs")
    ap.add_argument("--repeats", type=int, default=2,
                    help="how many times each job is measured with each setting (interleaved)")
    ap.add_argument("--jobs", nargs="+", default=None, help="a subset of the jobs' names (default: all)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    from mpi_em.io import read_map

    os.makedirs(a.work, exist_ok=True)
    jobs = _data(a.work)
    settings = {"glibc defaults": {"MPI_EM_KEEP_FREED_MEMORY": "0"}, "freed memory kept": {}}
    records, same = [], {}
    for name, (args, out_map) in jobs.items():
        if a.jobs and name not in a.jobs:
            continue
        maps = {}
        for rep in range(a.repeats):
            for setting, env in settings.items():
                out = os.path.join(a.work, "out", name.replace(" ", "_"), setting.split()[0], str(rep))
                row = _cli(args + ["--o", out, "--overwrite"], env)
                row.update(job=name, setting=setting, repeat=rep)
                records.append(row)
                maps.setdefault(setting, read_map(os.path.join(out, out_map))[0])
                print(f"{name:22s} {setting:18s} {row['wall_s']:7.2f} s", flush=True)
        same[name] = bool(np.array_equal(*maps.values()))
    rows = []
    print(f"\n{'job':22s} {'setting':18s} {'wall s':>7s} {'user s':>7s} {'sys s':>6s} {'MiB':>6s} {'faults':>8s} "
          f"{'wall ratio':>10s} same map")
    for name in dict.fromkeys(r["job"] for r in records):
        med = {}
        for setting in settings:
            rs = [r for r in records if r["job"] == name and r["setting"] == setting]
            med[setting] = {k: float(np.median([r[k] for r in rs])) for k in
                            ("wall_s", "user_s", "sys_s", "maxrss_mib", "minor_faults")}
        for setting, m in med.items():
            ratio = m["wall_s"] / med["glibc defaults"]["wall_s"]
            print(f"{name:22s} {setting:18s} {m['wall_s']:7.2f} {m['user_s']:7.2f} {m['sys_s']:6.2f} "
                  f"{m['maxrss_mib']:6.0f} {m['minor_faults']:8.0f} {ratio:10.3f} {same[name]}")
            rows.append(dict(job=name, setting=setting, wall_ratio=ratio, same_map=same[name], **m))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "records": records, "machine": platform.node(), "cpus": os.cpu_count(),
                       "python": sys.version.split()[0], "numpy": np.__version__,
                       "libc": " ".join(platform.libc_ver()), "date": time.strftime("%Y-%m-%d")}, f, indent=1)


if __name__ == "__main__":
    main()
