"""How long one EM iteration's files take to write, per part and in the background writer (rank 0's forked
process, as the jobs use it), with and without the plotting library imported beforehand (``--preload``).

An iteration's files are written while the next iteration computes; when writing takes longer than an iteration,
rank 0 waits for it and the files set the pace (class2d on a GPU: ~0.5 s of compute per iteration). Made-up
maps and particle values of the given shape; the particles STAR is the one of a simulated data set.

    python benchmarks/em_writer.py --mode class2d --box 256 --K 50 --n 5000 --json OUT.json
    python benchmarks/em_writer.py --mode class3d --box 256 --K 4 --n 3000 --stats-given --json OUT.json

The files go to a new folder under the temporary directory (TMPDIR=/dev/shm: writes at memory speed, as on a
machine whose page cache takes them without writing back during the job).

Prints one table (seconds per part; background: submit-to-done of each call) and writes JSON. CPU only.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import mpi_em.em.outputs as outputs  # noqa: E402
import mpi_em.plots as plots  # noqa: E402
from mpi_em.em.state import MODES, PER_PARTICLE, EMState  # noqa: E402
from mpi_em.io import BackgroundWriter, read_particles  # noqa: E402


def _inputs(a, work):
    data = os.path.join(work, "data")
    if not os.path.exists(os.path.join(data, "particles.star")):
        subprocess.run([sys.executable, "-m", "mpi_em", "--quiet", "simulate", "--out", data, "--box", "32", "--n",
                        str(a.n)], check=True)
    star = read_particles(os.path.join(data, "particles.star"))
    rng = np.random.default_rng(0)
    parts = {k: rng.random(a.n) for k in PER_PARTICLE}
    parts["class_number"] = rng.integers(1, a.K + 1, a.n)
    parts["half"] = np.zeros(a.n, int)
    mode = MODES[a.mode]
    shape = (a.K, a.box, a.box) if mode.dim == 2 else (a.K, a.box, a.box, a.box)
    state = EMState(maps=rng.standard_normal(shape).astype(np.float32), sigma2=np.ones(a.box // 2 + 1),
                    class_prior=np.full(a.K, 1.0 / a.K), resolution=[6.0, 5.5],
                    class_history=[list(np.full(a.K, 1.0 / a.K))] * 4)
    meta = {"box": a.box, "pixel_size": 1.5, "K": a.K}
    return mode, star, parts, state, meta


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["class2d", "class3d"], default="class2d")
    ap.add_argument("--box", type=int, default=256)
    ap.add_argument("--K", type=int, default=50)
    ap.add_argument("--n", type=int, default=5000, help="particles in the STAR file")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--preload", action="store_true", help="import the plotting library first, as the jobs do")
    ap.add_argument("--stats-given", action="store_true",
                    help="class3d: the maps' header statistics given to the writer, as a GPU rank computes them on its "
                         "device (mpi_em.io.map_statistics), instead of computed from the data while writing")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="em_writer_")
    mode, star, parts, state, meta = _inputs(a, work)
    out = os.path.join(work, "out")
    os.makedirs(out)
    rows = []
    info = {}
    if a.stats_given:  # made here once, on the host: on a GPU rank the device makes them (not timed here either)
        from mpi_em.io import map_statistics

        info["map_stats"] = (state.maps, map_statistics(state.maps))
    # the background writer first: the parent has not imported matplotlib unless --preload
    w = BackgroundWriter(**({"preload": plots.preload} if a.preload else {}))  # (trees before the preload)
    for it in range(1, a.repeats + 1):
        t = time.perf_counter()
        w.submit(outputs.write_iteration, out, it, mode, star, parts, state.snapshot(), dict(info), meta)
        w.wait()
        rows.append({"part": "background write_iteration", "iteration": it, "seconds": time.perf_counter() - t})
    w.close()
    # the parts, in this process (matplotlib imported by now)
    timed = {}
    for name in ("write_stack", "write_map", "write_particles", "write_model_star", "_plots"):
        fn = getattr(outputs, name)

        def wrap(*args, _fn=fn, _name=name, **kw):
            t0 = time.perf_counter()
            r = _fn(*args, **kw)
            timed[_name] = timed.get(_name, 0.0) + time.perf_counter() - t0
            return r
        setattr(outputs, name, wrap)
    save = EMState.save

    def timed_save(*args, **kw):  # the checkpoint (HDF5) and its pointer
        t0 = time.perf_counter()
        save(*args, **kw)
        timed["checkpoint (EMState.save)"] = time.perf_counter() - t0
    EMState.save = timed_save
    for it in range(a.repeats + 1, 2 * a.repeats + 1):
        timed.clear()
        t = time.perf_counter()
        outputs.write_iteration(out, it, mode, star, parts, state.snapshot(), dict(info), meta)
        total = time.perf_counter() - t
        for k, v in timed.items():
            rows.append({"part": k, "iteration": it, "seconds": v})
        rows.append({"part": "write_iteration (in this process)", "iteration": it, "seconds": total})
    for _ in range(a.repeats):  # the final files (run_*) from the last iteration's, as a job's end writes them
        t = time.perf_counter()
        outputs.write_final(out, 2 * a.repeats, False, [])
        rows.append({"part": "write_final (run_* files)", "iteration": 2 * a.repeats,
                     "seconds": time.perf_counter() - t})
    parts_order = list(dict.fromkeys(r["part"] for r in rows))
    print(f"{a.mode}, box {a.box}, K = {a.K}, {a.n} particles; preload: {a.preload}; statistics given: {a.stats_given}")
    print(f"{'part':40s} seconds (median of {a.repeats})")
    for p in parts_order:
        v = [r["seconds"] for r in rows if r["part"] == p]
        print(f"{p:40s} {np.median(v):.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "host": platform.node(), "cpu": platform.processor(),
                       "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
