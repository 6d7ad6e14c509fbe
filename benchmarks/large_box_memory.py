"""Peak memory and seconds per iteration of refine3d at large boxes (issue 19's targets), one job per box: simulated
particles (``mpi-em simulate``, SNR 0.05, CTF), refine3d from the truth low-passed to --ini-high, the peak sampled
every --interval s (GPU: ``nvidia-smi``'s memory.used of the whole device; CPU: the resident set of the job's
processes, from /proc), beside the job's own memory model (run.json) and RELION's estimate for a GPU rank.

On one H200 (the issue's targets: box 512 within 24 GB, box 768 on one GPU):

    python benchmarks/large_box_memory.py --device gpu --out /tmp/largebox --json largebox.json

(default jobs: box 512, 3 000 particles, 3 iterations; box 768, 1 000 particles, 2 iterations; --accumulate
single). The known-pose reconstruction instead of refine3d, e.g. box 1024 with 2 ranks sharing one GPU:

    python benchmarks/large_box_memory.py --job reconstruct --ranks 2 --accumulate single --jobs 1024:300:1 \
        --extra "--pad 1" --out /tmp/largebox --json rec1024.json

A CPU check of the script at small boxes:

    python benchmarks/large_box_memory.py --device cpu --jobs 48:200:2 64:200:2 --out /tmp/lb --json lb.json

Each job writes its folder under --out (run.json, run.log, run_timings.json); the JSON holds per job: box,
particles, iterations, the options, rc, wall seconds, the sampled peak (bytes, and what it measures), the model's
peak per rank and its phase, the E-step and M-step seconds of each iteration, RELION's estimate.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _gpu_used_bytes() -> int:
    r = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                       capture_output=True, text=True, timeout=10)
    return int(sum(int(x) for x in r.stdout.split())) * 2 ** 20


def _tree_rss_bytes(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants (Linux /proc)."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def run_sampled(cmd, device: str, interval: float, log_path: str) -> dict:
    """Run ``cmd``, sampling the peak memory every ``interval`` s -> {rc, wall_s, peak_bytes, baseline_bytes}."""
    baseline = _gpu_used_bytes() if device == "gpu" else 0
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPI_EM_TIMING_DETAIL="1")
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        peak = [0]
        done = threading.Event()

        def sample():
            while not done.is_set():
                try:
                    peak[0] = max(peak[0], _gpu_used_bytes() if device == "gpu" else _tree_rss_bytes(proc.pid))
                except Exception:  # noqa: BLE001 - a failed sample is skipped
                    pass
                done.wait(interval)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        rc = proc.wait()
        done.set()
        th.join()
    return {"rc": rc, "wall_s": round(time.time() - t0, 1), "peak_bytes": int(peak[0]),
            "baseline_bytes": int(baseline)}


def _py(args):
    return [sys.executable, "-m", "mpi_em"] + [str(a) for a in args]


def one_job(box: int, n: int, iters: int, a) -> dict:
    from mpi_em.memory import relion_gpu_bytes

    data = os.path.join(a.out, f"data{box}")
    name = (f"reconstruct{box}" if a.job == "reconstruct" else f"refine{box}") + ("_local" if a.aligned else "")
    job = os.path.join(a.out, name)
    if not os.path.exists(os.path.join(data, "particles_unaligned.star")):
        r = subprocess.run(_py(["--quiet", "simulate", "--out", data, "--box", box, "--n", n, "--snr", a.snr,
                                "--apix", a.apix, "--seed", 1, "--per-stack", 500]), capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"simulate box {box}: {r.stderr.strip().splitlines()[-1:]}")
    launcher = a.launcher.split() + ["-n", str(a.ranks)] if a.launcher else []
    star = "particles.star" if a.aligned or a.job == "reconstruct" else "particles_unaligned.star"
    if a.job == "reconstruct":  # known poses: the true ones
        cmd = launcher + _py(["reconstruct", "--i", os.path.join(data, star), "--device", a.device, "--accumulate",
                              a.accumulate, "--o", job, "--overwrite"] + a.extra.split())
    else:
        cmd = launcher + _py(["refine3d", "--i", os.path.join(data, star), "--ref",
                          os.path.join(data, "truth.mrc"), "--ini-high", a.ini_high, "--iter", iters, "--device",
                          a.device, "--accumulate", a.accumulate, "--o", job, "--overwrite"]
                             + (["--healpix-order", 4, "--local-from-order", 4] if a.aligned else [])
                             + a.extra.split())
    res = run_sampled(cmd, a.device, a.interval, os.path.join(a.out, f"{name}.log"))
    out = {"job": a.job, "box": box, "particles": n, "iterations": iters, "accumulate": a.accumulate, "ranks": a.ranks,
           "search": "local around the true poses" if a.aligned else "global from --healpix-order",
           "device": a.device, "command": " ".join(cmd), **res,
           "peak_measures": "nvidia-smi memory.used, whole device" if a.device == "gpu" else "RSS of the job's processes",
           "relion_gpu_rank_bytes": relion_gpu_bytes(box)}
    try:
        mem = json.load(open(os.path.join(job, "run.json")))["memory"]
        out.update(model_peak_bytes=mem["peak_bytes"], model_phase=mem["peak_phase"],
                   model_accumulate=mem["inputs"].get("accumulate"), model_batch=mem["inputs"].get("batch"))
    except (OSError, KeyError, ValueError):
        pass
    try:  # rank 0's seconds per iteration, E-step and M-step
        out["iteration_seconds"] = [
            {"iteration": it["iteration"], "seconds": round(it["seconds_iteration"], 2),
             "e_step": round(it["per_rank"][0]["seconds_estep"], 2),
             "m_step": round(it["per_rank"][0]["seconds_mstep"], 2)}
            for it in json.load(open(os.path.join(job, "run_timings.json")))]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        pass
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", nargs="+", default=["512:3000:3", "768:1000:2"], metavar="BOX:N:ITER",
                   help="jobs as box:particles:iterations (default 512:3000:3 768:1000:2)")
    p.add_argument("--job", choices=("refine3d", "reconstruct"), default="refine3d",
                   help="refine3d (default), or reconstruct from the true poses (ITER is ignored)")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    p.add_argument("--accumulate", choices=("auto", "double", "single"), default="single")
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--launcher", default="mpirun", help="MPI launcher ('' : one rank without it)")
    p.add_argument("--aligned", action="store_true",
                   help="start from the true poses (particles.star) with local searches at order 4 (refine3d "
                        "starts local when --healpix-order >= --local-from-order); with --ini-high at Nyquist, "
                        "the search of a last iteration at the full image size")
    p.add_argument("--extra", default="", help="more options of the job, one string")
    p.add_argument("--snr", type=float, default=0.05)
    p.add_argument("--apix", type=float, default=1.0)
    p.add_argument("--ini-high", type=float, default=30.0)
    p.add_argument("--interval", type=float, default=0.2, help="seconds between memory samples")
    p.add_argument("--out", required=True, help="folder for the data and the jobs")
    p.add_argument("--json", help="write the results here (also printed)")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    results = []
    for spec in a.jobs:
        box, n, iters = (int(x) for x in spec.split(":"))
        r = one_job(box, n, iters, a)
        results.append(r)
        print(f"box {box}: rc {r['rc']}, {r['wall_s']} s, peak {r['peak_bytes'] / 2 ** 30:.2f} GiB "
              f"({r['peak_measures']}), model {r.get('model_peak_bytes', 0) / 2 ** 30:.2f} GiB "
              f"({r.get('model_accumulate')}, {r.get('model_phase')}), RELION {r['relion_gpu_rank_bytes'] / 1e9:.1f} GB",
              flush=True)
        if a.json:
            with open(a.json + ".tmp", "w") as f:
                json.dump(results, f, indent=2)
            os.replace(a.json + ".tmp", a.json)
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
