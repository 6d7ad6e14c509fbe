"""The GPU (CuPy) path gives the CPU (NumPy) result where the GPU has code of its own (fused CUDA kernels, cuFFT,
page-locked reads) or a whole step is compared. Skipped without CuPy. The numerical modules' own tests cover both
backends through the ``xp`` fixture (tests/conftest.py): CTF, projection and insertion adjoints, shifts, the
regularised division."""
import numpy as np
import pytest

cp = pytest.importorskip("cupy")
try:
    if cp.cuda.runtime.getDeviceCount() < 1:
        pytest.skip("no CUDA device", allow_module_level=True)
except Exception:  # pragma: no cover
    pytest.skip("no CUDA device", allow_module_level=True)

from mpi_em.ctf import ctf_images  # noqa: E402
from mpi_em.fourier import SliceGeometry, project, reconstruct  # noqa: E402
from mpi_em.geometry import euler_to_matrix, random_rotations  # noqa: E402
from mpi_em.reconstruction import Accumulators, insert_images  # noqa: E402
from mpi_em.simulate import phantom, simulate_particles  # noqa: E402

pytestmark = pytest.mark.gpu


def test_insert_and_reconstruct_gpu_equals_cpu():
    """Images and their FFTs are float32 (eps 1.2e-7) and pocketfft and cuFFT round differently, so F and the
    map agree to ~1e-7 of their largest value (measured 7.6e-8 on an H100); W is built from float64 CTFs cast
    identically and agrees to float64 rounding of the atomics' order."""
    box, n = 32, 400
    vol = phantom(box, seed=2)
    sim = simulate_particles(vol, n, 3.0, snr=1.0, seed=3, max_shift=2.0)
    ctf = ctf_images(box, 3.0, sim.defocus_u, sim.defocus_v, sim.defocus_angle, 300.0, 2.7, 0.1)
    A = euler_to_matrix(sim.rot, sim.tilt, sim.psi)
    shifts = np.stack([sim.shift_x, sim.shift_y], 1)
    out = []
    for xp in (np, cp):
        acc = Accumulators(SliceGeometry(box, xp=xp))
        insert_images(acc, 0, xp.asarray(sim.images), xp.asarray(A), xp.asarray(ctf), shifts)
        rec = reconstruct(acc.F[0], acc.W[0], box)
        out.append((acc.F[0], acc.W[0], rec))
    Fc, Wc, rc = out[0]
    Fg, Wg, rg = (x.get() for x in out[1])
    np.testing.assert_allclose(Wg, Wc, rtol=0, atol=1e-10 * np.abs(Wc).max())
    np.testing.assert_allclose(Fg, Fc, rtol=0, atol=1e-6 * np.abs(Fc).max())
    np.testing.assert_allclose(rg, rc, rtol=0, atol=1e-6 * np.abs(rc).max())
    # with a prior that is zero beyond shell 8 (FSC <= 0 there): finite and equal on both (complex / inf is NaN
    # on CuPy, which collapsed GPU refinements once), the zeroed shells included
    tau2 = np.where(np.arange(box // 2 + 1) <= 8, 1e3 * np.abs(Wc).max(), 0.0)
    rc2 = reconstruct(Fc, Wc, box, tau2=tau2)
    rg2 = reconstruct(cp.asarray(Fc), cp.asarray(Wc), box, tau2=tau2).get()
    assert np.all(np.isfinite(rg2))
    np.testing.assert_allclose(rg2, rc2, rtol=0, atol=1e-10 * np.abs(rc2).max())


def _stencil_path(monkeypatch):
    monkeypatch.setenv("MPI_EM_FUSED_KERNELS", "0")


@pytest.mark.parametrize("sym_on_device", [False, True])
def test_fused_insertion_equals_cpu_with_volumes_and_symmetry(rng, sym_on_device):
    """The fused CUDA insertion (one thread per image frequency, symmetry copies inside the thread, per-image
    target volume) against the NumPy stencil path: float64 coordinates and accumulation in both, only the order
    of the additions differs -> agreement to float64 rounding (1e-12 of the largest value)."""
    from mpi_em.reconstruction import insert
    from mpi_em.symmetry import symmetry_matrices

    box, n = 32, 300
    geom_c, geom_g = SliceGeometry(box), SliceGeometry(box, xp=cp)
    A = euler_to_matrix(*random_rotations(n, rng))
    data = (rng.normal(size=(n, geom_c.m)) + 1j * rng.normal(size=(n, geom_c.m))).astype(np.complex64)
    w = rng.random((n, geom_c.m)).astype(np.float32)
    vol = rng.integers(0, 3, n)
    sym = symmetry_matrices("D7")
    ac, ag = Accumulators(geom_c, n_vol=3), Accumulators(geom_g, n_vol=3)
    insert(ac, vol, A, data, w, sym)
    insert(ag, vol, cp.asarray(A), cp.asarray(data), cp.asarray(w), cp.asarray(sym) if sym_on_device else sym)
    np.testing.assert_allclose(ag.F.get(), ac.F, rtol=0, atol=1e-12 * np.abs(ac.F).max())
    np.testing.assert_allclose(ag.W.get(), ac.W, rtol=0, atol=1e-12 * np.abs(ac.W).max())


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_fused_projection_equals_cpu_with_volume_index(rng, dtype):
    """Fused slice extraction from a stack of volumes against the CPU path. complex128: both use float64
    coordinates and sums -> 1e-12 of the largest value. complex64: the CPU path rounds the coordinates (|c| < 32
    here) to float32 before taking floor and fraction, the kernel keeps them in float64, so each of the 8
    trilinear weights may differ by up to ulp(32) = 2^-18 (plus float32 sum rounding): bound 8 * 2^-18 * max|V|."""
    box, n = 32, 200
    geom_c, geom_g = SliceGeometry(box), SliceGeometry(box, xp=cp)
    V = (rng.normal(size=(2,) + geom_c.vol_shape) + 1j * rng.normal(size=(2,) + geom_c.vol_shape)).astype(dtype)
    A = euler_to_matrix(*random_rotations(n, rng))
    vi = rng.integers(0, 2, n)
    a = project(V, A, geom_c, vol_index=vi)
    b = project(cp.asarray(V), cp.asarray(A), geom_g, vol_index=cp.asarray(vi)).get()
    atol = 8 * 2.0 ** -18 * np.abs(V).max() if dtype == np.complex64 else 1e-12 * np.abs(a).max()
    np.testing.assert_allclose(b, a, rtol=0, atol=atol)


def test_fused_kernels_up_to_nyquist_equal_cpu(rng):
    """r_max = N/2 (`mpi-em reconstruct`'s default): stencil corners reach the grid's last index, and a point
    exactly on kx = N/2 (identity pose) has a zero-weight corner beyond it, which the kernels drop (its index
    would leave the array) as the NumPy stencil does: insertion and projection agree to float64 rounding, and the
    reconstruction with RELION's soft mask to 1e-10 (cuFFT and pocketfft)."""
    from mpi_em.reconstruction import insert

    box, n = 32, 200
    geom_c, geom_g = SliceGeometry(box, r_max=box // 2), SliceGeometry(box, r_max=box // 2, xp=cp)
    A = euler_to_matrix(*random_rotations(n, rng))
    A[0] = np.eye(3)
    data = rng.normal(size=(n, geom_c.m)) + 1j * rng.normal(size=(n, geom_c.m))
    w = rng.random((n, geom_c.m))
    ac, ag = Accumulators(geom_c), Accumulators(geom_g)
    insert(ac, 0, A, data, w)
    insert(ag, 0, cp.asarray(A), cp.asarray(data), cp.asarray(w))
    np.testing.assert_allclose(ag.F.get(), ac.F, rtol=0, atol=1e-12 * np.abs(ac.F).max())
    np.testing.assert_allclose(ag.W.get(), ac.W, rtol=0, atol=1e-12 * np.abs(ac.W).max())
    a = project(ac.F[0], A, geom_c)
    b = project(ag.F[0], cp.asarray(A), geom_g).get()
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-12 * np.abs(a).max())
    rc = reconstruct(ac.F[0], ac.W[0], box, r_max=box // 2, mask_outside=True)
    rg = reconstruct(ag.F[0], ag.W[0], box, r_max=box // 2, mask_outside=True).get()
    np.testing.assert_allclose(rg, rc, rtol=0, atol=1e-10 * np.abs(rc).max())


def test_fused_and_stencil_gpu_paths_agree(rng, monkeypatch):
    """The two GPU paths (fused kernels, stencil arrays + cupy.add.at) on the same input."""
    box, n = 32, 200
    geom = SliceGeometry(box, xp=cp)
    A = cp.asarray(euler_to_matrix(*random_rotations(n, rng)))
    data = cp.asarray((rng.normal(size=(n, geom.m)) + 1j * rng.normal(size=(n, geom.m))).astype(np.complex64))
    w = cp.asarray(rng.random((n, geom.m)).astype(np.float32))
    from mpi_em.reconstruction import insert

    fused = Accumulators(geom)
    insert(fused, 0, A, data, w)
    _stencil_path(monkeypatch)
    plain = Accumulators(geom)
    insert(plain, 0, A, data, w)
    np.testing.assert_allclose(fused.F.get(), plain.F.get(), rtol=0, atol=1e-12 * float(abs(plain.F).max()))


def _summed_stack(rng, box: int = 32, n: int = 200):
    """(F, W) float64 stacks of two box-32 accumulators, n random back-projections split between them."""
    from mpi_em.fourier import backproject

    geom = SliceGeometry(box)
    F = np.zeros((2,) + geom.vol_shape, dtype=np.complex128)
    W = np.zeros((2,) + geom.vol_shape)
    backproject(F, W, euler_to_matrix(*random_rotations(n, rng)),
                rng.normal(size=(n, geom.m)) + 1j * rng.normal(size=(n, geom.m)), rng.random((n, geom.m)), geom,
                vol_index=rng.integers(0, 2, n))
    return F, W


@pytest.mark.parametrize("fused", [True, False])
def test_symmetrise_gpu_equals_cpu(rng, monkeypatch, fused):
    """Symmetrising a stack of summed accumulators (D7: re-sampled by interpolation) on the GPU, with the fused
    gather kernel and with the array path, against NumPy: the same float64 terms summed in another order ->
    1e-12 of the largest value."""
    from mpi_em.symmetrise import symmetrise
    from mpi_em.symmetry import symmetry_matrices

    F, W = _summed_stack(rng)
    Fg, Wg = cp.asarray(F), cp.asarray(W)
    sym = symmetry_matrices("D7")
    symmetrise(F, W, sym)
    if not fused:
        _stencil_path(monkeypatch)
    symmetrise(Fg, Wg, sym)
    np.testing.assert_allclose(Fg.get(), F, rtol=0, atol=1e-12 * np.abs(F).max())
    np.testing.assert_allclose(Wg.get(), W, rtol=0, atol=1e-12 * np.abs(W).max())


def test_logsumexp_translations_kernel_equals_cpu(rng):
    """The fused marginalisation over translations against the NumPy path on the same float32 input: |L| <= 1e3,
    so float32 rounding of L + prior (6e-5) and of expf/logf bound the difference (4 x 2^-24 x 1e3)."""
    from mpi_em.em.likelihood import marginalise_translations

    L = rng.uniform(-1000, 1000, (7, 13, 300)).astype(np.float32)
    L[0, :, 5] = -np.inf
    prior = rng.uniform(-4, 0, (7, 13)).astype(np.float32)   # per particle: the kernel indexes prior[i, t]
    a = marginalise_translations(L, prior)
    b = marginalise_translations(cp.asarray(L), cp.asarray(prior)).get()
    assert b[0, 5] == -np.inf
    ok = np.isfinite(a)
    np.testing.assert_allclose(b[ok], a[ok], rtol=0, atol=4 * 2.0 ** -24 * 1000)


def test_expectation_batch_gpu_equals_cpu():
    """One E-step batch (global order-1 search, gold-standard halves, CTF) on the GPU and on the CPU: the same
    best poses and translations for every particle (SNR 1: no float32 near-ties), posterior maxima and inserted
    accumulators equal to float32 accuracy of the likelihoods (1e-3 relative)."""
    from mpi_em.em.engine import (SearchSpec, Stats, expectation_batch, inverse_sigma2_points, shell_of_points,
                                  sigma2_from_images)
    from mpi_em.em.references import References, fine_offsets, global_grid
    from mpi_em.reconstruction import centred_points

    box, n = 32, 64
    vol = phantom(box, seed=4).astype(np.float64)
    sim = simulate_particles(vol, n, pixel_size=4.0, snr=1.0, seed=9, max_shift=1.0)
    g0 = SliceGeometry(box, r_max=12)
    s_sum, s_cnt = sigma2_from_images(centred_points(sim.images, None, g0)[0], shell_of_points(g0), box // 2 + 1)
    sigma2 = s_sum / np.maximum(s_cnt, 1)  # the image power spectrum, as a job's first pass
    out = {}
    for xp in (np, cp):
        geom = SliceGeometry(box, r_max=12, xp=xp)
        sh = shell_of_points(geom)
        c = ctf_images(box, 4.0, sim.defocus_u, sim.defocus_v, sim.defocus_angle, 300.0, 2.7, 0.1, xp=xp)
        X, ctf = centred_points(xp.asarray(sim.images), None, geom, c)
        spec = SearchSpec(dim=3, n_classes=1, global_mats=global_grid(3, 1, "C1", xp), local_mats=None,
                          fine_mats=fine_offsets(3, 30.0, xp), offset_range=2.0, offset_step=1.0, offset_sigma=2.0,
                          log_class_prior=xp.zeros(1, dtype=xp.float32))
        refs = References(xp.asarray(np.stack([vol, vol])), 3, 2)
        F = xp.zeros((2,) + geom.vol_shape, dtype=xp.complex128)
        W = xp.zeros((2,) + geom.vol_shape, dtype=xp.float64)
        res = expectation_batch(X, ctf, inverse_sigma2_points(sigma2, sh, xp), sh, refs,
                                xp.asarray(np.arange(n) % 2), None, xp.zeros(n, dtype=xp.int64), spec, geom, F, W,
                                Stats.zeros(box // 2 + 1, 1), box // 2 + 1)
        out[xp.__name__] = (res, F.get() if xp is cp else F)
    (rc, Fc), (rg, Fg) = out["numpy"], out["cupy"]
    np.testing.assert_allclose(rg["mats"], rc["mats"], atol=1e-9)
    np.testing.assert_allclose(rg["shift"], rc["shift"], atol=1e-9)
    np.testing.assert_allclose(rg["pmax"], rc["pmax"], rtol=1e-3, atol=1e-3)
    assert np.abs(Fg - Fc).max() <= 1e-3 * np.abs(Fc).max()


def test_fused_2d_insertion_and_projection_equal_cpu(rng):
    """2D planes (class2d): fused bilinear insertion into a stack with plane_index, and projection from it,
    against the NumPy path (float64 coordinates and accumulation: 1e-12 of the largest value)."""
    from mpi_em.fourier2d import backproject2d, project2d, rotation_matrices_2d

    box, n, K = 32, 300, 3
    geom_c, geom_g = SliceGeometry(box), SliceGeometry(box, xp=cp)
    R = rotation_matrices_2d(rng.uniform(0, 360, n))
    data = rng.normal(size=(n, geom_c.m)) + 1j * rng.normal(size=(n, geom_c.m))
    w = rng.random((n, geom_c.m))
    k = rng.integers(0, K, n)
    shape = (K, 2 * box, box + 1)
    Fc, Wc = np.zeros(shape, np.complex128), np.zeros(shape)
    Fg, Wg = cp.zeros(shape, cp.complex128), cp.zeros(shape, cp.float64)
    backproject2d(Fc, Wc, R, data, w, geom_c, plane_index=k)
    backproject2d(Fg, Wg, cp.asarray(R), cp.asarray(data), cp.asarray(w), geom_g, plane_index=cp.asarray(k))
    np.testing.assert_allclose(Fg.get(), Fc, rtol=0, atol=1e-12 * np.abs(Fc).max())
    np.testing.assert_allclose(Wg.get(), Wc, rtol=0, atol=1e-12 * np.abs(Wc).max())
    a = project2d(Fc, R, geom_c, plane_index=k)
    b = project2d(Fg, cp.asarray(R), geom_g, plane_index=cp.asarray(k)).get()
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-12 * np.abs(a).max())


def test_pinned_batches_equal_pageable(small_dataset):
    """Batches read into page-locked memory (GPU ranks) hold the same images as pageable ones."""
    from mpi_em.distributed import make_plan
    from mpi_em.io import read_particles
    from mpi_em.particles import iter_batches

    plan = make_plan(read_particles(small_dataset / "particles.star"), 1, seed=0)[0]
    a = [imgs.copy() for _, imgs in iter_batches(plan, 128)]
    b = [cp.asarray(imgs).get() for _, imgs in iter_batches(plan, 128, pinned=True)]
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("dim", [3, 2])
def test_fused_single_precision_insertion_equals_double_and_cpu(rng, dim):
    """--accumulate single on the GPU: the fused insertion into complex64 / float32 accumulators (stencil and
    products in double, every corner one float32 atomic addition) against the fused double-precision one and
    the CPU single-precision path (a float64 bincount added once into the float32 arrays). Each voxel receives n
    float32 additions (n = the corners of the inserted points that land on it; its mean over the voxels that
    receive any), each rounding the running sum by at most u = 2^-24; as a random walk the relative L2 error
    of F and W is ~ sqrt(n_mean) u: asserted <= 10 sqrt(n_mean) u, against the double result, and (the CPU path
    rounds once) against the CPU single result."""
    from mpi_em.fourier import backproject
    from mpi_em.fourier2d import backproject2d, rotation_matrices_2d

    box, n, V = 32, 600, 2
    geom_c, geom_g = SliceGeometry(box), SliceGeometry(box, xp=cp)
    if dim == 3:
        R = euler_to_matrix(*random_rotations(n, rng))
        shape = (V,) + geom_c.vol_shape
        ins = lambda F, W, R, d, w, g, v: backproject(F, W, R, d, w, g, vol_index=v)  # noqa: E731
    else:
        R = rotation_matrices_2d(rng.uniform(0, 360, n))
        shape = (V, 2 * box, box + 1)
        ins = lambda F, W, R, d, w, g, v: backproject2d(F, W, R, d, w, g, plane_index=v)  # noqa: E731
    data = rng.normal(size=(n, geom_c.m)) + 1j * rng.normal(size=(n, geom_c.m))
    w = rng.random((n, geom_c.m))
    vi = rng.integers(0, V, n)
    out = {}
    for name, xp, geom, cdt, rdt in (("gpu64", cp, geom_g, np.complex128, np.float64),
                                     ("gpu32", cp, geom_g, np.complex64, np.float32),
                                     ("cpu32", np, geom_c, np.complex64, np.float32)):
        F, W = xp.zeros(shape, cdt), xp.zeros(shape, rdt)
        ins(F, W, xp.asarray(R), xp.asarray(data), xp.asarray(w), geom, xp.asarray(vi))
        out[name] = (cp.asnumpy(F), cp.asnumpy(W)) if xp is cp else (F, W)
    # mean additions per voxel that receives any: every point's corners (8 in 3D, 4 in 2D) over those voxels
    n_mean = n * geom_c.m * (8 if dim == 3 else 4) / np.count_nonzero(out["gpu64"][1])
    bound = 10 * np.sqrt(max(n_mean, 1.0)) * 2.0 ** -24
    F64, W64 = out["gpu64"]
    for name in ("gpu32", "cpu32"):
        F32, W32 = out[name]
        assert F32.dtype == np.complex64 and W32.dtype == np.float32
        for a, b in ((F64, F32), (W64, W32)):
            rel = np.linalg.norm(b.astype(a.dtype) - a) / np.linalg.norm(a)
            assert rel <= bound, (name, rel, bound)
    rel = np.linalg.norm(out["gpu32"][0].astype(np.complex128) - out["cpu32"][0]) / np.linalg.norm(F64)
    assert rel <= bound


def test_fused_single_precision_symmetrise_equals_double(rng):
    """The fused symmetrisation of complex64 / float32 accumulators (interpolated and summed in double, stored in
    single) against the double-precision one: each output voxel is rounded once to float32 (and its inputs were):
    relative L2 <= 10 u."""
    from mpi_em.symmetrise import symmetrise
    from mpi_em.symmetry import symmetry_matrices

    F, W = _summed_stack(rng)
    F32, W32 = cp.asarray(F.astype(np.complex64)), cp.asarray(W.astype(np.float32))
    sym = symmetry_matrices("D7")
    symmetrise(F, W, sym)
    symmetrise(F32, W32, sym)
    assert F32.dtype == cp.complex64 and W32.dtype == cp.float32
    for a, b in ((F, F32.get()), (W, W32.get())):
        assert np.linalg.norm(b - a) / np.linalg.norm(a) <= 10 * 2.0 ** -24


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("cdt", [np.complex128, np.complex64])
def test_distributed_reconstruct_path_on_the_gpu_equals_cpu(rng, cdt, mask):
    """The distributed reconstruction's own path (merge, divide, transpose, row FFTs, gather; on one rank with
    serial_shortcut=False) on CuPy arrays against NumPy, in double and in single precision (single: the same float32
    FFT passes in another library: 1e-5 relative L2; double 1e-10); with ``mask_outside`` the soft mask is applied
    on the device (the host took ~0.5 s per map at box 256)."""
    from mpi4py import MPI

    from mpi_em.distvolume import distributed_reconstruct

    box, pad = 32, 2
    npad = pad * box
    shape = (2, npad, npad, npad // 2 + 1)
    F = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(cdt)
    W = rng.uniform(0.5, 2.0, shape).astype(np.zeros(0, cdt).real.dtype)
    tau2 = rng.uniform(0.5, 2.0, box // 2 + 1)
    a = distributed_reconstruct(MPI.COMM_SELF, F, W, box, pad, tau2=tau2, serial_shortcut=False, mask_outside=mask)
    b = distributed_reconstruct(MPI.COMM_SELF, cp.asarray(F), cp.asarray(W), box, pad, tau2=tau2,
                                serial_shortcut=False, mask_outside=mask).get()
    assert a.dtype == b.dtype == (np.float32 if cdt == np.complex64 else np.float64)
    tol = 1e-5 if cdt == np.complex64 else 1e-10
    assert np.linalg.norm(b - a) / np.linalg.norm(a) <= tol


def test_references_of_some_sets_on_the_gpu_project_as_the_whole_stack():
    """A rank's own reference sets (``References(volumes=...)``) on CuPy: the fused projection of the job's volume
    numbers, given as CuPy or NumPy indices, equals the whole stack's, bit for bit (the same transforms)."""
    from mpi_em.em.references import References

    box = 16
    vols = cp.asarray(np.stack([phantom(box, seed=s) for s in range(4)]).astype(np.float32))
    whole = References(vols, 3, 2)
    some = References(vols[cp.asarray([1, 3])], 3, 2, volumes=[1, 3], n_total=4)
    geom = SliceGeometry(box, pad=2, xp=cp)
    rng = np.random.default_rng(0)
    mats = cp.asarray(euler_to_matrix(rng.uniform(0, 360, 6), rng.uniform(0, 180, 6), rng.uniform(0, 360, 6)))
    vi = np.array([1, 3, 3, 1, 1, 3])
    want = whole.project(mats, cp.asarray(vi), geom)
    assert cp.array_equal(some.project(mats, cp.asarray(vi), geom), want)
    assert cp.array_equal(some.project(mats, vi, geom), want)


def test_phantom_with_the_blur_on_the_gpu_equals_cpu():
    """The phantom's blur FFT on cuFFT (what ``simulate --device gpu`` uses for large boxes) gives the NumPy volume
    to float64 FFT rounding, cast to float32: within one float32 unit of the unit-variance volume."""
    a = phantom(48, seed=2, sym="D7")
    b = phantom(48, seed=2, sym="D7", xp=cp)
    assert isinstance(b, np.ndarray) and b.dtype == np.float32
    assert np.abs(a - b).max() <= 2 * np.finfo(np.float32).eps * np.abs(a).max()


def test_detailed_timer_counts_the_arrays_peak_and_the_pool():
    """MPI_EM_TIMING_DETAIL's memory figures: a 64 MiB array made and dropped inside a phase is in the phase's
    live peak, not in its live bytes at the end; the pool still holds it reserved at the end."""
    from mpi_em.backend import memory_pool
    from mpi_em.timing import PhaseTimer

    timer = PhaseTimer(cp, detail=True)
    memory_pool(cp).free_all_blocks()
    with timer("outer"):
        keep = cp.ones(2 ** 20, dtype=cp.float32)          # 4 MiB kept
        with timer("inner"):
            a = cp.zeros(2 ** 24, dtype=cp.float32)       # 64 MiB dropped
            del a
    d = timer.as_dict()
    assert d["live_peak_bytes"]["inner"] >= 2 ** 26
    assert d["live_peak_bytes"]["outer"] >= 2 ** 26 + 2 ** 22
    assert d["live_end_bytes"]["outer"] - d["live_end_bytes"]["inner"] < 2 ** 26
    assert d["pool_bytes"]["outer"] >= 2 ** 26 + 2 ** 22
    del keep


def test_the_drivers_pool_gives_the_same_reconstruction(tmp_path):
    """MPI_EM_GPU_ALLOCATOR=async (cudaMallocAsync) in a job of its own: the known-pose reconstruction's map equals
    the one from CuPy's pool (the allocator changes where arrays live, not what is computed; the insertion's double
    atomics add in any order, so the float32 maps agree to a float32 unit, not bit for bit)."""
    import os
    import subprocess
    import sys

    import mrcfile

    data = tmp_path / "d"
    subprocess.run([sys.executable, "-m", "mpi_em", "--quiet", "simulate", "--out", str(data), "--box", "32",
                    "--n", "200", "--snr", "1", "--apix", "3", "--seed", "4"], check=True)
    maps = []
    for alloc in ("pool", "async"):
        env = dict(os.environ, MPI_EM_GPU_ALLOCATOR=alloc, MPI_EM_TIMING_DETAIL="1")
        subprocess.run([sys.executable, "-m", "mpi_em", "--quiet", "reconstruct", "--i", str(data / "particles.star"),
                        "--o", str(tmp_path / alloc), "--device", "gpu"], check=True, env=env)
        maps.append(mrcfile.read(str(tmp_path / alloc / "map.mrc")))
    assert np.abs(maps[0] - maps[1]).max() <= 2 * np.finfo(np.float32).eps * np.abs(maps[0]).max()


def test_single_precision_fsc_on_the_gpu_equals_double_on_the_cpu():
    """reconstruct's FSC of the half maps on a GPU rank: complex64 transforms on the device give the float64 CPU
    curve to float32 rounding of the sums (1e-5 asserted)."""
    from mpi_em.fsc import fsc

    a = phantom(64, seed=2)
    rng = np.random.default_rng(1)
    h1 = a + rng.normal(size=a.shape).astype(np.float32)
    h2 = a + rng.normal(size=a.shape).astype(np.float32)
    ref = fsc(h1, h2)
    got = fsc(cp.asarray(h1), cp.asarray(h2), single=True)
    assert np.abs(np.asarray(got) - ref).max() < 1e-5


def test_default_batch_on_a_gpu_rank(small_dataset, tmp_path):
    """refine3d on a GPU rank without --batch takes the GPU default for its box (box 32: 1024, all 600 particles
    in one batch; run.json), and its poses are those of --batch 64 (batches change float summation order only:
    >= 97% identical, as 1 against 2 ranks)."""
    import json
    import os
    import subprocess
    import sys

    import starfile

    from mpi_em.memory import default_batch

    common = [sys.executable, "-m", "mpi_em", "--quiet", "refine3d", "--i",
              str(small_dataset / "particles_unaligned.star"), "--ref", str(small_dataset / "truth.mrc"),
              "--ini-high", "30", "--iter", "2", "--device", "gpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name, extra in (("auto", []), ("b64", ["--batch", "64"])):
        subprocess.run(common + ["--o", str(tmp_path / name)] + extra, check=True, env=env, timeout=600)
    batches = [json.load(open(tmp_path / n / "run.json"))["memory"]["inputs"]["batch"] for n in ("auto", "b64")]
    assert batches == [default_batch(32, "gpu"), 64] and batches[0] == 1024
    a, b = (starfile.read(tmp_path / n / "run_data.star")["particles"] for n in ("auto", "b64"))
    cols = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    same = np.all(np.abs(a[cols].to_numpy() - b[cols].to_numpy()) < 1e-3, axis=1).mean()
    assert same >= 0.97, same


def test_a_memory_limit_takes_the_drivers_allocator(tmp_path):
    """MPI_EM_GPU_ALLOCATOR unset (auto): a job given --max-memory allocates from the driver's stream-ordered pool
    (its reserve follows the live arrays), one without from CuPy's pool; run.json says which; the same map to a
    float32 unit (as test_the_drivers_pool_gives_the_same_reconstruction)."""
    import json
    import os
    import subprocess
    import sys

    import mrcfile

    data = tmp_path / "d"
    subprocess.run([sys.executable, "-m", "mpi_em", "--quiet", "simulate", "--out", str(data), "--box", "32",
                    "--n", "200", "--snr", "1", "--apix", "3", "--seed", "4"], check=True)
    env = {k: v for k, v in os.environ.items() if k != "MPI_EM_GPU_ALLOCATOR"}
    got, maps = [], []
    for name, extra in (("free", []), ("limited", ["--max-memory", "20G"])):
        subprocess.run([sys.executable, "-m", "mpi_em", "--quiet", "reconstruct", "--i", str(data / "particles.star"),
                        "--o", str(tmp_path / name), "--device", "gpu"] + extra, check=True, env=env)
        got.append(json.load(open(tmp_path / name / "run.json"))["memory"]["gpu_allocator"])
        maps.append(mrcfile.read(str(tmp_path / name / "map.mrc")))
    assert got == ["pool", "async"]
    assert np.abs(maps[0] - maps[1]).max() <= 2 * np.finfo(np.float32).eps * np.abs(maps[0]).max()



def test_a_continued_job_keeps_the_drivers_allocator(tmp_path):
    """A class2d given --max-memory, stopped after its first iteration and continued with only --continue,
    allocates from the driver's pool in both parts (run.json says which; the continued box-512 refine3d had
    taken CuPy's pool and peaked at 24.2 GiB, over a 24 GB card)."""
    import json
    import os
    import subprocess
    import sys

    data, out = tmp_path / "d", tmp_path / "c2"
    subprocess.run([sys.executable, "-m", "mpi_em", "--quiet", "simulate", "--out", str(data), "--box", "32",
                    "--n", "200", "--snr", "1", "--apix", "3", "--seed", "4"], check=True)
    env = {k: v for k, v in os.environ.items() if k != "MPI_EM_GPU_ALLOCATOR"}
    got = []
    for args in (["--i", str(data / "particles_unaligned.star"), "--o", str(out), "--K", "2", "--iter", "1",
                  "--max-memory", "20G", "--device", "gpu"], ["--continue", str(out), "--iter", "2"]):
        subprocess.run([sys.executable, "-m", "mpi_em", "--quiet", "class2d"] + args, check=True, env=env)
        got.append(json.load(open(out / "run.json"))["memory"]["gpu_allocator"])
    assert got == ["async", "async"]

def test_fft_plans_kept_between_phases_only_with_room(tmp_path):
    """release_device_memory clears CuPy's cuFFT plan cache unless the job's memory check left room for the plans
    (keep_fft_plans): with room the plans stay (the cache's size is capped at the room), without they go; a
    box-32 refine3d on the GPU logs the kept plans without a limit and not under a limit its peak fills."""
    import json
    import subprocess
    import sys

    from mpi_em.memory import MemoryEstimate, keep_fft_plans, release_device_memory

    cache = cp.fft.config.get_plan_cache()
    est = MemoryEstimate(inputs=None, phases={"E-step": {"accumulators": 2 ** 20, "fft_plans": 2 ** 16}})
    try:
        for limit, kept in ((2 ** 30, True), (2 ** 20 + 2 ** 16, False)):
            cache.clear()
            assert (keep_fft_plans(cp, est, limit) > 0) == kept
            cp.fft.fftn(cp.ones((8, 16, 16), cp.complex64))
            assert cache.get_curr_size() == 1
            release_device_memory(cp)
            assert cache.get_curr_size() == (1 if kept else 0)
    finally:
        keep_fft_plans(cp, None, None)
        cache.set_memsize(-1)
    data = tmp_path / "d"
    subprocess.run([sys.executable, "-m", "mpi_em", "--quiet", "simulate", "--out", str(data), "--box", "32",
                    "--n", "200", "--snr", "1", "--apix", "3", "--seed", "4"], check=True)
    logs = []
    for name in ("free", "limited"):
        # the second job is limited to the first one's peak: no room left
        extra = [] if name == "free" else [
            "--max-memory", str(json.load(open(tmp_path / "free" / "run.json"))["memory"]["peak_bytes"])]
        subprocess.run([sys.executable, "-m", "mpi_em", "refine3d", "--i", str(data / "particles_unaligned.star"),
                        "--ref", str(data / "truth.mrc"), "--ini-high", "30", "--iter", "1", "--o",
                        str(tmp_path / name), "--device", "gpu"] + extra, check=True)
        logs.append(open(tmp_path / name / "run.log").read())
    assert "cuFFT plans kept between phases" in logs[0]
    assert "cuFFT plans kept between phases" not in logs[1]
    # under a limit the job allocates from the driver's pool and synchronises every E-step step (timing.PhaseTimer)
    assert "each E-step step ends with a synchronisation" not in logs[0]
    assert "each E-step step ends with a synchronisation" in logs[1]


def test_nonfinite_maps_found_on_the_device():
    from mpi_em.em.steps import check_finite_maps
    from mpi_em.errors import MpiEmError

    maps = cp.zeros((2, 4, 4, 4), cp.float32)
    check_finite_maps(maps, 3)
    maps[1, 0, 0, 0] = cp.nan
    with pytest.raises(MpiEmError, match="iteration 3: .* 1 NaN or infinite voxels"):
        check_finite_maps(maps, 3)


def test_xp_of_imports_no_scipy():
    """On a machine with CuPy, a CPU rank's array-module switch imports neither cupyx.scipy nor SciPy:
    cupy.get_array_module's first call did (measured 14.6 MB of tracemalloc's peak in the memory tests' CPU jobs
    when the interpreter writes no bytecode), and CuPy arrays still give cupy."""
    import subprocess
    import sys

    code = ("import sys, numpy as np, cupy as cp\nfrom mpi_em.backend import xp_of\n"
            "assert xp_of(np.zeros(3), np.ones(2)) is np\n"
            "assert xp_of(np.zeros(3), cp.zeros(2)) is cp and xp_of(cp.zeros(1)) is cp\n"
            "print(sorted(m for m in sys.modules if m == 'scipy' or m.startswith(('scipy.', 'cupyx.scipy'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


@pytest.mark.parametrize("ndim,width", [(3, 4.0), (3, 0.0), (2, 4.0)])
def test_soft_sphere_gpu_equals_cpu(ndim, width):
    """The references' mask, made on the GPU rank's device each iteration (em.steps.references), equals the CPU
    rank's: the same integer thresholds on exact float32 squared radii, the fall-off in float64 (cos on the device
    and on the host: equal to float32 rounding)."""
    from mpi_em.masks import soft_sphere

    box, radius = 40, 15.3
    host = soft_sphere(box, radius, width=width, ndim=ndim)
    dev = soft_sphere(box, radius, width=width, ndim=ndim, xp=cp)
    assert dev.dtype == host.dtype == np.float32
    assert np.abs(cp.asnumpy(dev) - host).max() <= 1e-7
    assert np.array_equal(cp.asnumpy(dev) == 1.0, host == 1.0) and np.array_equal(cp.asnumpy(dev) == 0, host == 0)


@pytest.mark.parametrize("dim", [2, 3])
def test_reference_power_gpu_equals_cpu(rng, monkeypatch, dim):
    """The classification prior's reference power (em.model.reference_power), binned slab by slab with the sums on
    the references' device, equals the CPU's: the same shells, float64 sums of the same float32 values in another
    order (GPU bincount's atomics), so equal to float64 rounding; several slabs (a small slab size) as in 3D jobs."""
    from mpi_em.em import model

    box, pad, V = 24, 2, 3
    npad = box * pad
    shape = (V,) + (npad,) * (dim - 1) + (npad // 2 + 1,)
    F = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    monkeypatch.setattr(model, "POWER_SLAB_VOXELS", 5 * int(np.prod(shape[2:])))
    host = model.reference_power(F, box, pad, r_max=9.5)
    dev = model.reference_power(cp.asarray(F), box, pad, r_max=9.5)
    assert isinstance(dev, np.ndarray) and dev.shape == host.shape == (V, box // 2 + 1)
    assert (host[:, :9] > 0).all() and (host[:, 11:] == 0).all()
    np.testing.assert_allclose(dev, host, rtol=1e-12, atol=0)


@pytest.mark.parametrize("shape, r", [((50, 64, 64), 12.0), ((4, 48, 48, 48), 9.0)])
def test_reseed_on_the_gpu_equals_cpu(shape, r):
    """Re-seeding with the transforms and the split on the GPU (class2d and class3d on GPU ranks): the noise is
    drawn on the host either way, so the maps are the CPU's to float32 rounding of the split (the noise's scale
    from float64 standard deviations on both), with the same classes re-seeded and the same priors; the maps
    given are left as they were."""
    from mpi_em.em.classes import reseed_classes

    K, box = shape[0], shape[-1]
    maps = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    prior = np.r_[0.5, 0.3, np.full(K - 2, 0.2 / (K - 2))]
    keep = maps.copy()
    cpu = reseed_classes(maps, prior, r, 0.5, seed=2, it=3, box=box, apix=1.5)
    gpu = reseed_classes(maps, prior, r, 0.5, seed=2, it=3, box=box, apix=1.5, xp=cp)
    assert isinstance(gpu[0], np.ndarray) and gpu[0].dtype == np.float32
    assert gpu[2] == cpu[2] == list(range(2, K))
    np.testing.assert_array_equal(gpu[1], cpu[1])
    np.testing.assert_allclose(gpu[0], cpu[0], rtol=0, atol=1e-6 * np.abs(cpu[0]).max())
    assert not np.allclose(gpu[0][2], keep[2]) and np.array_equal(maps, keep)


DEVICE_MAPS_PROBE = """
import json, sys
import mpi_em.cli
from mpi_em.em import steps

seen = []
make = steps.references

def recording(job):
    dev = job.device_maps
    reused = dev is not None and dev[1] is job.state.maps
    refs = make(job)
    job.device_maps = None
    again = make(job)  # the same references from the host maps, uploaded
    seen.append({"reused": bool(reused), "err": float(abs(refs.F - again.F).max() / abs(again.F).max())})
    return refs

steps.references = recording
rc = mpi_em.cli.main(sys.argv[2:])
json.dump({"rc": rc, "seen": seen}, open(sys.argv[1], "w"))
"""


@pytest.mark.parametrize("job, extra, reused", [
    ("class3d", ["--K", "2", "--reseed-below", "0"], [False, True, True]),
    ("class2d", ["--K", "4", "--reseed-below", "0"], [False, False, False])])
def test_references_from_the_m_steps_maps_on_the_device(small_dataset, tmp_path, job, extra, reused):
    """A GPU rank makes the next references from the M-step's maps on its device, not from an upload of the host
    copy, where the state's maps are still that copy (class3d without re-seeding: from the second iteration on);
    not where the host changed them (class2d centres its averages): the references are those made from the host
    maps, bit for bit (the same float32 values on the device)."""
    import json
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(DEVICE_MAPS_PROBE)
    args = [job, "--i", str(small_dataset / "particles_unaligned.star"), "--o", str(tmp_path / job), "--iter", "3",
            "--device", "gpu"] + extra
    if job == "class3d":
        args += ["--ref", str(small_dataset / "truth.mrc"), "--ini-high", "30"]
    subprocess.run([sys.executable, str(script), str(tmp_path / "seen.json")] + args, check=True, timeout=600)
    got = json.load(open(tmp_path / "seen.json"))
    assert got["rc"] == 0
    assert [s["reused"] for s in got["seen"]] == reused, got
    assert max(s["err"] for s in got["seen"]) == 0.0, got


def test_gpu_jobs_write_each_maps_header_statistics(small_dataset, tmp_path):
    """A GPU rank computes its maps' MRC header statistics on the device and the writer uses them instead of
    computing them from the data, only where they belong to the maps written: class3d with re-seeding forced
    (K = 4, --reseed-below 0.99: a class under 24.75% is re-seeded after every M-step, which replaces two maps
    after the statistics were taken) and refine3d (two half maps and the combined map). In every map file the
    header's min and max are the data's, its mean and rms within 1e-5 of the data's (float32 header fields; a
    re-seeded map's statistics differ from its M-step's by ~1e-3)."""
    import glob
    import subprocess
    import sys

    import mrcfile

    common = [sys.executable, "-m", "mpi_em", "--quiet"]
    d = small_dataset
    subprocess.run(common + ["class3d", "--i", str(d / "particles_unaligned.star"), "--ref", str(d / "truth.mrc"),
                             "--ini-high", "30", "--K", "4", "--iter", "3", "--reseed-below", "0.99", "--device", "gpu",
                             "--o", str(tmp_path / "c3")], check=True, timeout=600)
    assert "re-seeded" in open(tmp_path / "c3" / "run.log").read()
    subprocess.run(common + ["refine3d", "--i", str(d / "particles_unaligned.star"), "--ref", str(d / "truth.mrc"),
                             "--ini-high", "30", "--iter", "2", "--device", "gpu", "--o", str(tmp_path / "r3")],
                   check=True, timeout=600)
    files = sorted(glob.glob(str(tmp_path / "c3" / "run_it*_class*.mrc")) +
                   glob.glob(str(tmp_path / "r3" / "run_it*_*.mrc")))
    assert len(files) >= 12 + 4, files
    for f in files:
        with mrcfile.open(f) as m:
            h, v = m.header, m.data
            assert (h.dmin, h.dmax) == (v.min(), v.max()), f
            assert float(h.dmean) == pytest.approx(v.mean(dtype=np.float64), rel=1e-5, abs=1e-6 * v.std()), f
            assert float(h.rms) == pytest.approx(v.std(dtype=np.float64), rel=1e-5), f
