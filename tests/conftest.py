import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

BIN = os.path.dirname(sys.executable)
MPIRUN = os.path.join(BIN, "mpirun") if os.path.exists(os.path.join(BIN, "mpirun")) else shutil.which("mpirun")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def _cupy():
    """CuPy when it sees a CUDA device, else None."""
    try:
        import cupy

        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:  # noqa: BLE001 - not installed, no driver, no device
        return None


def require_gpu():
    """CuPy with a CUDA device, or skip the calling test."""
    cp = _cupy()
    if cp is None:
        pytest.skip("needs CuPy and a CUDA device")
    return cp


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    """The array module of a numerical test: NumPy, and CuPy where it sees a GPU (skipped otherwise). The
    same test, assertions on the host (``mpi_em.backend.to_host``), checks both backends."""
    if request.param == "numpy":
        return np
    cp = _cupy()
    if cp is None:
        pytest.skip("needs CuPy and a CUDA device")
    return cp


def mpi_em(args, ranks: int = 1, timeout: float = 300, cwd=None):
    """Run `mpirun -n ranks python -m mpi_em ARGS` (or plain python for ranks=0); never hangs the suite."""
    cmd = [sys.executable, "-m", "mpi_em"] + [str(a) for a in args]
    if ranks >= 1:
        if MPIRUN is None:
            pytest.skip("no mpirun on PATH")
        cmd = [MPIRUN, "-n", str(ranks)] + cmd
    env = dict(os.environ, OMP_NUM_THREADS="1", MPI_EM_DEVICE=os.environ.get("MPI_EM_DEVICE", "cpu"))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """Box 32, 600 particles, SNR 1, CTF, shifts; two stacks (uneven split across ranks)."""
    d = tmp_path_factory.mktemp("small")
    r = mpi_em(["simulate", "--out", d, "--box", 32, "--n", 600, "--snr", 1.0, "--apix", 4.0,
                "--per-stack", 350, "--seed", 5], ranks=0)
    assert r.returncode == 0, r.stderr
    return d
