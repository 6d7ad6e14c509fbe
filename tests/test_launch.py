"""The launch scripts: bash syntax, --help, and the command mpi-em-run would run (--dry-run)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
RUN = LAUNCH / "mpi-em-run"
BIN = os.path.dirname(sys.executable)  # the venv's bin: mpirun (mpich extra) and mpi-em live here

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _env(**extra):
    env = dict(os.environ)
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def _scripts():
    return sorted(p for p in LAUNCH.rglob("*")
                  if p.is_file() and (p.suffix in (".sh", ".sbatch") or p.read_bytes()[:2] == b"#!"))


def test_launch_scripts_found():
    names = {p.relative_to(LAUNCH).as_posix() for p in _scripts()}
    assert {"mpi-em-run", "single-node-gpus", "slurm/reconstruct.sbatch", "slurm/refine3d.sbatch"} <= names


@pytest.mark.parametrize("script", _scripts(), ids=lambda p: p.relative_to(LAUNCH).as_posix())
def test_bash_syntax(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("name", ["mpi-em-run", "single-node-gpus"])
def test_help_exits_zero(name):
    r = subprocess.run([str(LAUNCH / name), "--help"], capture_output=True, text=True, env=_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Usage:" in r.stdout


def test_mpi_em_run_help_documents_options():
    r = subprocess.run([str(RUN), "--help"], capture_output=True, text=True, env=_env(), timeout=60)
    for opt in ("-n", "--gpus-per-node", "--threads", "--dry-run", "--cpu", "--mpirun", "NCCL_NVLS_ENABLE=0"):
        assert opt in r.stdout


def _launcher_available():
    return any(shutil.which(n, path=_env()["PATH"]) for n in ("mpirun", "mpiexec"))


@pytest.mark.skipif(not _launcher_available(), reason="no mpirun/mpiexec")
def test_dry_run_command():
    r = subprocess.run([str(RUN), "--dry-run", "-n", "3", "--", "mpi-em", "reconstruct", "--i", "x.star", "--o", "y"],
                       capture_output=True, text=True, env=_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("+ ")]
    assert len(lines) == 1, r.stdout
    cmd = lines[0]
    assert " -n 3 " in cmd
    assert "mpi-em reconstruct --i x.star --o y" in cmd
    assert "NCCL_NVLS_ENABLE" in cmd and "OMP_NUM_THREADS" in cmd


@pytest.mark.skipif(not _launcher_available(), reason="no mpirun/mpiexec")
def test_dry_run_cpu_threads():
    r = subprocess.run([str(RUN), "--dry-run", "--cpu", "-n", "2", "--threads", "3", "--", "mpi-em", "fsc", "a", "b"],
                       capture_output=True, text=True, env=_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    cmd = [ln for ln in r.stdout.splitlines() if ln.startswith("+ ")][0]
    assert " -n 2 " in cmd and "MPI_EM_DEVICE" in cmd
    assert "OMP_NUM_THREADS 3" in cmd or "OMP_NUM_THREADS=3" in cmd


def test_bad_option_fails():
    r = subprocess.run([str(RUN), "--no-such-option", "--", "mpi-em"], capture_output=True, text=True,
                       env=_env(), timeout=60)
    assert r.returncode == 2
    assert "unknown option" in r.stderr


def test_sbatch_dry_run(tmp_path):
    r = subprocess.run(["bash", str(LAUNCH / "slurm" / "reconstruct.sbatch")], capture_output=True, text=True,
                       cwd=tmp_path, env=_env(DRY_RUN="1", SLURM_CPUS_PER_TASK="4", INPUT_STAR="p.star"), timeout=60)
    assert r.returncode == 0, r.stderr
    assert "+ srun --cpu-bind=cores mpi-em reconstruct --i p.star" in r.stdout
