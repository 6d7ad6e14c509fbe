#!/usr/bin/env python
"""Strong and weak scaling of reconstruct, refine3d (one iteration) and class2d (one iteration), phases timed.

    python benchmarks/scaling/scaling.py --box 64 --n 4000 --weak-per-rank 1000 --ranks 1 2 4 \\
        --out benchmarks/results/scaling-cpu            # CPU ranks (here: 2 cores, P = 4 oversubscribed)
    python benchmarks/scaling/scaling.py --box 128 --n 50000 --ranks 1 --device gpu --out OUT   # one GPU

Each job is started as ``mpirun -n P python -m mpi_em ...`` (the command is printed) on a simulated data set (phantom,
CTF, SNR 0.05). Strong scaling: the same N particles for every P. Weak scaling: ``--weak-per-rank`` x P particles
(the first rows of the same data set). Phases come from the jobs' own records (``run.json`` of reconstruct,
``run_timings.json`` of refine3d/class2d: per rank, synchronised at phase boundaries on the GPU); a phase's time
is the maximum over ranks (the critical path). Bytes: bytes each rank hands to the volume reduction.

The projection model (fitted on the measured points, then checked against them):
    t(P) = t_particles(1) * n_max(P) / N          particle work (read, E-step, insertion) of the busiest rank
         + t_reduce(P)                            a + b * (P - 1) / P * V   (V: one rank's accumulator bytes;
                                                  ring reduce-scatter; b from the measured P >= 2 points)
         + t_reconstruct(1) / P + c               distributed division + FFT, fixed part c (allgather, FSC)
         + t_other                                 the rest (I/O of outputs, python, scheduling)
The particle term is multiplied by P / units when P ranks share fewer processors (--units; oversubscribed CPU runs).
With ``--net-GBps`` the reduction beyond one node (P > --gpus-per-node) is projected at that bandwidth instead.
Projected: 8 and 64 ranks, and the published anchors (749k-particle Class2D, 25 iterations; Refine3D) scaled from
the measured per-particle cost (same box).

Outputs in --out: scaling.json, scaling.txt (the table), speedup.png, efficiency.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
PARTICLE_PHASES = ("read", "prepare", "coarse", "fine", "insert", "stats")


def sh(cmd, env=None, log=None) -> float:
    print("+ " + " ".join(map(str, cmd)), flush=True)
    t = time.time()
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    dt = time.time() - t
    if log:
        with open(log, "a") as f:
            f.write("+ " + " ".join(map(str, cmd)) + f"\n{r.stdout}{r.stderr}\n")
    if r.returncode:
        sys.stderr.write(r.stdout[-3000:] + r.stderr[-3000:])
        raise SystemExit(f"command failed ({r.returncode})")
    return dt


def mpirun(P: int) -> list[str]:
    exe = shutil.which("mpirun", path=os.path.dirname(sys.executable)) or shutil.which("mpirun")
    cmd = [exe, "-n", str(P)]
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" in out or "OpenRTE" in out:
        cmd += ["--oversubscribe", "--bind-to", "none"]
    return cmd


def make_data(d: Path, box: int, n: int, apix: float, env, log) -> None:
    if (d / "start.mrc").exists():
        return
    sh([sys.executable, "-m", "mpi_em", "simulate", "--out", d, "--box", box, "--n", n, "--snr", 0.05, "--apix", apix,
        "--per-stack", 5000, "--seed", 11, "--start-lowpass", 30], env, log)


def subset(d: Path, name: str, n: int) -> Path:
    """STAR files with the first n rows (poses and unaligned), next to the stacks."""
    import starfile

    out = d / f"{name}_{n}.star"
    if not out.exists():
        for src, dst in (("particles.star", out), ("particles_unaligned.star", d / f"{name}_{n}_unaligned.star")):
            b = starfile.read(d / src, always_dict=True)
            b["particles"] = b["particles"].iloc[:n]
            starfile.write(b, dst, float_format=None)
    return out


def run_job(job: str, P: int, star: Path, d: Path, out: Path, args, env, log) -> dict:
    if out.exists():
        shutil.rmtree(out)
    common = ["--device", args.device, "--batch", args.batch]
    if job == "reconstruct":
        cmd = mpirun(P) + [sys.executable, "-m", "mpi_em", "reconstruct", "--i", star, "--o", out] + common
    elif job == "refine3d":
        cmd = mpirun(P) + [sys.executable, "-m", "mpi_em", "refine3d", "--i",
                           str(star).replace(".star", "_unaligned.star"), "--ref", d / "start.mrc", "--ini-high", 30,
                           "--o", out, "--iter", 1, "--healpix-order", args.order] + common
    else:
        cmd = mpirun(P) + [sys.executable, "-m", "mpi_em", "class2d", "--i", str(star).replace(".star", "_unaligned.star"),
                           "--o", out, "--iter", 1, "--K", args.K] + common
    wall = sh(cmd, env, log)
    rec = {"job": job, "P": P, "wall_s": wall, "command": " ".join(map(str, cmd))}
    if job == "reconstruct":
        j = json.load(open(out / "run.json"))
        rec["phases"] = {"particles": j["seconds_insert"], "reduce": j["seconds_reduce"],
                         "reconstruct": j["seconds_reconstruct"]}
        rec["total_s"] = j["seconds_total"]
        rec["bytes_reduce_per_rank"] = max(j["bytes_sent_per_rank"])
        rec["n_max"] = None
    else:
        t = json.load(open(out / "run_timings.json"))[-1]
        ranks = t["per_rank"]
        ph = {}
        for name in set().union(*[r["seconds"] for r in ranks]):
            ph[name] = max(r["seconds"].get(name, 0.0) for r in ranks)
        rec["phases"] = {"particles": max(sum(r["seconds"].get(p, 0.0) for p in PARTICLE_PHASES) for r in ranks),
                         "reduce": ph.get("reduce", 0.0), "reconstruct": ph.get("reconstruct", 0.0)}
        rec["detail"] = ph
        rec["total_s"] = t["seconds_iteration"]
        rec["bytes_reduce_per_rank"] = max(r["bytes"].get("reduce_sent", 0) for r in ranks)
        flops = sum(sum(r["flops"].values()) for r in ranks)
        gemm_s = max(r["seconds"].get("coarse", 0) + r["seconds"].get("fine", 0) for r in ranks)
        rec["gemm_flops"] = flops
        rec["estep_gemm_phase_TFLOPs"] = flops / max(gemm_s, 1e-9) / 1e12 / 1  # all ranks' flops / slowest rank
        rec["n_max"] = max(r["n_particles"] for r in ranks)
    rec["phases"]["other"] = max(0.0, rec["total_s"] - sum(rec["phases"].values()))
    return rec


def accumulator_bytes(job: str, box: int, K: int) -> int:
    """Bytes of one rank's accumulators (complex128 F + float64 W, pad 2): what the reduction moves."""
    npad, nxh = 2 * box, box + 1
    if job == "class2d":
        return K * npad * nxh * 24
    return 2 * npad * npad * nxh * 24


def fit_model(points: list[dict], N: int, reduce_GBps: float | None = None, V_bytes: int | None = None) -> dict:
    """Fit the projection model on one job's strong-scaling points (see module doc). Without measured P >= 2
    points the reduction is modelled at ``reduce_GBps`` (bytes handed to the reduce-scatter per second)."""
    by_p = {r["P"]: r for r in points}
    one = by_p[min(by_p)]
    p1 = one["P"]
    t_part1 = one["phases"]["particles"] * p1          # work of all particles on one rank
    V = max([r["bytes_reduce_per_rank"] for r in points] + [V_bytes or 0]) or 1.0
    multi = [r for r in points if r["P"] > 1]
    if multi:
        x = np.array([(r["P"] - 1) / r["P"] * V for r in multi])
        y = np.array([r["phases"]["reduce"] for r in multi])
        if len(multi) >= 2 and np.ptp(x) > 0:
            b, a = np.polyfit(x, y, 1)
            a, b = max(a, 0.0), max(b, 0.0)
        else:
            a, b = 0.0, float(y.mean() / max(x.mean(), 1.0))
    else:
        a, b = 0.0, (1.0 / (reduce_GBps * 1e9) if reduce_GBps else 0.0)
    rec1 = one["phases"]["reconstruct"]
    if multi:
        Ps = np.array([r["P"] for r in points], float)
        ys = np.array([r["phases"]["reconstruct"] for r in points])
        A = np.stack([1.0 / Ps, np.ones_like(Ps)], 1)
        (r1, c), *_ = np.linalg.lstsq(A, ys, rcond=None)
        r1, c = max(r1, 0.0), max(c, 0.0)
    else:
        r1, c = rec1, 0.0
    other = float(np.median([r["phases"]["other"] for r in points]))
    return {"t_particles_1": t_part1, "reduce_a": a, "reduce_b_s_per_byte": b, "V_bytes": V,
            "reconstruct_r1": r1, "reconstruct_c": c, "other": other, "N": N}


def predict(m: dict, P: int, N: int | None = None, gpus_per_node: int | None = None, net_GBps: float | None = None,
            n_per_rank_max=None, units: int | None = None) -> dict:
    """Model time of one iteration on P ranks. ``units``: processors the ranks share (cores or GPUs); with
    P > units the particle work runs units at a time (oversubscription)."""
    N = N or m["N"]
    n_max = n_per_rank_max if n_per_rank_max is not None else -(-N // P)
    share = max(1.0, P / units) if units else 1.0
    part = m["t_particles_1"] * n_max / m["N"] * share
    V = m["V_bytes"]
    red = 0.0 if P == 1 else m["reduce_a"] + m["reduce_b_s_per_byte"] * (P - 1) / P * V
    if net_GBps and gpus_per_node and P > gpus_per_node and P > 1:
        red = m["reduce_a"] + 2.0 * (P - 1) / P * V / (net_GBps * 1e9)
    rec = m["reconstruct_r1"] / P + m["reconstruct_c"]
    return {"P": P, "particles": part, "reduce": red, "reconstruct": rec, "other": m["other"],
            "total": part + red + rec + m["other"]}


def plots(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for kind, fname in (("speedup", "speedup.png"), ("efficiency", "efficiency.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        Pmax = 1
        for mode in ("strong", "weak"):
            for job in ("reconstruct", "refine3d", "class2d"):
                pts = sorted([r for r in results if r["job"] == job and r["mode"] == mode], key=lambda r: r["P"])
                if len(pts) < 2:
                    continue
                P = np.array([r["P"] for r in pts])
                t = np.array([r["total_s"] for r in pts])
                Pmax = max(Pmax, P.max())
                if mode == "strong":
                    y = t[0] * P[0] / t if kind == "speedup" else t[0] * P[0] / (t * P)
                else:
                    y = P * t[0] / t / P[0] if kind == "speedup" else t[0] / t
                ax.plot(P, y, "o-" if mode == "strong" else "s--", label=f"{job} ({mode})")
        Ps = np.arange(1, Pmax + 1)
        ax.plot(Ps, Ps if kind == "speedup" else np.ones_like(Ps), "k:", label="ideal")
        ax.set_xlabel("ranks P")
        ax.set_ylabel("speedup over P=1" if kind == "speedup" else "parallel efficiency")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--apix", type=float, default=None, help="pixel size, Å (default 192/box)")
    ap.add_argument("--n", type=int, default=4000, help="particles for strong scaling")
    ap.add_argument("--weak-per-rank", type=int, default=0, help="particles per rank for weak scaling (0: skip)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--jobs", nargs="+", default=["reconstruct", "refine3d", "class2d"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu", "auto"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--order", type=int, default=2, help="HEALPix order of refine3d's global search (default 2)")
    ap.add_argument("--K", type=int, default=50, help="class2d classes (default 50)")
    ap.add_argument("--gpus-per-node", type=int, default=8, help="for the projection beyond one node")
    ap.add_argument("--net-GBps", type=float, default=25.0,
                    help="inter-node bandwidth for the projection beyond one node (default 25 GB/s, HDR200 IB)")
    ap.add_argument("--units", type=int, default=None,
                    help="processors the measured ranks shared (default: CPU cores for --device cpu, else no limit); "
                         "the model check accounts for oversubscription with it; projections assume one per rank")
    ap.add_argument("--reduce-GBps", type=float, default=None,
                    help="model the reduction at this rate when no P >= 2 point was measured (e.g. 10 for GPU buffers "
                         "staged through host memory and reduced by MPI in one node)")
    ap.add_argument("--refit", type=Path, default=None,
                    help="no runs: re-fit the model on the results of an earlier scaling.json and write "
                         "model.txt / model.json next to --out")
    ap.add_argument("--warmup", action="store_true",
                    help="run every job once on 2000 particles first, untimed (GPU: kernel compilation)")
    ap.add_argument("--data", type=Path, default=None, help="data folder (default OUT/data; reused if present)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.units is None and args.device == "cpu":
        args.units = os.cpu_count()
    apix = args.apix or 192.0 / args.box
    if args.refit:
        old = json.loads(args.refit.read_text())
        args.out.mkdir(parents=True, exist_ok=True)
        args.ranks = sorted({r["P"] for r in old["results"]})
        args.jobs = [j for j in ("reconstruct", "refine3d", "class2d") if any(r["job"] == j for r in old["results"])]
        return report(args, old["results"], apix, time.time(), args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "commands.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), MPI_EM_DEVICE=args.device)
    n_total = max(args.n, args.weak_per_rank * max(args.ranks))
    d = args.data or args.out / "data"
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"mpi_em_scaling_{os.getpid()}"
    make_data(d, args.box, n_total, apix, env, log)
    if args.warmup:  # GPU: compile every kernel (CuPy caches them on disk) before anything is timed
        star = subset(d, "subset", min(args.n, 2000))
        for job in args.jobs:
            run_job(job, min(args.ranks), star, d, work / f"warmup_{job}", args, env, log)
    results = []
    t0 = time.time()
    modes = [("strong", args.n)] + ([("weak", None)] if args.weak_per_rank else [])
    for mode, n in modes:
        for job in args.jobs:
            for P in args.ranks:
                nn = n if mode == "strong" else args.weak_per_rank * P
                star = subset(d, "subset", nn)
                r = run_job(job, P, star, d, work / f"{job}_{mode}_{P}", args, env, log)
                r.update(mode=mode, n_particles=nn)
                results.append(r)
                print(f"  {job:11s} {mode:6s} P={P:<3d} N={nn:<7d} {r['total_s']:8.2f} s  " +
                      "  ".join(f"{k} {v:.2f}" for k, v in r["phases"].items()), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return report(args, results, apix, t0, args.out)


def report(args, results, apix, t0, out: Path) -> int:
    """Speedups, the fitted model, its check against the measured points, projections; table, JSON, plots."""
    models, checks, proj = {}, [], []
    for job in args.jobs:
        pts = [r for r in results if r["job"] == job and r["mode"] == "strong"]
        if not pts:
            continue
        m = fit_model(pts, args.n, args.reduce_GBps, accumulator_bytes(job, args.box, args.K))
        models[job] = m
        for r in pts:
            p = predict(m, r["P"], units=args.units)
            checks.append({"job": job, "P": r["P"], "measured_s": r["total_s"], "model_s": p["total"],
                           "error_percent": 100 * (p["total"] - r["total_s"]) / r["total_s"]})
        for P in (2, 8, 64):
            p = predict(m, P, gpus_per_node=args.gpus_per_node, net_GBps=args.net_GBps)
            proj.append(dict(job=job, N=args.n, **p, speedup=predict(m, 1)["total"] / p["total"]))
    anchors = []
    if "class2d" in models:
        m = models["class2d"]
        for P in (1, 8, 64):
            p = predict(m, P, N=749_000, gpus_per_node=args.gpus_per_node, net_GBps=args.net_GBps)
            anchors.append({"anchor": "Class2D 749k particles, 25 iterations (27 h on 9 CPU nodes)", "P": P,
                            "box": args.box, "K": args.K, "projected_h": 25 * p["total"] / 3600})
    if "refine3d" in models:
        m = models["refine3d"]
        for P in (1, 8, 64):
            p = predict(m, P, N=749_000, gpus_per_node=args.gpus_per_node, net_GBps=args.net_GBps)
            anchors.append({"anchor": "Refine3D 749k particles, ~20 iterations at this sampling (16 h on 4 GPUs)",
                            "P": P, "box": args.box, "projected_h": 20 * p["total"] / 3600})

    lines = [f"scaling: box {args.box}, {apix:.2f} Å/px, strong N = {args.n}, weak {args.weak_per_rank}/rank, "
             f"device {args.device}, {platform.node()} ({os.cpu_count()} cores)",
             f"{'job':11s} {'mode':6s} {'P':>3s} {'N':>7s} {'total s':>8s} {'particles':>9s} {'reduce':>7s} "
             f"{'recon':>7s} {'other':>7s} {'speedup':>7s} {'eff':>5s} {'MB red/rank':>11s}"]
    for r in results:
        base = [b for b in results if b["job"] == r["job"] and b["mode"] == r["mode"]
                and b["P"] == min(args.ranks)][0]
        if r["mode"] == "strong":
            sp = base["total_s"] * base["P"] / r["total_s"]
            eff = sp / r["P"]
        else:
            eff = base["total_s"] / r["total_s"]
            sp = eff * r["P"] / base["P"]
        r["speedup"], r["efficiency"] = sp, eff
        ph = r["phases"]
        lines.append(f"{r['job']:11s} {r['mode']:6s} {r['P']:>3d} {r['n_particles']:>7d} {r['total_s']:>8.2f} "
                     f"{ph['particles']:>9.2f} {ph['reduce']:>7.2f} {ph['reconstruct']:>7.2f} {ph['other']:>7.2f} "
                     f"{sp:>7.2f} {eff:>5.2f} {r['bytes_reduce_per_rank'] / 1e6:>11.1f}")
    lines.append("model check (strong scaling): " + "; ".join(
        f"{c['job']} P={c['P']}: {c['model_s']:.2f} vs {c['measured_s']:.2f} s ({c['error_percent']:+.0f}%)"
        for c in checks))
    for p in proj:
        lines.append(f"projection {p['job']} P={p['P']}: {p['total']:.2f} s/iteration (particles {p['particles']:.2f}, "
                     f"reduce {p['reduce']:.2f}, reconstruct {p['reconstruct']:.2f}, other {p['other']:.2f}), "
                     f"speedup {p['speedup']:.1f}")
    for a in anchors:
        lines.append(f"anchor {a['anchor']}: P={a['P']} -> {a['projected_h']:.2f} h")
    text = "\n".join(lines)
    print(text)
    (out / ("model.txt" if args.refit else "scaling.txt")).write_text(text + "\n")
    (out / ("model.json" if args.refit else "scaling.json")).write_text(json.dumps({
        "command": " ".join([Path(sys.executable).name] + sys.argv), "elapsed_s": time.time() - t0,
        "machine": {"node": platform.node(), "cpu_count": os.cpu_count(), "platform": platform.platform()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results, "models": models, "model_check": checks, "projections": proj, "anchors": anchors},
        indent=2, default=float))
    if not args.refit:
        plots(results, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
