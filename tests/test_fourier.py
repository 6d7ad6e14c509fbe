"""Image-formation model: adjointness, shifts, central slice, known-pose reconstruction against truth."""
import numpy as np
import pytest

from mpi_em.backend import to_host
from mpi_em.fourier import (SliceGeometry, backproject, enforce_hermitian_x0, image_fft, image_ifft, project,
                            radius_3d, reconstruct, shift_phases, soft_mask_outside, volume_fft)
from mpi_em.fsc import fsc
from mpi_em.symmetrise import symmetrise
from mpi_em.geometry import euler_to_matrix, random_rotations
from mpi_em.reconstruction import Accumulators, insert_images
from mpi_em.simulate import phantom, simulate_particles


@pytest.mark.parametrize("r_max", [None, 12])
def test_project_backproject_adjoint(rng, r_max, xp):
    """<P v, x> = <v, P^T x> under the real inner product, for random complex v and x (float64 rounding); also
    up to Nyquist (r_max = N/2), where stencil corners beyond the grid are dropped by both."""
    box = 24
    geom = SliceGeometry(box, r_max=r_max, xp=xp)
    v = xp.asarray(rng.normal(size=geom.vol_shape) + 1j * rng.normal(size=geom.vol_shape))
    A = xp.asarray(euler_to_matrix(*random_rotations(7, rng)))
    x = xp.asarray(rng.normal(size=(7, geom.m)) + 1j * rng.normal(size=(7, geom.m)))
    lhs = float(xp.real(xp.vdot(x, project(v, A, geom))))
    F = xp.zeros(geom.vol_shape, complex)
    backproject(F, None, A, x, None, geom)
    rhs = float(xp.real(xp.vdot(F, v)))
    # sums of ~1e4 O(1) terms in float64: relative rounding ~1e-13
    assert abs(lhs - rhs) <= 1e-10 * abs(lhs)


def test_shift_moves_image_by_plus_s(rng, xp):
    box = 32
    img = np.zeros((1, box, box))
    img[0, 16, 16] = 1.0
    out = to_host(image_ifft(image_fft(xp.asarray(img)) * shift_phases(box, [[3, -2]], xp=xp, dtype=np.complex128),
                             box))
    assert np.unravel_index(np.argmax(out[0]), out[0].shape) == (14, 19)
    assert out[0, 14, 19] == pytest.approx(1.0, abs=1e-12)


def test_central_slice_identity_pose_is_exact_without_gridding(xp):
    """At the identity pose every sample falls on a grid point: projection = band-limited sum over z."""
    box = 32
    vol = xp.asarray(phantom(box, seed=3).astype(np.float64))
    geom = SliceGeometry(box, xp=xp)
    vals = project(volume_fft(vol, gridding=False), xp.eye(3)[None], geom)
    proj = to_host(image_ifft(geom.scatter(vals), box)[0])
    ref = to_host(image_ifft(geom.scatter(geom.gather(image_fft(vol.sum(axis=0)[None]))), box)[0])
    assert np.abs(proj - ref).max() <= 1e-12 * np.abs(ref).max()


def test_projection_of_gaussian_blob_follows_relion_pose(xp):
    """A blob at p projects to a 2D Gaussian at (A p)_xy: checks the Euler convention and the gridding
    correction for a generic pose. Trilinear interpolation of the x2-padded transform aliases: measured
    0.14% error for a centred blob, 1.2% for this one 6 px off centre (3.6% without the sinc^2 correction),
    so the bound is 2% and the correction must at least halve the error."""
    box, sigma = 32, 1.5
    p = np.array([5.0, -3.0, 2.0])  # (x, y, z) from the centre
    c = np.arange(box) - box // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    vol = np.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / (2 * sigma ** 2))
    A = euler_to_matrix(37.0, 71.0, -123.0)
    q = A[0] @ p
    geom = SliceGeometry(box, xp=xp)
    proj = to_host(image_ifft(geom.scatter(project(volume_fft(xp.asarray(vol)), xp.asarray(A), geom)), box)[0])
    yy, xx = np.meshgrid(c, c, indexing="ij")
    ref = np.sqrt(2 * np.pi) * sigma * np.exp(-((xx - q[0]) ** 2 + (yy - q[1]) ** 2) / (2 * sigma ** 2))
    err = np.linalg.norm(proj - ref) / np.linalg.norm(ref)
    assert err < 0.02, err
    plain = to_host(image_ifft(geom.scatter(project(volume_fft(xp.asarray(vol), gridding=False), xp.asarray(A), geom)),
                               box)[0])
    assert np.linalg.norm(plain - ref) / np.linalg.norm(ref) > 2 * err
    wrong = np.sqrt(2 * np.pi) * sigma * np.exp(-((xx - q[1]) ** 2 + (yy - q[0]) ** 2) / (2 * sigma ** 2))
    assert np.linalg.norm(proj - wrong) / np.linalg.norm(wrong) > 0.5


def test_euler_matrix_is_relion_convention():
    """rot=90 about z: A = Rz(rot) passive -> A @ e_x = (cos, -sin, 0)... checked against RELION's formula."""
    A = euler_to_matrix(90.0, 0.0, 0.0)[0]
    np.testing.assert_allclose(A, [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-15)
    A = euler_to_matrix(0.0, 90.0, 0.0)[0]
    np.testing.assert_allclose(A, [[0, 0, -1], [0, 1, 0], [1, 0, 0]], atol=1e-15)


def _noiseless_reconstruction(box, n, sym, seed, symmetrise_sum=False):
    vol = phantom(box, seed=seed, sym=sym).astype(np.float64)
    sim = simulate_particles(vol, n, pixel_size=2.0, snr=0, seed=seed, max_shift=2.0)
    geom = SliceGeometry(box)
    acc = Accumulators(geom)
    from mpi_em.ctf import ctf_images
    ctf = ctf_images(box, 2.0, sim.defocus_u, sim.defocus_v, sim.defocus_angle, 300.0, 2.7, 0.1)
    mats = None
    if sym != "C1":
        from mpi_em.symmetry import symmetry_matrices
        mats = symmetry_matrices(sym)
    A = euler_to_matrix(sim.rot, sim.tilt, sim.psi)
    for s in range(0, n, 500):
        insert_images(acc, 0, sim.images[s:s + 500], A[s:s + 500], ctf[s:s + 500],
                      np.stack([sim.shift_x, sim.shift_y], 1)[s:s + 500], None if symmetrise_sum else mats)
    if symmetrise_sum:
        symmetrise(acc.F, acc.W, mats)
    rec = reconstruct(acc.F[0], acc.W[0], box)
    return vol, rec


@pytest.mark.parametrize("sym,n", [("C1", 3000), ("D7", 300)])
def test_known_pose_reconstruction_fsc_with_truth(sym, n):
    box = 48
    vol, rec = _noiseless_reconstruction(box, n, sym, seed=11)
    curve = fsc(vol, rec)
    upto = int(0.8 * (box // 2))
    assert curve[1:upto + 1].min() >= 0.9, curve[1:upto + 1]


def test_hermitian_x0_merge_is_symmetric(rng, xp):
    F = xp.asarray(rng.normal(size=(8, 8, 5)) + 1j * rng.normal(size=(8, 8, 5)))
    enforce_hermitian_x0(F)
    F = to_host(F)
    m = (-np.arange(8)) % 8
    np.testing.assert_allclose(F[:, :, 0], np.conj(F[m][:, m, 0]))


def _random_sums(rng, box, n, mats=None, n_vol=1):
    """Accumulators of n random complex slices (random poses, volumes), per-copy insertion with ``mats``."""
    geom = SliceGeometry(box)
    acc = Accumulators(geom, n_vol=n_vol)
    data = rng.normal(size=(n, geom.m)) + 1j * rng.normal(size=(n, geom.m))
    A = euler_to_matrix(*random_rotations(n, rng))
    backproject(acc.F, acc.W, A, data, rng.uniform(0.1, 1, (n, geom.m)), geom,
                vol_index=rng.integers(0, n_vol, n), sym_mats=mats)
    return acc


@pytest.mark.parametrize("sym", ["C4", "D2", "O"])
def test_symmetrise_equals_per_copy_insertion_for_grid_operators(sym):
    """Operators that map the padded grid onto itself (rotations by 90/180 degrees about the axes: C4, D2, and the
    axis-permuting 3-folds of O) move every trilinear stencil onto the rotated stencil with the same weights, so
    symmetrising the sum is per-copy insertion up to float64 rounding (relative 1e-12 allows the accumulation
    order of ~200 terms per voxel and cos(90 deg) = 6e-17 in the matrices)."""
    from mpi_em.symmetry import symmetry_matrices
    mats = symmetry_matrices(sym)
    copies = _random_sums(np.random.default_rng(3), 16, 40, mats, n_vol=2)
    once = _random_sums(np.random.default_rng(3), 16, 40, None, n_vol=2)
    symmetrise(once.F, once.W, mats)
    for a in (copies, once):
        enforce_hermitian_x0(a.F, a.W)  # as reconstruct() does
    np.testing.assert_allclose(once.F, copies.F, rtol=0, atol=1e-12 * np.abs(copies.F).max())
    np.testing.assert_allclose(once.W, copies.W, rtol=0, atol=1e-12 * copies.W.max())


def test_symmetrise_identity_group_changes_nothing(rng):
    acc = _random_sums(rng, 16, 20)
    F, W = acc.F.copy(), acc.W.copy()
    symmetrise(acc.F, acc.W, np.eye(3)[None])
    assert np.array_equal(F, acc.F) and np.array_equal(W, acc.W)


def test_symmetrised_sum_reconstructs_as_well_as_per_copy_insertion():
    """D7 (7-fold operators do not map the grid onto itself: the sum is re-sampled by trilinear interpolation, as
    RELION does): noiseless known-pose reconstruction from 300 particles, the same bar as per-copy insertion
    (FSC with truth >= 0.9 up to 0.8 Nyquist), and the two maps agree to within the interpolation error of
    re-sampling a 2x oversampled grid (FSC between them >= 0.99 up to 0.8 Nyquist)."""
    box = 48
    vol, rec = _noiseless_reconstruction(box, 300, "D7", seed=11, symmetrise_sum=True)
    _, ref = _noiseless_reconstruction(box, 300, "D7", seed=11)
    upto = int(0.8 * (box // 2))
    assert fsc(vol, rec)[1:upto + 1].min() >= 0.9
    assert fsc(ref, rec)[1:upto + 1].min() >= 0.99, fsc(ref, rec)


def test_zero_tau2_shells_come_out_zero(xp):
    """The MAP divisor W + 1/(fudge tau2): a shell whose tau2 is 0 (no signal: gold-standard FSC <= 0) has a
    zero-variance prior, so F / divisor is 0 there (1e-20 of F / W, from a finite divisor: CuPy's complex division
    by infinity is NaN); elsewhere the divisor is W + 1/(fudge tau2) exactly.
    (Taking tau2 = 0 as 'no prior' divided those noise-only shells by W alone and amplified their noise.)"""
    from mpi_em.em.model import tau2_from_fsc
    from mpi_em.fourier import regularised_denominator

    rng = np.random.default_rng(4)
    r = np.arange(8, dtype=np.float64)[None, :].repeat(3, axis=0) + rng.uniform(-0.4, 0.4, (3, 8))
    W = rng.uniform(0.5, 2.0, r.shape)
    F = rng.standard_normal(r.shape) + 1j * rng.standard_normal(r.shape)
    tau2 = tau2_from_fsc(np.array([1.0, 0.9, 0.6, 0.3, 0.1, 0.0, -0.05, -0.2]), np.full(8, 2.0), 1.0)
    assert np.all(tau2[:5] > 0) and np.all(tau2[5:] == 0)
    d_xp = regularised_denominator(xp.asarray(W), xp.asarray(r), 1.0, tau2, tau2_fudge=2.0)
    d = to_host(d_xp)
    sh = np.rint(r).astype(int)
    out = to_host(xp.asarray(F) / d_xp)  # on the device: CuPy's complex division by infinity is NaN
    assert np.all(np.isfinite(d)) and np.all(np.abs(out[sh >= 5]) <= 1e-19 * np.abs(F / W)[sh >= 5])
    ok = sh < 5
    np.testing.assert_allclose(d[ok], W[ok] + 1.0 / (2.0 * tau2[sh[ok]]), rtol=1e-15)


def _larger_grid(geom, extra=4):
    """The same slice geometry on a padded grid ``extra`` voxels larger: no stencil corner leaves it."""
    import copy

    big = copy.copy(geom)
    big.npad = geom.npad + extra
    big.vol_shape = (big.npad, big.npad, big.npad // 2 + 1)
    return big


@pytest.mark.parametrize("pad", [1, 2])
def test_insertion_up_to_nyquist_equals_a_larger_grid(rng, pad):
    """Inserting up to |k| = N/2 (relion_reconstruct's default) reaches the padded grid's last index Np/2 on every
    axis (|pad A^T k| <= Np/2), and a corner one beyond it with weight 0 (a point exactly on Np/2): that corner is
    dropped (its x index would leave the array). Every voxel equals that of a grid 4 voxels larger (float64
    rounding), except the kz and ky = Np/2 planes, where the larger grid keeps +Np/2 and -Np/2 apart (both lie
    outside the ball |q| < Np/2 that the reconstruction keeps)."""
    box = 16
    geom = SliceGeometry(box, r_max=box // 2, pad=pad)
    big = _larger_grid(geom)
    A = euler_to_matrix(*random_rotations(40, rng))
    A[0] = np.eye(3)  # points exactly on kx = N/2: corners at x = Np/2 + 1 with weight 0
    x = rng.normal(size=(40, geom.m)) + 1j * rng.normal(size=(40, geom.m))
    w = rng.uniform(0.1, 1.0, (40, geom.m))
    F, W = np.zeros(geom.vol_shape, complex), np.zeros(geom.vol_shape)
    Fb, Wb = np.zeros(big.vol_shape, complex), np.zeros(big.vol_shape)
    backproject(F, W, A, x, w, geom)
    backproject(Fb, Wb, A, x, w, big)
    npad = geom.npad
    f = np.fft.fftfreq(npad, 1.0 / npad).astype(int)
    sel = np.ix_(f % big.npad, f % big.npad, np.arange(npad // 2 + 1))
    keep = np.ones(geom.vol_shape, bool)
    keep[npad // 2] = keep[:, npad // 2] = False
    np.testing.assert_allclose(F[keep], Fb[sel][keep], rtol=0, atol=1e-12 * np.abs(F).max())
    np.testing.assert_allclose(W[keep], Wb[sel][keep], rtol=0, atol=1e-12 * W.max())
    assert W[..., npad // 2].sum() > 0 and W[npad // 2].sum() > 0  # the grid's edge was reached
    # the projector reads the same stencil: equal slices from a volume with the same values on both grids (the
    # Np/2 index's value at +Np/2 and -Np/2 on the larger one)
    V = rng.normal(size=geom.vol_shape) + 1j * rng.normal(size=geom.vol_shape)
    g = np.arange(-(npad // 2), npad // 2 + 1)
    Vb = np.zeros(big.vol_shape, complex)
    Vb[np.ix_(g % big.npad, g % big.npad, np.arange(npad // 2 + 1))] = V[np.ix_(g % npad, g % npad,
                                                                                 np.arange(npad // 2 + 1))]
    np.testing.assert_allclose(project(V, A, geom), project(Vb, A, big), rtol=0, atol=1e-12)


@pytest.mark.parametrize("ndim,slab", [(3, None), (3, 5), (2, None)])
def test_soft_mask_outside_is_relions(ndim, slab, monkeypatch):
    """RELION's softMaskOutsideMap (radius N/2, 3-px raised cosine): the map is unchanged within N/2 of the
    centre, constant beyond N/2 + 3 (the edge-weighted mean of the voxels beyond N/2), blended in between; on
    volumes and (its 2D class averages) on images, each with its own background; volumes in one slab of z planes
    or in several (``slab`` planes of both volumes: the last slab shorter)."""
    import mpi_em.fourier.division as division

    box = 16
    if slab:
        monkeypatch.setattr(division, "SOFT_MASK_SLAB_VOXELS", 2 * slab * box * box)
    rng = np.random.default_rng(5)
    vol = rng.normal(size=(2,) + (box,) * ndim)
    out = soft_mask_outside(vol, ndim=ndim)
    c = np.arange(box) - box // 2
    r = np.sqrt(sum(np.expand_dims(c, [a for a in range(ndim) if a != d]) ** 2 for d in range(ndim)))
    edge = np.where(r > box / 2 + 3, 1.0, np.where(r < box / 2, 0.0, 0.5 + 0.5 * np.cos(np.pi * (box / 2 + 3 - r) / 3)))
    for v in range(2):  # each volume with its own background
        bg = (edge * vol[v]).sum() / edge.sum()
        np.testing.assert_array_equal(out[v][r <= box / 2], vol[v][r <= box / 2])
        np.testing.assert_allclose(out[v][r > box / 2 + 3], bg, rtol=1e-12)
        np.testing.assert_allclose(out[v], (1 - edge) * vol[v] + edge * bg, rtol=0, atol=1e-12)
    assert np.array_equal(vol, np.random.default_rng(5).normal(size=(2,) + (box,) * ndim))  # input untouched


def test_known_pose_reconstruction_with_the_soft_mask():
    """RELION's soft mask outside the sphere of diameter N (as `mpi-em reconstruct`) on our noise-free projections:
    the map's FSC against the truth >= 0.99 up to 0.9 Nyquist (measured 0.999; 0.988 without the mask, whose box
    corners keep the interpolation aliasing that the gridding correction amplifies)."""
    box, n = 48, 3000
    vol = phantom(box, seed=11).astype(np.float64)
    sim = simulate_particles(vol, n, pixel_size=2.0, snr=0, seed=11, max_shift=2.0)
    from mpi_em.ctf import ctf_images
    ctf = ctf_images(box, 2.0, sim.defocus_u, sim.defocus_v, sim.defocus_angle, 300.0, 2.7, 0.1)
    A = euler_to_matrix(sim.rot, sim.tilt, sim.psi)
    acc = Accumulators(SliceGeometry(box))
    for s in range(0, n, 500):
        insert_images(acc, 0, sim.images[s:s + 500], A[s:s + 500], ctf[s:s + 500],
                      np.stack([sim.shift_x, sim.shift_y], 1)[s:s + 500])
    curve = fsc(vol, reconstruct(acc.F[0], acc.W[0], box, mask_outside=True))
    assert curve[1:int(0.9 * box / 2) + 1].min() >= 0.99, np.round(curve, 3)



@pytest.mark.parametrize("r_max,pad,single", [(4.0, 2, False), (7.5, 2, True), (5.0, 3, False)])
def test_cropped_accumulators_equal_the_full_ones(rng, xp, r_max, pad, single):
    """The E-step's accumulators kept in the cube the current size reaches (side ~2 pad r_max + 6, here 22-40 of
    a 64-96 padded side) hold, once handed over to the full layout, the same sums voxel for voxel as inserting
    into the full layout directly: the same stencil, indices wrapped by the smaller side. Bit for bit on CPU
    (the same additions in the same order); on GPUs to the atomics' order (float64 or float32 rounding)."""
    from mpi_em.em.model import ACCUMULATOR_DTYPES, CroppedAccumulators, crop_side

    box, n, V = 32, 40, 2
    geom = SliceGeometry(box, r_max=r_max, pad=pad, xp=xp)
    side = crop_side(geom)
    assert side is not None and side < geom.npad and side % 2 == 0
    A = xp.asarray(euler_to_matrix(*random_rotations(n, rng)))
    data = xp.asarray(rng.normal(size=(n, geom.m)) + 1j * rng.normal(size=(n, geom.m)))
    w = xp.asarray(rng.uniform(0.1, 1.0, (n, geom.m)))
    vi = xp.asarray(rng.integers(0, V, n))
    cdt, rdt = ACCUMULATOR_DTYPES["single" if single else "double"]
    F = xp.zeros((V,) + geom.vol_shape, dtype=cdt)
    W = xp.zeros(F.shape, dtype=rdt)
    backproject(F, W, A, data, w, geom, vol_index=vi)
    crop = CroppedAccumulators(V, geom, side, xp, cdt, rdt)
    assert crop.nbytes < 0.5 * (F.nbytes + W.nbytes)
    crop.insert(vi, A, data, w, geom)
    Fc, Wc = crop.full()
    assert Fc.dtype == F.dtype and Wc.dtype == W.dtype and Fc.shape == F.shape
    if xp is np:
        assert np.array_equal(Fc, F) and np.array_equal(Wc, W)
    else:
        tol = 1e-5 if single else 1e-12
        assert float(abs(Fc - F).max()) <= tol * float(abs(F).max())
        assert float(abs(Wc - W).max()) <= tol * float(abs(W).max())
    assert crop.F is None and crop.W is None  # released


def test_no_crop_where_the_cube_is_most_of_the_volume():
    """Near Nyquist the cube would hold more than half the volume's voxels: the full layout is used."""
    from mpi_em.em.model import crop_side

    assert crop_side(SliceGeometry(32, r_max=15, pad=2)) is None
    assert crop_side(SliceGeometry(32, r_max=8, pad=2)) == 2 * 18 + 2


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_centred_layout_projects_as_the_fft_layout(dtype):
    """CPU ranks project from :class:`CentredVolumes` (the E-step's references): the same values as
    :func:`project` of the FFT-layout stack, to the precision's rounding (other summation order), for rotations
    sampling every volume of a stack, out to the padded grid's edge (r_max = box / 2: points whose corners lie
    beyond Np / 2, which both give weight 0), Friedel mates included; the projections' shape follows the
    rotations' leading axes."""
    from mpi_em.fourier.projector import CentredVolumes

    rng = np.random.default_rng(3)
    box, pad = 16, 2
    npad = pad * box
    geom = SliceGeometry(box, r_max=box / 2, pad=pad)
    F = (rng.normal(size=(3, npad, npad, npad // 2 + 1))
         + 1j * rng.normal(size=(3, npad, npad, npad // 2 + 1))).astype(dtype)
    A = euler_to_matrix(*random_rotations(40, rng)).reshape(4, 10, 3, 3)
    vol = rng.integers(0, 3, size=(4, 10))
    got = CentredVolumes(F).project(A, geom, vol_index=vol)
    want = project(F, A, geom, vol_index=vol)
    assert got.shape == want.shape == (4, 10, geom.m) and got.dtype == F.dtype
    eps = np.finfo(F.real.dtype).eps
    assert np.abs(got - want).max() <= 16 * eps * np.abs(F).max(), np.abs(got - want).max()


def test_centred_layout_within_the_reach_projects_the_same_samples():
    """CentredVolumes(F, reach): only the frequencies within the padded reach of r_max re-laid (the references of
    a job whose E-step projects at r_max): the same projections bit for bit as the whole layout's, from a copy a
    fraction of its size; a projection at a larger r_max than the reach allows is refused, not sampled from the
    zeros past the copy."""
    from mpi_em.fourier import padded_reach
    from mpi_em.fourier.projector import CentredVolumes

    rng = np.random.default_rng(4)
    box, pad, r_max = 32, 2, 6.0
    npad = pad * box
    shape = (2, npad, npad, npad // 2 + 1)
    F = rng.normal(size=shape) + 1j * rng.normal(size=shape)
    A = euler_to_matrix(*random_rotations(30, rng))
    vol = rng.integers(0, 2, size=30)
    geom = SliceGeometry(box, r_max=r_max, pad=pad)
    whole, part = CentredVolumes(F), CentredVolumes(F, reach=padded_reach(r_max, pad))
    assert part.C.size * 10 < whole.C.size
    np.testing.assert_array_equal(part.project(A, geom, vol_index=vol), whole.project(A, geom, vol_index=vol))
    with pytest.raises(ValueError, match="past the re-laid reach"):
        part.project(A, SliceGeometry(box, r_max=r_max + 2, pad=pad), vol_index=vol)


def test_division_skips_the_kz_planes_past_the_ball(monkeypatch):
    """divide_in_ball goes by chunks of kz planes and leaves out (zeroes) those whose planes all lie past r_max +
    1/2: the same map as in one chunk, where nothing is left out (float64 sums of the mean weight in another order:
    1e-12), zero outside the ball; chunks are skipped at this size (a wrong skip would zero a part of the ball)."""
    import mpi_em.fourier.division as division
    from mpi_em.fourier import radius_3d

    box, pad, r_max = 32, 2, 6.0
    npad = pad * box
    rng = np.random.default_rng(7)
    shape = (npad, npad, npad // 2 + 1)  # one volume, as reconstruct() divides them
    F = rng.normal(size=shape) + 1j * rng.normal(size=shape)
    W = rng.uniform(0.5, 2.0, shape)
    assert division.RECONSTRUCT_CHUNKS >= 4  # chunks of at most npad / 4 planes: those past |kz| = 13 are skipped
    got = division.divide_in_ball(F, W, box, 3, pad, r_max)
    monkeypatch.setattr(division, "RECONSTRUCT_CHUNKS", 1)
    whole = division.divide_in_ball(F, W, box, 3, pad, r_max)
    np.testing.assert_allclose(got, whole, rtol=1e-12, atol=0)
    outside = radius_3d(npad) / pad > r_max + 0.5
    assert not got[outside].any() and np.abs(got[~outside]).min() > 0
