"""Soak test of the failure paths (not part of CI): many short refine3d jobs under `mpirun -n 2`, each with a random
fault, counting hangs, lost checkpoints, wrong exit codes and --continue results that differ from the
uninterrupted run.

Faults: none; a rank killed (SIGKILL or SIGTERM) at a random moment; the disk filled at a random moment (a small
tmpfs: needs root, else the fault is skipped); a STAR row past its stack's end; a second job on the same output
folder. After a kill or a full disk the job is continued (`--continue`, with room again) and its final poses and
map must equal the uninterrupted run's bit for bit.

    python benchmarks/soak_faults.py --jobs 100 --out benchmarks/results/fault-soak/
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mrcfile
import numpy as np
import starfile

FAULTS = ("none", "kill", "disk_full", "bad_row", "second_job")
N, BOX = 200, 32


def mpirun():
    here = Path(sys.executable).parent / "mpirun"
    return str(here) if here.exists() else shutil.which("mpirun")


class Job:
    def __init__(self, args, ranks=2, cwd=None):
        cmd = [sys.executable, "-m", "mpi_em"] + [str(a) for a in args]
        if ranks:
            cmd = [mpirun(), "-n", str(ranks)] + cmd
        env = dict(os.environ, OMP_NUM_THREADS="1", MPI_EM_DEVICE="cpu")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=cwd,
                                     env=env, start_new_session=True)
        self.lines = []
        self.t0 = time.monotonic()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait(self, timeout):
        """(exit code or None for a hang, seconds)."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            rc = None
        self.end = time.monotonic()
        time.sleep(0.05)
        return rc, self.end - self.t0

    def errors(self):
        return [line for _, line in self.lines if line.startswith("mpi-em: error:")]

    def first_error(self):
        return next((t for t, line in self.lines if line.startswith("mpi-em: error:")), None)


def rank_pids(root):
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        with contextlib.suppress(OSError):
            env = dict(kv.split("=", 1) for kv in open(f"/proc/{pid}/environ").read().split("\0") if "=" in kv)
            if "PMI_RANK" in env and "mpi_em" in open(f"/proc/{pid}/cmdline").read():
                out[int(env["PMI_RANK"])] = pid
    return out


def iteration_done(out):
    try:
        return json.load(open(out / "checkpoint.json"))["iteration"]
    except (OSError, ValueError, KeyError):
        return 0


def checkpoint_ok(out):
    """None: no checkpoint; True: checkpoint.json points at a readable, consistent HDF5; False: lost."""
    if not (out / "checkpoint.json").exists():
        return None
    from mpi_em.em.state import MODES, EMState

    try:  # the maps too, from the map files the checkpoint names, checked against its CRC-32
        mode = json.load(open(out / "checkpoint.json"))["mode"]
        ptr, state, _ = EMState.load(str(out), MODES[mode])
        return state.iter == ptr["iteration"] and bool(np.isfinite(state.maps).all())
    except Exception:  # noqa: BLE001 - any failure is a lost checkpoint
        return False


def same_result(a, b):
    try:
        sa = starfile.read(a / "run_data.star", always_dict=True)["particles"]
        sb = starfile.read(b / "run_data.star", always_dict=True)["particles"]
        cols = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]
        return bool(np.array_equal(sa[cols].to_numpy(), sb[cols].to_numpy()) and np.array_equal(
            mrcfile.read(a / "run_class001.mrc"), mrcfile.read(b / "run_class001.mrc")))
    except Exception:  # noqa: BLE001
        return False


def refine_args(data, out, star="particles_unaligned.star"):
    return ["refine3d", "--i", data / star, "--ref", data / "start.mrc", "--ini-high", 32, "--healpix-order", 1,
            "--max-order", 1, "--iter", 2, "--o", out]


@contextlib.contextmanager
def tmpfs(path, size="16m"):
    path.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                        capture_output=True).returncode == 0
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(folder):
    path = folder / "filler"
    with open(path, "wb", buffering=0) as f:
        for block in (1 << 20, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * block)
    return path


def wait_until(cond, job, timeout):
    t0 = time.monotonic()
    while not cond():
        if job.proc.poll() is not None or time.monotonic() - t0 > timeout:
            return False
        time.sleep(0.02)
    return True


def run_one(k, fault, rng, data, ref, work, hang_s):
    """One job with ``fault``; returns its record."""
    out = work / f"job{k:03d}"
    rec = {"job": k, "fault": fault, "hang": False, "lost_checkpoint": False, "wrong_exit": False,
           "continue_differs": False, "detail": ""}

    def finish(job, expect, within=None, t_from=None, one_line=True):
        rc, secs = job.wait(hang_s)
        rec.update(rc=rc, seconds=round(secs, 2))
        if rc is None:
            rec["hang"] = True
            return rc
        ok = rc == expect if isinstance(expect, int) else expect(rc)
        if one_line and rc not in (0, None) and ok and len(job.errors()) != 1:
            ok = False
            rec["detail"] += f"{len(job.errors())} error lines; "
        if within is not None and t_from is not None and job.end - t_from > within:
            ok = False
            rec["detail"] += f"ended {job.end - t_from:.1f} s after the fault; "
        if not ok:
            rec["wrong_exit"] = True
            rec["detail"] += f"rc {rc}: {job.errors()[:2]}; "
        return rc

    def continue_and_compare(folder):
        c = checkpoint_ok(folder)
        rec["checkpoint"] = c
        if c is False:
            rec["lost_checkpoint"] = True
            return
        if c is None:
            return  # killed before the first checkpoint: nothing to continue
        job = Job(["refine3d", "--continue", folder])
        rc, _ = job.wait(hang_s)
        if rc is None:
            rec["hang"] = True
        elif rc != 0:
            rec["continue_differs"] = True
            rec["detail"] += f"--continue rc {rc}: {job.errors()[:1]}; "
        elif not same_result(ref, folder):
            rec["continue_differs"] = True
            rec["detail"] += "--continue result differs; "

    if fault == "none":
        job = Job(refine_args(data, out))
        if finish(job, 0) == 0 and not same_result(ref, out):
            rec["continue_differs"] = True
            rec["detail"] += "uninterrupted result differs; "
    elif fault == "kill":
        sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
        rank = rng.choice([0, 1])
        job = Job(refine_args(data, out))
        when = rng.choice(["start", "iteration 1", "iteration 2"])
        if when == "start":
            wait_until(lambda: len(rank_pids(job.proc.pid)) == 2, job, hang_s)
            time.sleep(rng.uniform(0, 3))
        else:
            wait_until(lambda: iteration_done(out) >= 1, job, hang_s)
            time.sleep(rng.uniform(0, 2) if when == "iteration 2" else 0)
        pids = rank_pids(job.proc.pid)
        rec["detail"] += f"{signal.Signals(sig).name} to rank {rank} at {when}; "
        if rank in pids:
            t = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pids[rank], sig)
            rc = finish(job, lambda rc: rc is not None, within=10.0, t_from=t, one_line=False)
            if rc == 0:
                rec["detail"] += "finished before the signal; "
            continue_and_compare(out)
        else:
            finish(job, 0)
            rec["detail"] += "ended before the signal; "
    elif fault == "disk_full":
        disk = work / f"disk{k:03d}"
        with tmpfs(disk) as ok:
            if not ok:
                rec.update(skipped="cannot mount a tmpfs (not root)")
                return rec
            out = disk / "out"
            when = rng.choice(["start", "iteration 2"])
            filler = fill(disk) if when == "start" else None
            job = Job(refine_args(data, out))
            if when != "start":
                wait_until(lambda: iteration_done(out) >= 1, job, hang_s)
                time.sleep(rng.uniform(0, 2))
                filler = fill(disk)
            rec["detail"] += f"disk full at {when}; "
            rc = finish(job, lambda rc: rc in (0, 3), within=5.0, t_from=None)
            if rc == 3 and job.end - job.first_error() > 5.0:
                rec["wrong_exit"] = True
                rec["detail"] += "ended late after the error; "
            if any("Logging error" in line for _, line in job.lines):
                rec["wrong_exit"] = True
                rec["detail"] += "logging tracebacks; "
            os.remove(filler)
            if rc == 3:
                continue_and_compare(out)
            elif rc == 0 and not same_result(ref, out):
                rec["continue_differs"] = True
    elif fault == "bad_row":
        d = work / f"bad{k:03d}"
        shutil.copytree(data, d, ignore=shutil.ignore_patterns("stacks"))
        os.symlink(data / "stacks", d / "stacks")
        blocks = starfile.read(data / "particles_unaligned.star", always_dict=True)
        row = int(rng.integers(0, N))
        name = blocks["particles"]["rlnImageName"].iloc[row]
        blocks["particles"].loc[blocks["particles"].index[row], "rlnImageName"] = "999999@" + name.split("@", 1)[1]
        starfile.write(blocks, d / "particles_unaligned.star", float_format=None)
        job = Job(refine_args(d, out))
        finish(job, 2)
        if rec["wrong_exit"] is False and not any(f"row {row + 1}" in e for e in job.errors()):
            rec["wrong_exit"] = True
            rec["detail"] += f"the error does not name row {row + 1}; "
    elif fault == "second_job":
        first = Job(refine_args(data, out))
        wait_until(lambda: (out / ".mpi_em.lock").exists() and "pid" in (out / ".mpi_em.lock").read_text(), first,
                   hang_s)
        time.sleep(rng.uniform(0, 3))
        second = Job(refine_args(data, out))
        rc2, _ = second.wait(hang_s)
        rec["second_rc"] = rc2
        if rc2 is None:
            rec["hang"] = True
        elif rc2 != 3 or len(second.errors()) != 1:
            rec["wrong_exit"] = True
            rec["detail"] += f"second job rc {rc2}: {second.errors()[:1]}; "
        if finish(first, 0) == 0 and not same_result(ref, out):
            rec["continue_differs"] = True
            rec["detail"] += "first job's result disturbed; "
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hang-seconds", type=float, default=300.0,
                    help="a job still running after this many seconds counts as a hang (killed)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fault-soak"))
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    random.seed(args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="mpi_em-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    t0 = time.time()
    r = subprocess.run([str(a) for a in [sys.executable, "-m", "mpi_em", "simulate", "--out", data, "--box", BOX,
                                         "--n", N, "--snr", 1.0, "--apix", 4.0, "--seed", 4, "--per-stack", 120,
                                         "--start-lowpass", 32]],
                       capture_output=True,
                       text=True, env=dict(os.environ, MPI_EM_DEVICE="cpu"))
    assert r.returncode == 0, r.stderr
    ref = work / "reference"
    rc, secs = Job(refine_args(data, ref)).wait(args.hang_seconds)
    assert rc == 0, "the uninterrupted reference run failed"
    print(f"reference run: {secs:.1f} s")
    records = []
    for k in range(args.jobs):
        fault = FAULTS[int(rng.integers(0, len(FAULTS)))]
        rec = run_one(k, fault, rng, data, ref, work, args.hang_seconds)
        records.append(rec)
        bad = [x for x in ("hang", "lost_checkpoint", "wrong_exit", "continue_differs") if rec[x]]
        print(f"{k:3d} {fault:10s} rc {rec.get('rc')!s:5s} {rec.get('seconds', 0):6.1f} s "
              f"{'FAIL ' + ','.join(bad) if bad else 'ok'} {rec['detail']}{rec.get('skipped', '')}", flush=True)
    rows = []
    for fault in FAULTS:
        rs = [r for r in records if r["fault"] == fault and "skipped" not in r]
        rows.append({"fault": fault, "jobs": len(rs), "hangs": sum(r["hang"] for r in rs),
                     "lost_checkpoints": sum(r["lost_checkpoint"] for r in rs),
                     "wrong_exits": sum(r["wrong_exit"] for r in rs),
                     "continue_differs": sum(r["continue_differs"] for r in rs),
                     "skipped": sum("skipped" in r for r in records if r["fault"] == fault)})
    total = {k: sum(r[k] for r in rows) for k in ("jobs", "hangs", "lost_checkpoints", "wrong_exits",
                                                   "continue_differs", "skipped")}
    head = f"{'fault':12s} {'jobs':>5s} {'hangs':>6s} {'lost ckpt':>10s} {'wrong exit':>11s} " \
           f"{'continue differs':>17s} {'skipped':>8s}"
    lines = [head] + [f"{r['fault']:12s} {r['jobs']:5d} {r['hangs']:6d} {r['lost_checkpoints']:10d} "
                      f"{r['wrong_exits']:11d} {r['continue_differs']:17d} {r['skipped']:8d}"
                      for r in rows + [dict(total, fault="total")]]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "jobs": args.jobs,
               "seed": args.seed, "date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
               "cpus": os.cpu_count(), "seconds": round(time.time() - t0, 1), "table": rows, "total": total,
               "records": records}
    (args.out / "soak.json").write_text(json.dumps(summary, indent=1, default=str))
    (args.out / "soak.txt").write_text(table + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 1 if any(total[k] for k in ("hangs", "lost_checkpoints", "wrong_exits", "continue_differs")) else 0


if __name__ == "__main__":
    sys.exit(main())
