"""`mpi-em warmup`: kernels compiled ahead of the data. On CPU ranks it has nothing to do; on a GPU the kernels it
leaves in the CuPy cache are all a refine3d at another box and particle count needs."""
import os
import subprocess
import sys

import pytest

from conftest import mpi_em, require_gpu


def test_warmup_on_cpu_ranks_does_nothing(tmp_path):
    r = mpi_em(["warmup", "--keep", tmp_path / "w"], ranks=1)
    assert r.returncode == 0, r.stderr
    assert "no GPU on this rank: nothing to compile" in r.stderr
    assert not (tmp_path / "w").exists()


def test_warmup_refuses_too_few_particles_cleanly(tmp_path, monkeypatch):
    from mpi_em.cli import main
    import mpi_em.jobs.warmup as w

    monkeypatch.setattr(w, "_gpu_available", lambda: True)
    assert main(["warmup", "--n", "10"]) == 1


def _cache_files(path):
    return sum(len(f) for _, _, f in os.walk(path))


@pytest.mark.gpu
def test_warmup_leaves_nothing_to_compile(tmp_path):
    require_gpu()
    cache = tmp_path / "cache"
    env = dict(os.environ, CUPY_CACHE_DIR=str(cache), MPI_EM_DEVICE="auto")

    def run(args):
        r = subprocess.run([sys.executable, "-m", "mpi_em"] + [str(a) for a in args], env=env, capture_output=True,
                           text=True, timeout=900)
        assert r.returncode == 0, r.stderr
        return r

    run(["warmup"])
    after_warmup = _cache_files(cache)
    assert after_warmup > 20, after_warmup  # it compiled the jobs' kernels
    d = tmp_path / "d"
    run(["simulate", "--out", d, "--box", 64, "--n", 600, "--snr", 0.2, "--seed", 11])
    run(["refine3d", "--i", d / "particles.star", "--ref", d / "truth.mrc", "--ini-high", 25, "--iter", 4,
         "--max-order", 3, "--local-from-order", 3, "--o", tmp_path / "r"])
    assert _cache_files(cache) == after_warmup, "kernels compiled after the warm-up"
