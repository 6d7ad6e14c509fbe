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
    assert main(["warmup", "--large-box", "-1"]) == 1
    assert main(["warmup", "--large-box", "20"]) == 1


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
    # many classes: the fine pass's per-particle reductions have other lengths (CUB block sizes) than the
    # warm-up's K = 3 (a K = 50 class2d compiled a float64 argmax in its first iteration before they were covered)
    run(["class2d", "--i", d / "particles.star", "--K", 50, "--iter", 1, "--o", tmp_path / "c"])
    assert _cache_files(cache) == after_warmup, "kernels compiled after the warm-up"
    # re-seeding (on the GPU rank's device since the draws alone stay on the host), in 2D and 3D
    run(["class2d", "--i", d / "particles.star", "--K", 5, "--iter", 2, "--reseed-below", 0.99, "--o",
         tmp_path / "c2"])
    run(["class3d", "--i", d / "particles.star", "--ref", d / "truth.mrc", "--K", 3, "--iter", 2, "--reseed-below",
         0.99, "--o", tmp_path / "c3"])
    for out in ("c2", "c3"):
        assert "re-seeded" in open(tmp_path / out / "run.log").read(), out
    assert _cache_files(cache) == after_warmup, "kernels compiled after the warm-up"
    # --zero-mask: the particle images' mask (at another box than the warm-up's) and the unmasked images' insertion
    run(["class3d", "--i", d / "particles.star", "--ref", d / "truth.mrc", "--K", 2, "--iter", 2, "--zero-mask",
         "--o", tmp_path / "cz"])
    assert _cache_files(cache) == after_warmup, "kernels compiled after the warm-up"
    # a large box: its full-size iteration's accumulators pass 2^31 bytes (CuPy's 64-bit indexing kernels)
    big = tmp_path / "big"
    run(["simulate", "--out", big, "--box", 256, "--n", 200, "--snr", 0.2, "--seed", 11])
    run(["refine3d", "--i", big / "particles.star", "--ref", big / "truth.mrc", "--ini-high", 30, "--iter", 2,
         "--o", tmp_path / "rb"])
    assert _cache_files(cache) == after_warmup, "kernels compiled after the warm-up"


def test_warmup_reductions_cover_every_cub_block_size():
    """CuPy compiles a CUB reduction along an axis per block size: the power of two at or above a quarter of the
    segment, clamped to 32..512 (cupy/_core/_cub_reduction.pyx, _get_cub_block_specs). The warm-up's segment
    lengths give each of them."""
    from mpi_em.jobs.warmup import REDUCTION_SEGMENTS

    def block(seg):
        b = 1 << max(0, (-(-seg // 4) - 1).bit_length())
        return min(512, max(32, b))

    assert sorted({block(s) for s in REDUCTION_SEGMENTS}) == [32, 64, 128, 256, 512]
    assert block(234) == 64  # the K = 50 class2d's argmax of 9 x 13 x 2 poses
