#!/usr/bin/env python3
"""mpi_em and RELION side by side on one simulated data set, with matched settings.

One data set made by ``mpi-em simulate`` (truth known), one start map (the truth low-passed to --ini-high Å), then
for each job both programs with the same particles, start map, symmetry (C1), HEALPix order, offset range and step,
particle diameter, iterations, and the same CPU cores or the same GPU:

  reconstruct    mpi-em reconstruct (--ranks P)  vs  relion_reconstruct_mpi on P ranks (relion_reconstruct if P = 1)
  reconstruct-1  mpi-em reconstruct on 1 rank    vs  relion_reconstruct (one thread each)
  refine3d       mpi-em refine3d                 vs  relion_refine_mpi --auto_refine --split_random_halves
  class3d        mpi-em class3d --K 4            vs  relion_refine_mpi 3D classification (fixed iterations)
  class2d        mpi-em class2d                  vs  relion_refine_mpi 2D classification (EM)
  class2d-vdam   (mpi-em's class2d)          vs  relion_refine --grad (VDAM, one process; RELION 4+ only, else skipped)

Printed: one table (wall time, seconds per iteration, reported / gold-standard resolution, map-vs-truth resolution
at FSC 0.5, median angular error against the true poses, peak GPU memory with --gpu, the time ratio); written:
``side_by_side.json`` (after every job, so a job that fails or times out keeps the others' results) and
``side_by_side.png`` (resolution against wall time for both programs).

The script never builds or downloads anything: RELION's programs come from --relion-bin, and where the jobs' programs
are not there it stops (exit 2, naming them) before it makes data or runs anything.

Matched settings, where the two programs name them differently:
- RELION's --offset_step is the coarse step (oversampled once to half of it); mpi-em's --offset-step is the fine
  step (its coarse pass uses twice it): RELION --offset_step S <-> mpi-em --offset-step S/2.
- RELION's --healpix_order / --psi_step are the coarse sampling, oversampled once (--oversampling 1); mpi-em's
  --healpix-order / --psi-step are the same coarse sampling with one oversampling in its fine pass.
- RELION's refinement and classification programs start a leader rank that does no alignment: by default RELION
  gets --ranks + 1 MPI processes there (at least 3 for --split_random_halves), and mpi-em --ranks.
- RELION reconstructs one map per run: its 'reconstruct' time is that of the two half-set runs (--subset 1, 2:
  every particle inserted once, as in mpi-em's one run that writes both halves and their sum); its full map
  (a third run, timed separately in the JSON) is the one compared with the truth.
- Reported resolution: refine3d and reconstruct the gold-standard FSC 0.143 (RELION reconstruct: the FSC of its
  two half maps, computed here); class3d/class2d each program's rlnCurrentResolution (not gold-standard).
- mpi-em's own refinement defaults (--folds, --refine-offsets) stay on: they are its defaults.
- Each program's current image size follows its own default: RELION's --incr_size 10 shells past the resolution in
  every job, mpi-em's --incr-size 10 in refine3d and class3d and 3 in class2d (10 took 3.4-4.1x the time there on
  the CPU: benchmarks/results/class2d-size/cpu-2026-12-05/).

Usage (CPU; see benchmarks/results/relion-side-by-side/README.md for the configurations run):
  python benchmarks/relion_side_by_side.py --relion-bin /usr/bin --box 32 --n 300 --ranks 2 --out /tmp/sbs
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the scripts' shared parts
from gpu_memory import GpuSampler  # noqa: E402

JOBS = ("reconstruct", "reconstruct-1", "refine3d", "class3d", "class2d", "class2d-vdam")
PROGRAMS = ("mpi_em", "relion")


def program_kind(row: dict) -> str:
    """"mpi_em" for mpi_em's rows, "relion" for RELION's (their program names vary: relion_refine_mpi,
    relion_reconstruct_mpi, relion_refine --grad), by the row's program name."""
    return "mpi_em" if row.get("program") == "mpi_em" else "relion"


def kept_rows(rows, jobs, programs) -> list[dict]:
    """The rows of an earlier record that running ``jobs`` with ``programs`` does not replace: every row of a job
    not run now, and of a job run now the rows of the programs not run now (a row with no program, a job stopped
    between programs, is replaced)."""
    return [r for r in rows if r.get("job") not in jobs or
            (r.get("program", "-") != "-" and program_kind(r) not in programs)]


# ------------------------------------------------------------------------------------------ pure helpers
def iteration_of(path: str) -> int | None:
    """The iteration number NNN of a ``..._itNNN_...`` file name, else None."""
    m = re.search(r"_it(\d{3,})_", os.path.basename(path))
    return int(m.group(1)) if m else None


def relion_version(text: str) -> str | None:
    """'3.1.3' from the output of ``relion_refine --version`` (None when absent)."""
    m = re.search(r"RELION version:\s*([^\s]+)", text)
    return m.group(1) if m else None


def help_has(help_text: str, option: str) -> bool:
    """Whether a RELION --help text lists ``option`` (e.g. '--j', '--grad')."""
    return re.search(r"(^|\s)" + re.escape(option) + r"(\s|$)", help_text, re.M) is not None


def final_resolution_from_stdout(text: str) -> float | None:
    """RELION auto-refine's 'Final resolution (without masking) is: X' (None when it did not converge)."""
    m = re.findall(r"Final resolution \(without masking\) is:\s*([0-9.]+)", text)
    return float(m[-1]) if m else None


def seconds_per_iteration(ends: dict[int, float], start: float | None = None) -> dict[int, float]:
    """{iteration: seconds} from each iteration's end time; the first from ``start`` (or from iteration 0's end,
    RELION's run_it000 files) when given, else left out. Where files are written every few iterations (RELION's
    VDAM: --grad_write_iter) a gap's time is shared by the iterations in it."""
    out, prev = {}, None
    for it in sorted(ends):
        if prev is not None:
            out[it] = (ends[it] - ends[prev]) / (it - prev)
        elif it == 0:
            pass
        elif start is not None:
            out[it] = (ends[it] - start) / it
        prev = it
    return {k: v for k, v in out.items() if k > 0}


def steady_seconds(per_it: dict[int, float]) -> float | None:
    """Median seconds per iteration from iteration 2 on (the first holds each program's set-up), else the
    first's."""
    later = [v for k, v in per_it.items() if k >= 2]
    vals = later or list(per_it.values())
    return float(np.median(vals)) if vals else None


def by_order(per_it: dict[int, float], orders: dict[int, int]) -> dict[int, float]:
    """Median seconds per iteration at each HEALPix order (iterations with a known order; the first excluded
    when another iteration has the same order)."""
    out = {}
    for o in sorted(set(orders.values())):
        its = [k for k in per_it if orders.get(k) == o]
        later = [k for k in its if k >= 2] or its
        if later:
            out[int(o)] = float(np.median([per_it[k] for k in later]))
    return out


def ratio(ours, theirs):
    """ours / RELION (None when either is missing or zero)."""
    if ours is None or theirs is None or not theirs:
        return None
    return float(ours) / float(theirs)


def fmt(v, spec=".2f", none="-"):
    return none if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    """The printed table: one line per (job, program), a ratio line per job."""
    head = ("job", "program", "procs", "wall s", "s/it", "iters", "res Å", "vs truth Å", "ang err °",
            "views °", "classes", "GPU MiB", "status")
    lines = []
    for r in rows:
        lines.append((r["job"], r["program"], r.get("procs", "-"), fmt(r.get("wall_s"), ".1f"),
                      fmt(r.get("seconds_per_iteration"), ".2f"), fmt(r.get("iterations"), "d"),
                      fmt(r.get("resolution"), ".2f"), fmt(r.get("map_vs_truth_05"), ".2f"),
                      fmt(r.get("median_angular_error"), ".2f"), fmt(r.get("view_spread"), ".1f"),
                      fmt(r.get("classes_alive"), "d"), fmt(r.get("peak_gpu_mib"), ".0f"),
                      r.get("status", "-")))
    w = [max(len(str(x)) for x in col) for col in zip(head, *lines)] if lines else [len(h) for h in head]
    out = ["  ".join(str(x).ljust(n) for x, n in zip(head, w)), "  ".join("-" * n for n in w)]
    jobs = []
    for r, ln in zip(rows, lines):
        out.append("  ".join(str(x).ljust(n) for x, n in zip(ln, w)))
        if r["job"] not in jobs:
            jobs.append(r["job"])
    out.append("")
    for j in jobs:
        o = next((r for r in rows if r["job"] == j and r["program"] == "mpi_em"), None)
        t = next((r for r in rows if r["job"] == j and r["program"].startswith("relion")), None)
        if not (o and t):
            continue
        rw = ratio(o.get("wall_s"), t.get("wall_s"))
        ri = ratio(o.get("seconds_per_iteration"), t.get("seconds_per_iteration"))
        # a run that timed out or failed has a wall time that is a lower bound only
        bound = "" if (o.get("status") == "ok" and t.get("status") == "ok") else \
            f" [not both finished: ours {o.get('status')}, RELION {t.get('status')}]"
        parts = [f"{j}: wall ours/RELION {fmt(rw, '.3f')}" + (f" (RELION/ours {1 / rw:.2f}x)" if rw else "") + bound]
        if ri:
            parts.append(f"s/it ours/RELION {ri:.3f} (RELION/ours {1 / ri:.2f}x)")
        if o.get("map_vs_truth_05") and t.get("map_vs_truth_05"):
            parts.append(f"map vs truth {o['map_vs_truth_05']:.2f} against {t['map_vs_truth_05']:.2f} Å")
        if o.get("view_spread") is not None and t.get("view_spread") is not None:
            parts.append(f"view spread {o['view_spread']:.1f} against {t['view_spread']:.1f}° (lower groups views "
                         f"better); classes >= 10 particles {fmt(o.get('classes_alive'), 'd')} against "
                         f"{fmt(t.get('classes_alive'), 'd')}")
        out.append("; ".join(parts))
    return "\n".join(out)


# --------------------------------------------------------------------------------------------- running
class Stopped(BaseException):
    """The benchmark was asked to stop (SIGTERM, SIGINT: a batch system's or ``timeout``'s limit, Ctrl-C)."""


#: the signal that stopped the benchmark, once one has
STOP = {"signal": None}


def _stop(signum, frame):
    STOP["signal"] = signum
    for sig in (signal.SIGTERM, signal.SIGINT):  # the first one is enough: the rest of the stop is not interrupted
        signal.signal(sig, _noted)  # a handler, not SIG_IGN, which the programs started from here would inherit
    raise Stopped(signal.Signals(signum).name)


def _noted(signum, frame):
    STOP["signal"] = STOP["signal"] or signum


def stop_on_signals():
    """SIGTERM and SIGINT stop the benchmark cleanly: the running program's whole process group is killed (an MPI
    job's ranks included, which would otherwise go on holding the GPU), its row is kept with status "stopped" and
    the results so far are written."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)


def _kill_group(p):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            break
        try:
            p.wait(timeout=15)
            break
        except subprocess.TimeoutExpired:
            continue


def run(cmd, log_path, cwd, timeout, env, gpu=False):
    """Run ``cmd`` in its own process group, stdout+stderr to ``log_path``; kill the group at ``timeout``, or when
    the benchmark is stopped (:func:`stop_on_signals`). -> dict(rc, wall_s, start, timed_out, stopped, pid (the
    group's leader; None when not started), peak_gpu_mib, ...)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(str(c) for c in cmd) + "\n")
        log.flush()
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        if STOP["signal"] is not None:  # stopped before this program could start: not run
            log.write("not run: the benchmark was stopped\n")
            return {"rc": None, "wall_s": 0.0, "start": time.time(), "timed_out": False, "stopped": True, "pid": None,
                    "peak_gpu_mib": None, "load_before": load, "load_after": load,
                    "command": shlex.join(str(c) for c in cmd), "log": log_path}
        with GpuSampler(gpu) as g:
            t0 = time.time()
            p = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                 start_new_session=True)
            timed_out = stopped = False
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(p)
            except Stopped:
                stopped = True
                _kill_group(p)
            rc = p.returncode if p.returncode is not None else -9
            wall = time.time() - t0
    return {"rc": rc, "wall_s": wall, "start": t0, "timed_out": timed_out, "stopped": stopped, "pid": p.pid,
            "peak_gpu_mib": g.peak_mib,
            "load_before": load, "load_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "command": shlex.join(str(c) for c in cmd), "log": log_path}


def status_of(r) -> str:
    if r.get("stopped"):
        return "stopped"
    if r["timed_out"]:
        return "timeout"
    return "ok" if r["rc"] == 0 else f"failed rc={r['rc']}"


# ---------------------------------------------------------------------------------------- evaluation
class Truth:
    def __init__(self, data_dir):
        import mrcfile

        self.vol = mrcfile.read(os.path.join(data_dir, "truth.mrc")).astype(np.float64)
        self.box = self.vol.shape[-1]
        with mrcfile.open(os.path.join(data_dir, "truth.mrc"), permissive=True) as m:
            self.apix = float(m.voxel_size.x)
        self.star = os.path.join(data_dir, "particles_abs.star")
        self._F = None  # the truth's transform, made once (a class3d job's evaluation compares ~100 maps with it)

    def res05(self, path) -> float | None:
        """The map's resolution against the truth at FSC 0.5 (None: unreadable, or not the truth's shape)."""
        import mrcfile

        from mpi_em.fsc import fsc_fourier, resolution_at

        try:
            v = mrcfile.read(path).astype(np.float64)
        except (OSError, ValueError):
            return None
        if v.shape != self.vol.shape:
            return None
        if self._F is None:
            self._F = np.fft.rfftn(self.vol)
        return float(resolution_at(fsc_fourier(np.fft.rfftn(v), self._F), self.box, self.apix, 0.5))

    def angular_error(self, data_star) -> float | None:
        from mpi_em.evaluate import pose_errors

        try:
            ang, _ = pose_errors(data_star, self.star)
        except Exception as e:  # noqa: BLE001 (a partial run's file: reported, never fatal)
            print(f"  (angular error of {data_star}: {e})", file=sys.stderr)
            return None
        return float(np.median(ang))


def read_general(path) -> dict:
    """model_general (or sampling_general) of a STAR file as a dict of scalars ({} if unreadable)."""
    import starfile

    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception:  # noqa: BLE001
        return {}
    for name in ("model_general", "sampling_general", "general"):
        if name in blocks:
            b = blocks[name]
            if hasattr(b, "iloc"):
                return {k: b[k].iloc[0] for k in b.columns}
            return dict(b)
    return {}


def model_file(d, it) -> str | None:
    for name in (f"run_it{it:03d}_model.star", f"run_it{it:03d}_half1_model.star"):
        p = os.path.join(d, name)
        if os.path.exists(p):
            return p
    return None


def class_maps(d, it) -> list[str]:
    return sorted(glob.glob(os.path.join(d, f"run_it{it:03d}_class[0-9][0-9][0-9].mrc")))


def em_iterations(d, truth: Truth, mode: str, start: float, program: str, maps: bool = True) -> dict:
    """Per-iteration end time (data STAR mtime, from the launch), reported resolution, map vs truth (refine3d: the
    first half map; class3d: the largest class's map; not with ``maps`` False), HEALPix order of an mpi-em or RELION
    refine/classification folder."""
    its = sorted({iteration_of(p) for p in glob.glob(os.path.join(d, "run_it*_data.star"))} - {None})
    rows = []
    for it in its:
        data = os.path.join(d, f"run_it{it:03d}_data.star")
        m = model_file(d, it)
        g = read_general(m) if m else {}
        row = {"iteration": it, "t": os.path.getmtime(data) - start,
               "resolution": float(g["rlnCurrentResolution"]) if "rlnCurrentResolution" in g else None}
        if "rlnHealpixOrder" in g:
            row["order"] = int(g["rlnHealpixOrder"])
        else:
            s = read_general(os.path.join(d, f"run_it{it:03d}_sampling.star"))
            if "rlnHealpixOrder" in s:
                row["order"] = int(s["rlnHealpixOrder"])
        if it == 0 or not maps:
            pass  # the start, or a stopped run's iterations: no map compared
        elif mode == "refine3d":
            h = [os.path.join(d, f"run_it{it:03d}_half1_class001{s}.mrc") for s in ("_unfil", "")]
            h = [p for p in h if os.path.exists(p)]
            row["map_vs_truth_05"] = truth.res05(h[0]) if h else None
        elif mode == "class3d":
            k = largest_class(m) if m else None
            cm = class_maps(d, it)
            row["map_vs_truth_05"] = truth.res05(cm[k]) if k is not None and k < len(cm) else None
        rows.append(row)
    return {"iterations": rows}


def largest_class(model_star) -> int | None:
    """The index (0-based) of the class with the largest rlnClassDistribution in a model STAR (None: unreadable)."""
    import starfile

    try:
        cls = starfile.read(model_star, always_dict=True)["model_classes"]
        return int(np.argmax(cls["rlnClassDistribution"].to_numpy()))
    except Exception:  # noqa: BLE001 (a partial run's file)
        return None


def summarize_em(d, truth: Truth, mode: str, r: dict, program: str) -> dict:
    """One table row of an EM job from its folder and its run record. A stopped run's (``r["stopped"]``): its
    iterations' maps are not compared with the truth (the time left to a stopped benchmark is short), its last
    iteration's are."""
    info = em_iterations(d, truth, mode, r["start"], program, maps=not r.get("stopped"))
    rows = [x for x in info["iterations"] if x["iteration"] > 0]
    out = {"iterations": max((x["iteration"] for x in rows), default=0), "per_iteration": info["iterations"]}
    if program == "mpi_em" and os.path.exists(os.path.join(d, "run_timings.json")):
        tim = json.load(open(os.path.join(d, "run_timings.json")))
        ends = {int(t["iteration"]): float(t["seconds_since_start"]) for t in tim}
        per_it = seconds_per_iteration(ends, start=0.0)
    else:
        ends = {x["iteration"]: x["t"] for x in info["iterations"]}
        per_it = seconds_per_iteration(ends)
    out["seconds_by_iteration"] = {str(k): v for k, v in per_it.items()}
    out["seconds_per_iteration"] = steady_seconds(per_it)
    orders = {x["iteration"]: x["order"] for x in info["iterations"] if "order" in x}
    if orders:
        out["seconds_per_iteration_by_order"] = {str(k): v for k, v in by_order(per_it, orders).items()}
    # final files: refine3d's run_* (written at convergence), else the last iteration's
    last = rows[-1]["iteration"] if rows else None
    final_model = os.path.join(d, "run_model.star")
    final_data = os.path.join(d, "run_data.star")
    if mode == "refine3d" and os.path.exists(final_model) and os.path.exists(os.path.join(d, "run_class001.mrc")):
        out["converged"] = True
        g = read_general(final_model)
        out["resolution"] = float(g["rlnCurrentResolution"]) if "rlnCurrentResolution" in g else None
        out["map_vs_truth_05"] = truth.res05(os.path.join(d, "run_class001.mrc"))
        data = final_data
    elif last is not None:
        out["converged"] = False if mode == "refine3d" else None
        out["resolution"] = rows[-1].get("resolution")
        if mode == "refine3d":
            out["map_vs_truth_05"] = rows[-1].get("map_vs_truth_05")
        elif mode == "class3d":
            # the largest class's map (the class most particles went to) against the truth
            g = read_general(model_file(d, last)) if model_file(d, last) else {}
            maps = class_maps(d, last)
            try:
                import starfile

                cls = starfile.read(model_file(d, last), always_dict=True)["model_classes"]
                k = int(np.argmax(cls["rlnClassDistribution"].to_numpy()))
                out["map_vs_truth_05"] = truth.res05(maps[k])
                out["largest_class"] = k + 1
                out["class_distribution"] = [float(x) for x in cls["rlnClassDistribution"]]
            except Exception:  # noqa: BLE001
                out["map_vs_truth_05"] = rows[-1].get("map_vs_truth_05")
        data = os.path.join(d, f"run_it{last:03d}_data.star")
    else:
        data = None
    if data and mode != "class2d" and os.path.exists(data):
        out["median_angular_error"] = truth.angular_error(data)
    if data and mode == "class2d" and os.path.exists(data):
        try:
            out["view_spread"], out["classes_alive"] = class2d_grouping(data, truth.star)
        except Exception as e:  # noqa: BLE001 (a partial run's file: reported, never fatal)
            print(f"  (view spread of {data}: {e})", file=sys.stderr)
    return out


def class2d_grouping(data_star, truth_star, alive_from: int = 10) -> tuple[float, int]:
    """A 2D classification's quality against the truth: the view spread (:func:`mpi_em.evaluate.view_spread`,
    degrees, lower groups views better) and the number of classes holding at least ``alive_from`` particles."""
    from mpi_em.evaluate import view_spread
    from mpi_em.io import read_particles

    cls = read_particles(data_star).particles["rlnClassNumber"].to_numpy().astype(int)
    return float(view_spread(data_star, truth_star)), int((np.bincount(cls) >= alive_from).sum())


# ------------------------------------------------------------------------------------------------ data
def make_data(args, env) -> str:
    """Simulate (or reuse) the data set and the start map; STAR copies with absolute image paths (both programs
    then read the same files from any folder). -> the data folder."""
    import starfile

    d = os.path.abspath(args.data or os.path.join(args.out, "data"))
    params = {"box": args.box, "n": args.n, "snr": args.snr, "apix": args.apix, "seed": args.seed,
              "ini_high": args.ini_high}
    pfile = os.path.join(d, "params.json")
    if os.path.exists(pfile) and json.load(open(pfile)) == params and \
            os.path.exists(os.path.join(d, "start.mrc")):
        print(f"data: reusing {d}")
        return d
    if os.path.isdir(d) and os.listdir(d):
        if not os.path.exists(pfile):  # never delete a folder this script did not make
            sys.exit(f"relion_side_by_side: error: {d}: not empty and not a data folder of this script "
                     f"(no params.json)")
        shutil.rmtree(d)
    cmd = [sys.executable, "-m", "mpi_em", "simulate", "--out", d, "--box", args.box, "--n", args.n, "--snr",
           args.snr, "--apix", args.apix, "--seed", args.seed, "--device", "gpu" if args.gpu else "cpu",
           "--start-lowpass", args.ini_high]
    t = time.time()
    subprocess.run([str(c) for c in cmd], check=True, env=env)
    print(f"data: simulated {args.n} particles (box {args.box}, {args.apix} Å/px, SNR {args.snr}) "
          f"in {time.time() - t:.1f} s")
    for name in ("particles", "particles_unaligned"):
        blocks = starfile.read(os.path.join(d, f"{name}.star"), always_dict=True)
        p = blocks["particles"]
        absd = os.path.abspath(d)
        p["rlnImageName"] = [f"{s.split('@')[0]}@{os.path.join(absd, s.split('@')[1])}" for s in p["rlnImageName"]]
        starfile.write(blocks, os.path.join(d, f"{name}_abs.star"), overwrite=True)
    with open(pfile, "w") as f:
        json.dump(params, f)
    os.sync()  # the data on disk before a program is timed (not written back while it reads them)
    return d


# ------------------------------------------------------------------------------------------------ jobs
class Bench:
    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.out)
        self.env = dict(os.environ, OMP_NUM_THREADS=str(args.omp_threads), MPI_EM_DEVICE="gpu" if args.gpu else "cpu")
        # Open MPI (Debian's relion): allow root, oversubscription (RELION's leader rank) and let idle ranks
        # yield the core instead of polling; ignored by other MPIs
        self.env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                        OMPI_MCA_rmaps_base_oversubscribe="1", OMPI_MCA_mpi_yield_when_idle="1",
                        OMPI_MCA_hwloc_base_binding_policy="none")
        self.bin = os.path.abspath(args.relion_bin)
        self.rows: list[dict] = []
        self.record: dict = {}
        self._help: dict[str, str] = {}

    # -- launching
    def ours(self, ranks):
        tmpl = self.args.mpi_em_cmd or os.path.join(os.path.dirname(sys.executable), "mpirun") + \
            " -n {ranks} " + os.path.join(os.path.dirname(sys.executable), "mpi-em")
        return shlex.split(tmpl.format(ranks=ranks))

    def relion(self, prog, ranks):
        exe = os.path.join(self.bin, prog)
        if prog.endswith("_mpi"):
            return [self.args.relion_mpirun, "-n", str(ranks), exe]
        return [exe]

    def have(self, prog) -> bool:
        return has_program(self.bin, prog)

    def relion_help(self, prog) -> str:
        """--help of ``prog`` (of its serial or MPI twin where only that one is built)."""
        if prog not in self._help:
            self._help[prog] = ""
            for name in (prog, prog + "_mpi", prog.replace("_mpi", "")):
                if self.have(name):
                    try:
                        self._help[prog] = subprocess.run([os.path.join(self.bin, name), "--help"],
                                                          capture_output=True, text=True, timeout=60,
                                                          env=self.env).stdout
                    except (OSError, subprocess.SubprocessError):
                        continue
                    break
        return self._help[prog]

    def em_ranks(self, job):
        if self.args.relion_ranks:
            return self.args.relion_ranks
        return max(3 if job == "refine3d" else 2, self.args.ranks + 1)

    def common_relion(self):
        a = self.args
        c = ["--ctf", "--pad", "2", "--particle_diameter", a.diameter, "--offset_range", a.offset_range,
             "--offset_step", a.offset_step, "--oversampling", "1", "--flatten_solvent", "--zero_mask",
             "--dont_combine_weights_via_disc", "--pool", a.pool, "--j", a.threads, "--dont_check_norm",
             "--random_seed", a.seed + 1]  # RELION's seed 0 means: do not randomise the particle order
        if a.gpu:
            c += ["--gpu", a.gpu_ids]
        return c

    def common_ours(self):
        a = self.args
        return ["--particle-diameter", a.diameter, "--offset-range", a.offset_range,
                "--offset-step", a.offset_step / 2, "--device", "gpu" if a.gpu else "cpu", "--seed", a.seed]

    # -- bookkeeping
    def runs(self, kind: str) -> bool:
        """Whether this run runs ``kind``'s programs ("mpi_em" or "relion", --programs)."""
        return kind in self.args.programs

    def add(self, row):
        self.rows.append(row)
        self.save()

    def save(self):
        rec = dict(self.record, rows=self.rows, table=table(self.rows))
        path = os.path.join(self.out, "side_by_side.json")
        with open(path + ".tmp", "w") as f:
            json.dump(rec, f, indent=1, default=lambda x: x.item() if hasattr(x, "item") else str(x))
        os.replace(path + ".tmp", path)

    def exec(self, job, program, cmd, sub, procs, extra_t=None):
        d = os.path.join(self.out, job, sub)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        r = run(cmd, os.path.join(d, "stdout.log"), d, self.args.timeout, self.env, self.args.gpu)
        print(f"  {job} {program}: {status_of(r)} in {r['wall_s']:.1f} s", flush=True)
        return d, r

    # -- jobs
    def reconstruct(self, job, ranks, relion_ranks, threads):
        star = os.path.join(self.data, "particles_abs.star")
        if self.runs("mpi_em"):
            self._reconstruct_ours(job, ranks, star)
        if self.runs("relion"):
            self._reconstruct_relion(job, relion_ranks, threads, star)

    def _reconstruct_ours(self, job, ranks, star):
        a, T = self.args, self.truth
        d, r = self.exec(job, "mpi_em", self.ours(ranks) + ["reconstruct", "--i", star, "--o", "out", "--device",
                                                            "gpu" if a.gpu else "cpu", "--pad", 2], "mpi_em", ranks)
        row = {"job": job, "program": "mpi_em", "procs": f"{ranks} rank(s)", "wall_s": r["wall_s"],
               "status": status_of(r), "peak_gpu_mib": r["peak_gpu_mib"], "command": r["command"],
               "load_average_1min": [r["load_before"], r["load_after"]]}
        rj = os.path.join(d, "out", "run.json")
        if os.path.exists(rj):
            s = json.load(open(rj))
            row.update(resolution=s.get("resolution_0143"), seconds_internal=s.get("seconds_total"))
            row["map_vs_truth_05"] = T.res05(os.path.join(d, "out", "map.mrc"))
        self.add(row)

    def _reconstruct_relion(self, job, relion_ranks, threads, star):
        T = self.truth
        prog = "relion_reconstruct_mpi" if relion_ranks > 1 else "relion_reconstruct"
        if not self.have(prog):  # only one of the two built
            prog = "relion_reconstruct" if prog.endswith("_mpi") else "relion_reconstruct_mpi"
        base = self.relion(prog, relion_ranks) + ["--i", star, "--ctf", "--pad", "2", "--sym", "C1"]
        if help_has(self.relion_help("relion_reconstruct"), "--j"):
            base += ["--j", threads]
        walls, peaks, runs, status = [], [], [], "ok"
        for what, extra in (("half1", ["--subset", "1"]), ("half2", ["--subset", "2"]), ("full", [])):
            dd, rr = self.exec(job, f"{prog} {what}", base + ["--o", f"{what}.mrc"] + extra, f"relion_{what}",
                               relion_ranks)
            runs.append(rr)
            if status_of(rr) != "ok" and status == "ok":
                status = f"{what}: {status_of(rr)}"
            if what != "full":
                walls.append(rr["wall_s"])
            if rr["peak_gpu_mib"] is not None:
                peaks.append(rr["peak_gpu_mib"])
        thr = f" x {threads} thr" if "--j" in base else ""
        row = {"job": job, "program": prog, "procs": f"{relion_ranks} rank(s){thr}", "wall_s": sum(walls),
               "status": status,
               "peak_gpu_mib": max(peaks) if peaks else None, "wall_full_map_s": runs[2]["wall_s"],
               "command": " ; ".join(x["command"] for x in runs),
               "walls_half1_half2_full_s": [x["wall_s"] for x in runs],
               "load_average_1min": [[x["load_before"], x["load_after"]] for x in runs]}
        h1, h2 = (os.path.join(self.out, job, f"relion_half{k}", f"half{k}.mrc") for k in (1, 2))
        if os.path.exists(h1) and os.path.exists(h2):
            import mrcfile

            from mpi_em.fsc import fsc, resolution_at

            row["resolution"] = float(resolution_at(fsc(mrcfile.read(h1).astype(np.float64),
                                                        mrcfile.read(h2).astype(np.float64)), T.box, T.apix))
        row["map_vs_truth_05"] = T.res05(os.path.join(self.out, job, "relion_full", "full.mrc"))
        self.add(row)

    def em(self, job):
        a, T = self.args, self.truth
        unal = os.path.join(self.data, "particles_unaligned_abs.star")
        start = os.path.join(self.data, "start.mrc")
        mode = "class2d" if job.startswith("class2d") else job
        if job == "refine3d":
            ours = ["refine3d", "--ref", start, "--ini-high", a.ini_high, "--sym", "C1", "--healpix-order",
                    a.healpix_order, "--local-from-order", a.local_order]
            if a.refine_iter:
                ours += ["--iter", a.refine_iter]
            ours += shlex.split(a.refine_extra)
            rel = ["--ref", start, "--ini_high", a.ini_high, "--sym", "C1", "--healpix_order", a.healpix_order,
                   "--auto_local_healpix_order", a.local_order, "--auto_refine", "--split_random_halves",
                   "--low_resol_join_halves", 40, "--tau2_fudge", 1]
        elif job == "class3d":
            ours = ["class3d", "--ref", start, "--ini-high", a.ini_high, "--sym", "C1", "--healpix-order",
                    a.healpix_order, "--K", a.k3d, "--iter", a.iter, "--tau2-fudge", 4]
            ours += shlex.split(a.class_extra)
            rel = ["--ref", start, "--ini_high", a.ini_high, "--sym", "C1", "--healpix_order", a.healpix_order,
                   "--K", a.k3d, "--iter", a.iter, "--tau2_fudge", 4]
        else:
            ours = ["class2d", "--K", a.k2d, "--iter", a.iter, "--psi-step", a.psi_step, "--tau2-fudge", 2]
            ours += shlex.split(a.class_extra)
            rel = ["--K", a.k2d, "--iter", a.iter, "--psi_step", a.psi_step, "--tau2_fudge", 2]
            h = self.relion_help("relion_refine")
            if help_has(h, "--center_classes"):
                rel.append("--center_classes")
            if job == "class2d-vdam" and self.runs("relion"):
                if not help_has(h, "--grad"):
                    self.add({"job": job, "program": "relion_refine --grad", "status":
                              f"skipped: RELION {self.record.get('relion_version')} has no --grad (VDAM)"})
                    return
                rel = ["--K", a.k2d, "--iter", a.vdam_iter, "--psi_step", a.psi_step, "--tau2_fudge", 2, "--grad",
                       "--class_inactivity_threshold", 0.1, "--grad_write_iter", 10]
        if job != "class2d-vdam" and self.runs("mpi_em"):
            P = a.ranks
            d, r = self.exec(job, "mpi_em", self.ours(P) + ours + ["--i", unal, "--o", "out"] + self.common_ours(),
                             "mpi_em", P)
            row = {"job": job, "program": "mpi_em", "procs": f"{P} rank(s)", "wall_s": r["wall_s"],
                   "status": status_of(r), "peak_gpu_mib": r["peak_gpu_mib"], "command": r["command"],
               "load_average_1min": [r["load_before"], r["load_after"]]}
            row.update(summarize_em(os.path.join(d, "out"), T, mode, r, "mpi_em"))
            self.add(row)
        if not self.runs("relion"):
            return
        # RELION's VDAM (--grad) works in one process only ("not supported together with MPI")
        R = 1 if job == "class2d-vdam" else self.em_ranks(job)
        os.makedirs(os.path.join(self.out, job, "relion"), exist_ok=True)
        # and relion_refine_mpi refuses --grad even with one process: VDAM is done by the serial relion_refine
        prog = "relion_refine" if job == "class2d-vdam" else "relion_refine_mpi"
        name = prog + (" --grad" if job == "class2d-vdam" else "")
        d, r = self.exec(job, name, self.relion(prog, R) + ["--i", unal, "--o", os.path.join(self.out, job, "relion", "run")] + rel +
                         self.common_relion(), "relion", R)
        row = {"job": job, "program": name,
               "procs": f"{R} ranks x {a.threads} thr (1 leader)" if R > 1 else f"1 rank x {a.threads} thr",
               "wall_s": r["wall_s"], "status": status_of(r), "peak_gpu_mib": r["peak_gpu_mib"],
               "command": r["command"]}
        row.update(summarize_em(d, T, mode, r, "relion"))
        if job == "refine3d":
            row["final_resolution_stdout"] = final_resolution_from_stdout(open(r["log"], errors="replace").read())
        self.add(row)

    # -- the whole benchmark
    def main(self):
        a = self.args
        os.makedirs(self.out, exist_ok=True)
        ver = ""
        try:
            exe = next(p for p in ("relion_refine", "relion_refine_mpi", "relion_reconstruct") if self.have(p))
            ver = subprocess.run([os.path.join(self.bin, exe), "--version"], capture_output=True, text=True,
                                 timeout=60, env=self.env).stdout
        except (OSError, StopIteration, subprocess.SubprocessError):
            pass
        import mpi_em

        commit = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse", "--short",
                                 "HEAD"], capture_output=True, text=True).stdout.strip()
        gpu_name = None
        if a.gpu and shutil.which("nvidia-smi"):
            gpu_name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                      capture_output=True, text=True).stdout.strip()
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                   platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
        self.record = {"command": shlex.join([os.path.basename(sys.executable)] + sys.argv),
                       "date": datetime.datetime.now().isoformat(timespec="seconds"),
                       "mpi_em_version": mpi_em.__version__, "mpi_em_commit": commit,
                       "relion_version": relion_version(ver), "relion_bin": self.bin,
                       "relion_mpirun": a.relion_mpirun, "cpu": cpu, "cores": os.cpu_count(), "gpu": gpu_name,
                       "settings": {k: v for k, v in vars(a).items()}}
        old = os.path.join(self.out, "side_by_side.json")
        if set(a.programs) != set(PROGRAMS) and os.path.exists(old):
            # one side only: the other side's rows (and the jobs not run now) from the record already in --out
            prev = json.load(open(old))
            self.rows = kept_rows(prev.get("rows", []), a.jobs, a.programs)
            self.record["earlier"] = prev.get("earlier", []) + [{k: prev.get(k) for k in ("command", "date",
                                                                                        "mpi_em_commit")}]
        self.save()
        self.data = make_data(a, self.env)
        self.truth = Truth(self.data)
        self.record["start_map_vs_truth_05"] = self.truth.res05(os.path.join(self.data, "start.mrc"))
        stop_on_signals()
        for job in a.jobs:
            if STOP["signal"] is not None:
                break
            print(f"{job}:", flush=True)
            try:
                if job == "reconstruct":
                    self.reconstruct(job, a.ranks, a.relion_reconstruct_ranks or a.ranks, a.threads)
                elif job == "reconstruct-1":
                    self.reconstruct(job, 1, 1, 1)
                else:
                    self.em(job)
            except Stopped:  # outside a program's run (between programs, while evaluating): this job's row is lost
                self.add({"job": job, "program": "-", "status": "stopped"})
            except Exception as e:  # noqa: BLE001 (one job's failure keeps the others' results)
                import traceback

                traceback.print_exc()
                self.add({"job": job, "program": "-", "status": f"error: {e}"})
        self.save()
        plot(self.rows, os.path.join(self.out, "side_by_side.png"), self.record)
        text = table(self.rows) + "\n"
        loads = [x for r in self.rows for x in np.ravel(r.get("load_average_1min", [])) if x is not None]
        if loads:
            text += (f"\nload average (1 min) at the runs' start and end: {min(loads):.1f} to {max(loads):.1f} "
                     f"on {os.cpu_count()} cores\n")
        text += (f"start map vs truth (FSC 0.5): {fmt(self.record['start_map_vs_truth_05'])} Å; "
                 f"JSON: {os.path.join(self.out, 'side_by_side.json')}\n")
        print()
        print(text, end="")
        if a.summary:
            write_summary(self.out, a.summary, a.jobs, text)
            print(f"summary (no maps): {a.summary}")
        if STOP["signal"] is not None:
            print(f"stopped by {signal.Signals(STOP['signal']).name}: the results so far are above", file=sys.stderr)
            sys.exit(128 + STOP["signal"])


def write_summary(out: str, dst: str, jobs, text: str) -> list[str]:
    """The record of a comparison without its maps (``--summary``): the JSON, the PNG and ``text`` (the printed
    table) as side_by_side.txt, and per job mpi_em's per-iteration timings and log as mpi_em_JOB_timings.json and
    mpi_em_JOB_run.log (each program's command line is in the JSON). Returns the names written."""
    os.makedirs(dst, exist_ok=True)
    pairs = [("side_by_side.json", "side_by_side.json"), ("side_by_side.png", "side_by_side.png")]
    for job in dict.fromkeys(jobs):
        pairs += [(os.path.join(job, "mpi_em", "out", "run_timings.json"), f"mpi_em_{job}_timings.json"),
                  (os.path.join(job, "mpi_em", "out", "run.log"), f"mpi_em_{job}_run.log")]
    written = []
    for src, name in pairs:
        if os.path.isfile(os.path.join(out, src)):
            shutil.copyfile(os.path.join(out, src), os.path.join(dst, name))
            written.append(name)
    with open(os.path.join(dst, "side_by_side.txt"), "w") as f:
        f.write(text)
    return sorted(written + ["side_by_side.txt"])


def plot(rows, path, record):
    """Resolution against wall time from each program's launch, one panel per job."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jobs = []
    for r in rows:
        if r["job"] not in jobs and r.get("wall_s") is not None:
            jobs.append(r["job"])
    if not jobs:
        return
    fig, axes = plt.subplots(1, len(jobs), figsize=(4.2 * len(jobs), 3.6), squeeze=False)
    for ax, job in zip(axes[0], jobs):
        for r in [r for r in rows if r["job"] == job and r.get("wall_s") is not None]:
            c = "C0" if r["program"] == "mpi_em" else "C3"
            its = [x for x in r.get("per_iteration", []) if x["iteration"] > 0]
            if its:
                t = [x["t"] for x in its]
                v = [x.get("map_vs_truth_05") for x in its]
                if any(x is not None for x in v):
                    ax.plot(t, [np.nan if x is None else x for x in v], "o-", color=c, ms=3,
                            label=f"{r['program']}: map vs truth (0.5)")
                ax.plot(t, [np.nan if x.get("resolution") is None else x["resolution"] for x in its], "s--",
                        color=c, ms=3, alpha=0.6, label=f"{r['program']}: reported")
            else:
                if r.get("map_vs_truth_05") is not None:
                    ax.plot([r["wall_s"]], [r["map_vs_truth_05"]], "o", color=c,
                            label=f"{r['program']}: map vs truth (0.5)")
                if r.get("resolution") is not None:
                    ax.plot([r["wall_s"]], [r["resolution"]], "s", color=c, alpha=0.6,
                            label=f"{r['program']}: gold (0.143)")
        ts = [x["t"] for r in rows if r["job"] == job for x in r.get("per_iteration", []) if x["iteration"] > 0]
        ts += [r["wall_s"] for r in rows if r["job"] == job and r.get("wall_s")]
        if ts and max(ts) > 20 * max(min(ts), 1e-3):
            ax.set_xscale("log")
        else:
            ax.set_xlim(0, 1.1 * max(ts) if ts else None)
        ax.set_xlabel("wall time from launch (s)")
        ax.set_ylabel("resolution (Å)")
        ax.set_title(job)
        ax.legend(fontsize=6)
    fig.suptitle(f"mpi_em {record.get('mpi_em_version')} vs RELION {record.get('relion_version')}"
                 f" ({record.get('gpu') or record.get('cpu')})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def has_program(bin_dir: str, prog: str) -> bool:
    """``bin_dir``/``prog`` is there and executable."""
    return os.access(os.path.join(bin_dir, prog), os.X_OK)


def missing_programs(bin_dir: str, jobs) -> list[str]:
    """RELION's programs that ``jobs`` need and ``bin_dir`` has not as executables: a reconstruction takes
    relion_reconstruct or its MPI twin (the job's own first), the EM jobs relion_refine_mpi."""
    def have(prog):
        return has_program(bin_dir, prog)

    missing = []
    for job in dict.fromkeys(jobs):
        if job.startswith("reconstruct"):
            first, twin = (("relion_reconstruct_mpi", "relion_reconstruct") if job == "reconstruct" else
                           ("relion_reconstruct", "relion_reconstruct_mpi"))
            need = None if have(first) or have(twin) else f"{first} (or {twin})"
        else:
            need = None if have("relion_refine_mpi") else "relion_refine_mpi"
        if need and need not in missing:
            missing.append(need)
    return missing


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--relion-bin", metavar="DIR", help="folder with RELION's programs (required)")
    p.add_argument("--relion-mpirun", default="/usr/bin/mpirun", metavar="PATH",
                   help="mpirun for RELION's *_mpi programs (default /usr/bin/mpirun: Debian's relion uses Open MPI)")
    p.add_argument("--mpi-em-cmd", default=None, metavar="CMD",
                   help="how to launch mpi-em, '{ranks}' replaced by the rank count (default: this Python's "
                        "'mpirun -n {ranks} mpi-em')")
    p.add_argument("--gpu", action="store_true", help="mpi-em on the GPU, RELION with --gpu; peak GPU memory sampled")
    p.add_argument("--gpu-ids", default="", help="argument of RELION's --gpu (default '': RELION chooses)")
    p.add_argument("--ranks", type=int, default=2, help="mpi-em ranks (and relion_reconstruct_mpi's; default 2)")
    p.add_argument("--relion-ranks", type=int, default=None,
                   help="MPI processes of relion_refine_mpi (default --ranks + 1: a leader and --ranks workers; at "
                        "least 3 for auto-refine)")
    p.add_argument("--relion-reconstruct-ranks", type=int, default=None,
                   help="MPI processes of relion_reconstruct_mpi in the 'reconstruct' job (default --ranks; RELION's "
                        "reconstruction uses CPU cores only)")
    p.add_argument("--threads", type=int, default=1, help="RELION --j (default 1)")
    p.add_argument("--omp-threads", type=int, default=1, help="OMP_NUM_THREADS of every process (default 1)")
    p.add_argument("--pool", type=int, default=3, help="RELION --pool (default 3)")
    p.add_argument("--box", type=int, default=128)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--snr", type=float, default=0.05)
    p.add_argument("--apix", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ini-high", type=float, default=30.0, help="start map = truth low-passed to this, Å (default 30)")
    p.add_argument("--diameter", type=float, default=None, help="particle diameter, Å (default 0.8 x box x apix)")
    p.add_argument("--healpix-order", type=int, default=2)
    p.add_argument("--local-order", type=int, default=4, help="local searches from this order (default 4)")
    p.add_argument("--offset-range", type=float, default=5.0, help="pixels (default 5)")
    p.add_argument("--offset-step", type=float, default=2.0,
                   help="RELION's coarse offset step, pixels (default 2; mpi-em's fine step is half of it)")
    p.add_argument("--psi-step", type=float, default=10.0, help="class2d in-plane step, degrees (default 10)")
    p.add_argument("--iter", type=int, default=25, help="class3d / class2d iterations (default 25)")
    p.add_argument("--refine-iter", type=int, default=None, help="mpi-em refine3d --iter (default its own)")
    p.add_argument("--refine-extra", default="", metavar="OPTIONS",
                   help="more mpi-em refine3d options, one string (e.g. '--incr-size 10 --fsc-jump --folds 4'); "
                        "they are in the recorded command")
    p.add_argument("--class-extra", default="", metavar="OPTIONS",
                   help="more mpi-em class3d and class2d options, one string (e.g. '--reseed-below 0': no re-seeding "
                        "of small classes, as RELION); they are in the recorded command")
    p.add_argument("--vdam-iter", type=int, default=200, help="RELION VDAM iterations (default 200)")
    p.add_argument("--k3d", type=int, default=4)
    p.add_argument("--k2d", type=int, default=50)
    p.add_argument("--jobs", nargs="+", default=["reconstruct", "refine3d", "class3d", "class2d"], choices=JOBS)
    p.add_argument("--programs", nargs="+", default=list(PROGRAMS), choices=PROGRAMS,
                   help="whose programs to run (default both). One side alone keeps the other side's rows of the "
                        "record already in --out (made with the same --data): RELION's long jobs can then have a "
                        "command of their own, after mpi_em's on the same machine")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per program run (default 3600)")
    p.add_argument("--out", metavar="DIR", help="output folder (required)")
    p.add_argument("--data", metavar="DIR",
                   help="data folder (default OUT/data); reused when it holds a data set of the same parameters, so "
                        "several runs with different --jobs / --out can share one")
    p.add_argument("--replot", metavar="JSON", help="only draw the PNG again from a side_by_side.json (next to it)")
    p.add_argument("--summary", metavar="DIR",
                   help="also copy the record without maps into DIR: JSON, PNG, the table as side_by_side.txt, and "
                        "per job mpi_em's per-iteration timings and log (a few hundred kB, where --out holds GBs)")
    p.add_argument("--data-only", action="store_true",
                   help="only simulate (or reuse) the data set of these parameters in --data and stop (a later run "
                        "with the same parameters reuses it; RELION's programs are not needed)")
    a = p.parse_args(argv)
    if a.data_only and not (a.data or a.out):
        p.error("--data-only needs --data or --out")
    if not a.replot and not a.data_only and not (a.relion_bin and a.out):
        p.error("--relion-bin and --out are required")
    if a.diameter is None:
        a.diameter = round(0.8 * a.box * a.apix, 1)
    return a


if __name__ == "__main__":
    _a = parse_args()
    if _a.replot:
        _rec = json.load(open(_a.replot))
        plot(_rec["rows"], os.path.join(os.path.dirname(os.path.abspath(_a.replot)), "side_by_side.png"), _rec)
    elif _a.data_only:
        make_data(_a, dict(os.environ, OMP_NUM_THREADS=str(_a.omp_threads)))
    else:
        _missing = missing_programs(os.path.abspath(_a.relion_bin), _a.jobs) if "relion" in _a.programs else []
        if _missing:  # before any data or run: a comparison without RELION's rows is no comparison
            print(f"relion_side_by_side: --relion-bin {_a.relion_bin}: no executable {', '.join(_missing)} "
                  f"for --jobs {' '.join(_a.jobs)}", file=sys.stderr)
            sys.exit(2)
        Bench(_a).main()
