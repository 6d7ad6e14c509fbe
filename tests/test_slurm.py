"""The Slurm templates on a real one-node Slurm (slurmctld + slurmd + munged started here, as root).

Both templates, adapted to 2 CPU tasks as launch/slurm/README.md says, must start ONE 2-rank MPI job (not two
1-rank jobs writing the same folder); a 2-task step whose MPI does not join its tasks (`srun --mpi=none`, the
default of many sites) must stop with one line naming `srun --mpi=pmi2`. Needs root, Debian's `slurm-wlm` and
`munge` (tests/run.sh installs them where it has root and apt-get) and the venv of the `mpi` extra; skipped
otherwise. The cluster lives in a temporary folder on its own ports and is stopped at the end, also on failure.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "launch" / "slurm"
SBIN = os.pathsep.join(["/usr/sbin", "/sbin", os.environ.get("PATH", "")])
VENV = Path(sys.prefix)
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "sinfo", "squeue", "scancel")


def _missing():
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root to run slurmctld/slurmd/munged"
    gone = [d for d in DAEMONS if shutil.which(d, path=SBIN) is None]
    if gone:
        return f"Slurm/munge not installed ({', '.join(gone)} missing; tests/run.sh installs slurm-wlm munge as root)"
    if not (VENV / "bin" / "activate").exists() or not (VENV / "bin" / "mpi-em").exists():
        return "needs the venv with mpi_em installed (the templates activate it)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, d: Path):
        self.d = d
        self.conf = d / "slurm.conf"
        self.procs = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI", "OMPI_", "SBATCH_"))}
        self.env.update(SLURM_CONF=str(self.conf), PATH=f"{VENV / 'bin'}{os.pathsep}{SBIN}", OMP_NUM_THREADS="1")

    def run(self, *cmd, timeout=60, **kw):
        return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=self.env, timeout=timeout,
                              **kw)

    def daemon(self, name, *args):
        log = open(self.d / f"{name}.out", "w")
        p = subprocess.Popen([shutil.which(name, path=SBIN), *map(str, args)], stdout=log, stderr=subprocess.STDOUT,
                             env=self.env, start_new_session=True)
        log.close()
        self.procs.append(p)
        return p

    def start(self):
        d = self.d
        for sub in ("munge", "state", "spool"):
            (d / sub).mkdir(mode=0o700)
        sock, key = d / "munge" / "sock", d / "munge" / "munge.key"
        r = self.run("mungekey", "-c", "-k", key)
        assert r.returncode == 0, r.stderr
        self.daemon("munged", "-F", "-f", "-S", sock, f"--key-file={key}", f"--log-file={d / 'munged.log'}",
                    f"--pid-file={d / 'munge' / 'pid'}", f"--seed-file={d / 'munge' / 'seed'}")
        node = self.run("slurmd", "-C").stdout.splitlines()[0].split()  # NodeName=host CPUs=... RealMemory=...
        host = node[0].split("=", 1)[1]
        node = [f for f in node if not f.startswith(("NodeName=", "RealMemory="))]
        self.conf.write_text("\n".join([
            "ClusterName=mpiemtest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={sock}",
            f"StateSaveLocation={d / 'state'}", f"SlurmdSpoolDir={d / 'spool'}",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}", f"SlurmdPidFile={d / 'slurmd.pid'}",
            f"SlurmctldLogFile={d / 'slurmctld.log'}", f"SlurmdLogFile={d / 'slurmd.log'}",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "MpiDefault=none",  # the site default of many clusters: srun starts tasks, not an MPI job
            "ReturnToService=2",
            "MinJobAge=6",  # below 3 x 2 s, sbatch --wait polls every 2 s (else after 2, 10, 42, 74 ... s)
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            f"NodeName={host} NodeAddr=127.0.0.1 {' '.join(node)} State=UNKNOWN",
            f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))
        deadline = time.time() + 10
        while not sock.exists() and time.time() < deadline:
            time.sleep(0.1)
        self.daemon("slurmctld", "-D", "-f", self.conf)
        self.daemon("slurmd", "-D", "-f", self.conf)
        deadline, state = time.time() + 60, ""
        while time.time() < deadline:
            state = self.run("sinfo", "-h", "-o", "%t").stdout.strip()
            if state == "idle":
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.5)
        tails = "".join(f"\n--- {f.name}:\n" + "\n".join(f.read_text(errors="replace").splitlines()[-5:])
                        for f in sorted(d.glob("*.log")) + sorted(d.glob("*.out")))
        raise RuntimeError(f"the test node is not idle (sinfo: {state!r}){tails}")

    def stop(self):
        if len(self.procs) == 3 and all(p.poll() is None for p in self.procs):
            self.run("scancel", "--full", "-u", "root", timeout=30)
            deadline = time.time() + 15  # running steps end before their slurmd goes
            while time.time() < deadline and self.run("squeue", "-h", timeout=30).stdout.strip():
                time.sleep(0.5)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _cpu_template(name: str, dest: Path) -> Path:
    """The template with the edits launch/slurm/README.md lists for a CPU-only node of 2 cores: 2 tasks of
    1 core, no GPU line, MPI_EM_DEVICE=cpu. Each edit must apply (a changed template fails here, loudly)."""
    text = (TEMPLATES / name).read_text()
    for old, new in (("#SBATCH --nodes=2\n", "#SBATCH --nodes=1\n"),
                     ("#SBATCH --ntasks-per-node=4\n", "#SBATCH --ntasks-per-node=2\n"),
                     ("#SBATCH --gpus-per-task=1\n", ""),
                     ("#SBATCH --cpus-per-task=8\n", "#SBATCH --cpus-per-task=1\n"),
                     ("# export MPI_EM_DEVICE=cpu", "export MPI_EM_DEVICE=cpu")):
        if old == "#SBATCH --nodes=2\n" and old not in text:
            continue  # reconstruct's template asks for one node already
        assert old in text, f"{name}: {old!r} not found"
        text = text.replace(old, new)
    dest.write_text(text)
    return dest


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory):
    """Both templates submitted at once (`sbatch --wait`; the node runs one after the other), plus a 2-task
    `srun --mpi=none` of a plain reconstruct: {name: (CompletedProcess, work folder)}."""
    d = tmp_path_factory.mktemp("jobs")
    r = cluster.run(sys.executable, "-m", "mpi_em", "--quiet", "simulate", "--out", d / "data", "--box", 32,
                    "--n", 300, "--snr", 1, "--seed", 3)
    assert r.returncode == 0, r.stderr
    (d / "logs").mkdir()
    star = d / "data" / "particles.star"
    exports = f"ALL,MPI_EM_VENV={VENV}"
    cmds = {
        "reconstruct": ["sbatch", "--wait", f"--export={exports},INPUT_STAR={star},OUTPUT_DIR={d / 'rec'}",
                        _cpu_template("reconstruct.sbatch", d / "rec.sbatch")],
        "refine3d": ["sbatch", "--wait",
                     f"--export={exports},INPUT_STAR={d / 'data' / 'particles_unaligned.star'},"
                     f"REFERENCE={d / 'data' / 'truth.mrc'},OUTPUT_DIR={d / 'ref'},"
                     "EXTRA_ARGS=--ini-high 32 --iter 1 --healpix-order 1 --max-order 2",
                     _cpu_template("refine3d.sbatch", d / "ref.sbatch")],
        "tasks": ["srun", "--mpi=none", "-n", "2", "python", "-m", "mpi_em", "reconstruct", "--i", star,
                  "--o", d / "tasks"],
    }
    procs = {k: subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=cluster.env, cwd=d) for k, cmd in cmds.items()}
    out = {}
    for k, p in procs.items():
        try:
            so, se = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            p.kill()
            so, se = p.communicate()
        out[k] = (subprocess.CompletedProcess(cmds[k], p.returncode, so, se), d)
    return out


def _log(d: Path, name: str) -> str:
    logs = sorted((d / "logs").glob(f"mpi-em-{name}-*.out"))
    assert len(logs) == 1, logs
    return logs[0].read_text()


@pytest.mark.slow
def test_reconstruct_template_is_one_two_rank_job(jobs):
    r, d = jobs["reconstruct"]
    log = _log(d, "reconstruct")
    assert r.returncode == 0, (r.stdout, r.stderr, log)
    assert "--mpi=pmi2" in log  # the command line the template printed
    assert log.count("2 rank(s)") == 1 and "1 rank(s)" not in log, log
    assert log.count("inserted 150 / 150 particles on rank 0") == 1, log
    assert log.count("gold-standard resolution") == 1, log
    info = json.loads((d / "rec" / "run.json").read_text())
    assert info["ranks"] == 2 and info["n_particles"] == 300
    truth = mrcfile.read(d / "data" / "truth.mrc").astype(np.float64)
    m = mrcfile.read(d / "rec" / "map.mrc").astype(np.float64)
    assert m.shape == (32, 32, 32) and np.isfinite(m).all()
    assert np.corrcoef(m.ravel(), truth.ravel())[0, 1] > 0.5


@pytest.mark.slow
def test_refine3d_template_is_one_two_rank_job(jobs):
    r, d = jobs["refine3d"]
    log = _log(d, "refine3d")
    assert r.returncode == 0, (r.stdout, r.stderr, log)
    assert log.count("2 rank(s)") == 1 and "1 rank(s)" not in log, log
    assert log.count("refine3d finished") == 1, log
    timings = json.loads((d / "ref" / "run_timings.json").read_text())
    assert [it["ranks"] for it in timings] == [2]
    assert [p["n_particles"] for p in timings[0]["per_rank"]] == [150, 150]
    data = starfile.read(d / "ref" / "run_data.star")
    assert len(data["particles"]) == 300
    m = mrcfile.read(d / "ref" / "run_class001.mrc")
    assert m.shape == (32, 32, 32) and np.isfinite(m).all()


def test_tasks_that_are_not_one_mpi_job_stop_with_one_line(jobs):
    """srun --mpi=none -n 2: two processes, each alone in its MPI world; both exit 2 before writing, and one
    line says what to use."""
    r, d = jobs["tasks"]
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("mpi-em:")]
    assert len(lines) == 1 and "1 of 2 tasks started by srun" in lines[0] and "srun --mpi=pmi2" in lines[0], r.stderr
    assert not (d / "tasks").exists()
