"""Single-precision accumulators (``--accumulate single``): the M-step's maps and FSC against double-precision ones
on the same insertions, the EM job with either precision, the reconstruction's memory per precision, and the
memory model's choice (box 512 refine3d within 24 GB on one rank only in single precision).

The bound on the maps: every float32 addition into an accumulator voxel rounds the running sum with a relative
error of at most u = 2^-24 ~ 6e-8; over n additions those errors add up like a random walk, so F (and W) hold a
relative L2 error of ~ sqrt(n) u, and the maps, linear in F / W (the complex64 inverse FFT adds ~ u log2(Np) rms,
below that), differ from the double-precision ones by ~ sqrt(n) x 6e-8 relative (L2). On CPU ranks a batch's
insertion is summed in float64 (one bincount) and added to the float32 arrays once: n is the number of batches
that touch a voxel; on GPUs every corner of every point is one float32 atomic addition.
"""
import json
import tracemalloc

import numpy as np
import pytest

from conftest import mpi_em

U32 = 2.0 ** -24  # float32 unit roundoff


def _comm():
    from mpi4py import MPI

    return MPI.COMM_SELF


def _insertions(box=32, n=480, batches=16, seed=5):
    """A smooth random volume projected at random poses, with noise, and CTF-like weights: the (A, vol, data,
    weights) of each batch, the two half sets alternating."""
    from mpi_em.fourier import SliceGeometry, project, volume_fft
    from mpi_em.geometry import euler_to_matrix, random_rotations
    from mpi_em.em.model import lowpass

    rng = np.random.default_rng(seed)
    vol = lowpass(rng.normal(size=(box,) * 3), box, 1.0, 4.0)
    geom = SliceGeometry(box, pad=2)
    A = euler_to_matrix(*random_rotations(n, rng))
    clean = project(volume_fft(vol, 2), A, geom)
    ctf = 0.2 + 0.8 * rng.random((n, geom.m))
    data = ctf * clean + 0.5 * np.abs(clean).mean() * (rng.normal(size=clean.shape) + 1j * rng.normal(size=clean.shape))
    half = np.arange(n) % 2
    per = n // batches
    return geom, [(A[i:i + per], half[i:i + per], (ctf * data)[i:i + per], (ctf * ctf)[i:i + per])
                  for i in range(0, n, per)]


def _m_step(precision, box=32):
    from mpi_em.em.model import e_step_accumulators, reduce_and_reconstruct_3d
    from mpi_em.em.references import insert

    geom, batches = _insertions(box)
    F, W = e_step_accumulators(_comm(), 2, geom.vol_shape, np, precision=precision)
    for A, vol, data, w in batches:
        insert(F, W, 3, A, vol, data, w, geom)
    dtypes = (F.dtype, W.dtype)
    maps, info = reduce_and_reconstruct_3d(_comm(), F, W, box, 2, box / 2 - 1, 1.0, True, combined=True)
    return dtypes, maps, info, len(batches)


def test_single_accumulators_give_the_double_maps_to_float32_rounding():
    """The same 16 batches inserted into complex64 / float32 and into complex128 / float64 accumulators, then the
    gold-standard M-step (FSC, tau^2, regularised half maps, combined map): relative L2 difference of the maps
    <= 10 sqrt(16) u = 2.4e-6 (module docstring: n = 16 float32 additions per voxel on CPU ranks), the FSC curves
    equal to 1e-4, and the single run really single (its dtypes; maps not bit-identical)."""
    d_types, d_maps, d_info, nb = _m_step("double")
    s_types, s_maps, s_info, _ = _m_step("single")
    assert d_types == (np.complex128, np.float64) and s_types == (np.complex64, np.float32)
    bound = 10 * np.sqrt(nb) * U32
    for a, b in ((d_maps, s_maps), (d_info["combined"], s_info["combined"])):
        rel = np.linalg.norm(b.astype(np.float64) - a) / np.linalg.norm(a)
        print("relative L2 difference of the maps", rel, "bound", bound)
        assert 0 < rel <= bound
    np.testing.assert_allclose(s_info["fsc_unregularised"], d_info["fsc_unregularised"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(s_info["tau2"], d_info["tau2"], rtol=1e-4, atol=0)


@pytest.mark.parametrize("precision", ["double", "single"])
def test_reconstruction_bytes_per_voxel_match_the_model(precision):
    """tracemalloc of :func:`mpi_em.fourier.reconstruct` of one padded volume (box 48, with a prior) in the
    accumulators' precision: bytes per voxel (working copy, chunks, the map) within [0.8, 1] of the model's
    constant for that precision (measured 21.3 / 22 and 11.6 / 13)."""
    from mpi_em.fourier import reconstruct
    from mpi_em.memory import RECONSTRUCT_SERIAL_BYTES_PER_VOXEL, RECONSTRUCT_SERIAL_BYTES_PER_VOXEL_SINGLE
    from mpi_em.em.model import ACCUMULATOR_DTYPES

    box = 48
    cdt, rdt = ACCUMULATOR_DTYPES[precision]
    rng = np.random.default_rng(0)
    shape = (2 * box, 2 * box, box + 1)
    F = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(cdt)
    W = (1 + rng.random(shape)).astype(rdt)
    tau2 = np.ones(box // 2 + 1)
    reconstruct(F, W, box, 2, box / 2 - 1, tau2)  # caches (gridding factors) before tracing
    tracemalloc.start()
    vol = reconstruct(F, W, box, 2, box / 2 - 1, tau2)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert vol.dtype == (np.float32 if precision == "single" else np.float64)
    const = RECONSTRUCT_SERIAL_BYTES_PER_VOXEL_SINGLE if precision == "single" else RECONSTRUCT_SERIAL_BYTES_PER_VOXEL
    per = peak / F.size
    print(precision, "bytes per voxel", per, "model", const)
    assert 0.8 * const <= per <= const


# ------------------------------------------------------------------------------ the memory model's choice
def _box512(**kw):
    from mpi_em.memory import EMInputs, _grid_size

    base = dict(mode="refine3d", box=512, pad=2, K=1, folds=1, ranks=1, device="gpu", n_particles=20000)
    if kw.pop("order2", False):
        base.update(coarse_poses=_grid_size(2, "C1"), translations=9, r=28)  # the measured run's global search
    else:
        base.update(coarse_poses=0, r=None)  # local searches at the full image size (upper bound)
    base.update(kw)
    return EMInputs(**base)


@pytest.mark.parametrize("order2", [True, False])
def test_box512_refine3d_fits_24_gb_on_one_rank_only_in_single_precision(order2):
    """Box 512, pad 2, one fold, one rank on a GPU: with --accumulate auto and a 24e9-byte limit (22.3 GiB) the
    model takes single precision (double does not fit with any batch: its references and accumulators alone are
    43 GB) and the batch it chooses; the estimate is <= 24e9 bytes. The single-precision terms: complex64
    references (8 vox bytes each) and accumulators of 12 vox bytes per volume (in the E-step of the order-2 search
    only the cube its image size reaches)."""
    from mpi_em.memory import _adapt_precision, estimate, half_volume, suggestions

    limit = int(24e9)
    inp = _box512(order2=order2)
    vox = half_volume(512, 2)
    got = _adapt_precision(_comm(), inp, limit, None, "auto", "auto")
    est = estimate(got)
    print(got.accumulate, got.batch, est.summary())
    assert got.accumulate == "single" and est.total <= limit
    e = est.phases["E-step"]
    # the order-2 search's E-step at r = 28 px accumulates in the cube it reaches (side 2 x ceil(2 x 28 + 2) + 2)
    side = 2 * 58 + 2 if order2 else None
    assert e["references"] == 2 * 8 * vox
    assert e["accumulators"] == (2 * 12 * side * side * (side // 2 + 1) if order2 else 2 * 12 * vox)
    # one rank: the M-step works on that cube too (each volume put into the full layout for its FFT only)
    assert "hand-over" not in est.phases and est.phases["M-step"]["accumulators"] == e["accumulators"]
    double = _adapt_precision(_comm(), inp, limit, None, "auto", "double")
    assert double.accumulate == "double" and estimate(double).total > limit
    assert estimate(replace_batch(double, 1)).total > limit
    # suggestions name each change that alone would fit: single precision at the order-2 search's batch of 64;
    # not for the full-size local search, whose batch of 64 alone is 10 GB
    assert (suggestions(inp, limit)[0] == "--accumulate single") == order2
    assert ("--accumulate single" in suggestions(inp, limit)) == order2


def replace_batch(inp, b):
    from dataclasses import replace

    return replace(inp, batch=b)


def test_auto_keeps_double_where_it_fits():
    """--accumulate auto: double precision wherever the double-precision job fits (box 512 within an H200's
    139 GiB; box 128 within 24 GB); 'single' forces single."""
    from mpi_em.memory import _adapt_precision

    assert _adapt_precision(_comm(), _box512(), int(139 * 2 ** 30), None, "auto", "auto").accumulate == "double"
    assert _adapt_precision(_comm(), _box512(box=128), int(24e9), None, "auto", "auto").accumulate == "double"
    assert _adapt_precision(_comm(), _box512(box=128), int(24e9), None, "auto", "single").accumulate == "single"
    assert _adapt_precision(_comm(), _box512(box=128), None, None, "auto", "auto").accumulate == "double"


# ------------------------------------------------------------------------------ the job
@pytest.fixture(scope="module")
def data32(tmp_path_factory):
    d = tmp_path_factory.mktemp("prec32")
    r = mpi_em(["simulate", "--out", d, "--box", 32, "--n", 120, "--snr", 1.0, "--apix", 4.0, "--seed", 2], ranks=0)
    assert r.returncode == 0, r.stderr
    return d


def test_refine3d_single_and_double_give_the_same_result(data32, tmp_path):
    """refine3d, one iteration, the same data with --accumulate double and single: the choice is in run.json and
    the log; the poses are the same (the likelihoods, float32 in both, move by ~1e-6 relative with complex64
    references: no pose changes) and the maps equal to float32 rounding (module docstring: 2 batches of 64 per
    half -> 10 sqrt(2) u; bound 10 x that for the E-step's weights)."""
    import mrcfile
    import starfile

    out = {}
    for p in ("double", "single"):
        o = tmp_path / p
        r = mpi_em(["refine3d", "--i", data32 / "particles_unaligned.star", "--ref", data32 / "truth.mrc",
                    "--ini-high", 16, "--healpix-order", 1, "--max-order", 1, "--folds", 1, "--iter", 1,
                    "--accumulate", p, "--o", o], ranks=0)
        assert r.returncode == 0, r.stderr
        assert json.load(open(o / "run.json"))["memory"]["inputs"]["accumulate"] == p
        assert f"{p}-precision accumulators" in open(o / "run.log").read()
        out[p] = (mrcfile.read(o / "run_it001_class001.mrc").astype(np.float64),
                  starfile.read(o / "run_data.star")["particles"])
    (a, pa), (b, pb) = out["double"], out["single"]
    for k in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"):
        np.testing.assert_array_equal(pb[k], pa[k])
    rel = np.linalg.norm(b - a) / np.linalg.norm(a)
    print("relative L2 difference of the maps", rel)
    assert rel <= 100 * np.sqrt(2) * U32


@pytest.mark.parametrize("n", [3000, 20000])
def test_box512_job_as_started_fits_24_gb(n):
    """What the job's check sees before its first iteration (jobs/em.py -> memory.em_inputs): the upper bound of
    an auto-refine, an order-3 global search at the full image size with up to 49 translations, and images cached
    by --cache-images auto. Within 24e9 bytes that needs, besides single precision, the images read from disk
    (2.9-19.5 GiB of cache) and the grid projected in chunks with a smaller batch: the adaptation finds it; with
    --cache-images on (the user's choice, kept) it does not fit."""
    from mpi_em.memory import EMInputs, _adapt_precision, _grid_size, adapt_iteration, estimate

    limit = int(24e9)
    inp = EMInputs(mode="refine3d", box=512, pad=2, K=1, folds=1, ranks=1, device="gpu", n_particles=n,
                   cache_images=True, coarse_poses=_grid_size(3, "C1"), translations=49, batch=64)
    got = _adapt_precision(_comm(), inp, limit, None, "auto", "auto", "auto")
    print(got, estimate(got).summary())
    assert got.accumulate == "single" and not got.cache_images and estimate(got).total <= limit
    assert 0 < got.grid_chunk < inp.coarse_poses and got.batch < inp.batch
    kept = _adapt_precision(_comm(), inp, limit, None, "auto", "auto", "on")
    assert kept.cache_images and estimate(kept).total > limit
    # an early iteration (order 2 at r = 24 px, 9 translations) gets the batch of 64 back, its grid kept whole
    it = adapt_iteration(_comm(), got, limit, 24, _grid_size(2, "C1"), 9, 64)
    assert (it.batch, it.grid_chunk, it.accumulate, it.cache_images) == (64, 0, "single", False)
    assert estimate(it).total <= limit
