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


@pytest.mark.skipif(not _launcher_available(), reason="no mpirun/mpiexec")
def test_dry_run_on_a_gpu_node_starts_ranks_through_gpu_bind(tmp_path):
    """With GPUs seen (a stand-in nvidia-smi listing two), every rank starts through launch/gpu-bind, one rank per
    GPU and half the cores each; --no-gpu-bind starts them directly."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: H200 (UUID: a)'\necho 'GPU 1: H200 (UUID: b)'\n")
    fake.chmod(0o755)
    env = _env()
    env["PATH"] = f"{tmp_path}{os.pathsep}{env['PATH']}"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    for extra, bound in (([], True), (["--no-gpu-bind"], False)):
        r = subprocess.run([str(RUN), "--dry-run", *extra, "--", "mpi-em", "refine3d", "--i", "x.star"],
                           capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        cmd = [ln for ln in r.stdout.splitlines() if ln.startswith("+ ")][0]
        assert " -n 2 " in cmd
        assert ("gpu-bind mpi-em refine3d" in cmd) == bound, cmd


@pytest.mark.parametrize("env_rank", ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"])
def test_gpu_bind_gives_each_local_rank_its_gpu(env_rank):
    """gpu-bind: CUDA_VISIBLE_DEVICES becomes the visible list's entry (local rank mod its length); without a
    local rank the command runs with the environment unchanged."""
    show = ["bash", "-c", 'echo "[${CUDA_VISIBLE_DEVICES-unset}]"']
    for rank, want in (("0", "[4]"), ("1", "[6]"), ("2", "[4]")):
        r = subprocess.run([str(LAUNCH / "gpu-bind"), *show], capture_output=True, text=True, timeout=60,
                           env=_env(**{env_rank: rank, "CUDA_VISIBLE_DEVICES": "4,6"}))
        assert r.returncode == 0 and r.stdout.strip() == want, (rank, r.stdout, r.stderr)
    env = {k: v for k, v in _env(CUDA_VISIBLE_DEVICES="4,6").items()
           if k not in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMIX_LOCAL_RANK", "PMI_LOCAL_RANK",
                        "SLURM_LOCALID")}
    r = subprocess.run([str(LAUNCH / "gpu-bind"), *show], capture_output=True, text=True, env=env, timeout=60)
    assert r.stdout.strip() == "[4,6]"


def test_bad_option_fails():
    r = subprocess.run([str(RUN), "--no-such-option", "--", "mpi-em"], capture_output=True, text=True,
                       env=_env(), timeout=60)
    assert r.returncode == 2
    assert "unknown option" in r.stderr


def test_sbatch_dry_run(tmp_path):
    r = subprocess.run(["bash", str(LAUNCH / "slurm" / "reconstruct.sbatch")], capture_output=True, text=True,
                       cwd=tmp_path, env=_env(DRY_RUN="1", SLURM_CPUS_PER_TASK="4", INPUT_STAR="p.star"), timeout=60)
    assert r.returncode == 0, r.stderr
    assert "+ srun --cpu-bind=cores --mpi=pmi2 mpi-em reconstruct --i p.star" in r.stdout  # PMI-2: MPICH's
    for srun_mpi, want in (("pmix", "--mpi=pmix mpi-em"), ("default", "--cpu-bind=cores mpi-em")):
        r = subprocess.run(["bash", str(LAUNCH / "slurm" / "refine3d.sbatch")], capture_output=True, text=True,
                           cwd=tmp_path, env=_env(DRY_RUN="1", SRUN_MPI=srun_mpi), timeout=60)
        assert r.returncode == 0 and want in r.stdout, (r.stdout, r.stderr)


# ------------------------------------------------------------------ several tasks that are not one MPI job
LAUNCH_VARS = ("SLURM_", "PMI_", "PMIX_", "OMPI_", "MPI_LOCAL")


def _clean_env(**extra):
    env = {k: v for k, v in _env().items() if not k.startswith(LAUNCH_VARS)}
    env.update(OMP_NUM_THREADS="1", MPI_EM_DEVICE="cpu", **extra)
    return env


def test_launch_mismatch_reads_the_launchers_task_count():
    from mpi_em.distributed import launch_mismatch, launcher_rank

    batch = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_NPROCS": "2", "SLURM_PROCID": "0"}
    assert launch_mismatch(1, batch) is None          # sbatch's script itself: no step, one process
    assert launch_mismatch(1, {}) is None
    step = dict(batch, SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="2", SLURM_PROCID="1")
    msg = launch_mismatch(1, step)
    assert "1 of 2 tasks started by srun" in msg and "srun --mpi=pmi2" in msg and "pmix" in msg
    assert launch_mismatch(2, step) is None           # one 2-rank job: as meant
    assert launch_mismatch(1, dict(step, SLURM_STEP_NUM_TASKS="1")) is None
    assert "srun --mpi=pmix" in launch_mismatch(1, dict(step, PMI_SIZE="2", PMI_RANK="1"))
    assert "mpirun of the MPI" in launch_mismatch(1, {"PMI_SIZE": "4", "PMI_RANK": "3"})
    assert "Open MPI" in launch_mismatch(1, {"OMPI_COMM_WORLD_SIZE": "2"})
    assert launch_mismatch(1, {"PMI_SIZE": "1", "OMPI_COMM_WORLD_SIZE": "x"}) is None
    assert launcher_rank(step) == 1 and launcher_rank(dict(step, PMI_RANK="0")) == 0 and launcher_rank({}) == 0


@pytest.mark.parametrize("procid, printed", [("0", True), ("1", False)])
def test_one_of_several_srun_tasks_alone_in_mpi_stops(tmp_path, procid, printed):
    """A 1-rank process whose environment says it is task PROCID of a 2-task srun step (srun --mpi=none) exits 2
    before writing anything; task 0 says how to fix it in one line, the others stay quiet."""
    env = _clean_env(SLURM_JOB_ID="7", SLURM_NTASKS="2", SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="2",
                     SLURM_PROCID=procid)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "mpi_em", "simulate", "--out", str(out), "--box", "16", "--n", "4"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    if printed:
        assert len(lines) == 1 and lines[0].startswith("mpi-em: error: ") and "srun --mpi=pmi2" in lines[0], lines
    else:
        assert lines == []
    assert not out.exists()


def test_sbatch_script_environment_is_not_a_mismatch(tmp_path):
    """sbatch sets SLURM_NTASKS for the batch script too: a plain 1-rank `mpi-em` there runs (here: up to the
    missing input)."""
    env = _clean_env(SLURM_JOB_ID="7", SLURM_NTASKS="2", SLURM_NPROCS="2", SLURM_PROCID="0")
    r = subprocess.run([sys.executable, "-m", "mpi_em", "fsc", str(tmp_path / "a.mrc"), str(tmp_path / "b.mrc")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert "a.mrc" in r.stderr and "tasks" not in r.stderr
