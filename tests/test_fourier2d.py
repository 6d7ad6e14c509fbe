"""2D Fourier-space rotation of references: adjointness, exactness at psi = 0, the rotation convention (same as
the 3D projector), and known-angle reconstruction."""
import numpy as np
import pytest

from mpi_em.backend import to_host
from mpi_em.fourier import SliceGeometry, image_fft, image_ifft, project, volume_fft
from mpi_em.fourier2d import (backproject2d, enforce_hermitian_x0_2d, gridding_factor_2d, plane_fft, plane_ifft,
                              plane_shape, project2d, reconstruct2d, rotation_matrices_2d)
from mpi_em.geometry import euler_to_matrix


def _blobs(box, centres, sigma):
    c = np.arange(box) - box // 2
    y, x = np.meshgrid(c, c, indexing="ij")
    img = np.zeros((box, box))
    for (px, py), a in centres:
        img += a * np.exp(-((x - px) ** 2 + (y - py) ** 2) / (2 * sigma ** 2))
    return img


def test_rotation_matrices_match_euler_psi():
    psi = np.array([0.0, 30.0, -117.0, 250.0])
    R = rotation_matrices_2d(psi)
    assert np.allclose(R, euler_to_matrix(0.0, 0.0, psi)[:, :2, :2])


@pytest.mark.parametrize("mode", ["single", "indexed", "all"])
def test_project_backproject_adjoint(rng, mode, xp):
    """<P v, x> = <v, P^T x> under the real inner product, for random complex v and x."""
    box, K, n = 24, 3, 9
    geom = SliceGeometry(box, xp=xp)
    shape = plane_shape(box) if mode == "single" else (K,) + plane_shape(box)
    v = rng.normal(size=shape) + 1j * rng.normal(size=shape)
    R = xp.asarray(rotation_matrices_2d(rng.uniform(-180, 180, n)))
    pidx = xp.asarray(rng.integers(0, K, n)) if mode == "indexed" else None
    xshape = (K, n, geom.m) if mode == "all" else (n, geom.m)
    x = rng.normal(size=xshape) + 1j * rng.normal(size=xshape)
    Pv = to_host(project2d(xp.asarray(v), R, geom, plane_index=pidx))
    assert Pv.shape == xshape
    lhs = np.real(np.vdot(x, Pv))
    F = xp.zeros(shape, complex)
    W = xp.zeros(shape)
    backproject2d(F, W, R, xp.asarray(x), xp.ones(xshape), geom, plane_index=pidx)
    F, W = to_host(F), to_host(W)
    rhs = np.real(np.vdot(F, v))
    assert abs(lhs - rhs) <= 1e-10 * abs(lhs)
    # the weights go through the same (real) adjoint
    u = rng.normal(size=shape)
    lhs_w = np.sum(to_host(project2d(xp.asarray(u.astype(complex)), R, geom, plane_index=pidx)).real)
    assert abs(lhs_w - np.sum(W * u)) <= 1e-10 * abs(lhs_w)


def test_psi_zero_without_gridding_is_exact(rng):
    box = 32
    img = rng.normal(size=(2, box, box))
    geom = SliceGeometry(box)
    vals = project2d(plane_fft(img, gridding=False), rotation_matrices_2d([0.0]), geom)  # (2, 1, m)
    ref = geom.gather(image_fft(img))
    assert np.abs(vals[:, 0] - ref).max() <= 1e-12 * np.abs(ref).max()
    # plane_ifft inverts the transform; like fourier.volume_ifft, its gridding flag divides by sinc^2 again
    # (it corrects the blur of bilinear insertion), so the exact round trips are these two:
    assert np.allclose(plane_ifft(plane_fft(img, gridding=False), box, gridding=False), img, atol=1e-12)
    assert np.allclose(plane_ifft(plane_fft(img, gridding=True), box, gridding=False) * gridding_factor_2d(box, 2),
                       img, atol=1e-12)


@pytest.mark.parametrize("psi", [30.0, -117.0])
def test_rotation_moves_reference_point_p_to_R_p(psi):
    """A blob at p in the reference appears at R p, R = euler_to_matrix(0, 0, psi)[:2, :2] -- the same image
    point (A p)_xy as the 3D projector gives for a blob at (p, 0) with A = euler_to_matrix(0, 0, psi).
    Measured error of bilinear interpolation of the x2-padded plane: 1.2-1.3% with the sinc^2 pre-correction,
    3.2% without; R^T p would be off by ~140%."""
    box, sigma = 32, 1.5
    p = np.array([5.0, -3.0])
    ref = _blobs(box, [(p, 1.0)], sigma)
    R = rotation_matrices_2d([psi])
    q = R[0] @ p
    geom = SliceGeometry(box)
    out = image_ifft(geom.scatter(project2d(plane_fft(ref), R, geom)), box)[0]
    want = _blobs(box, [(q, 1.0)], sigma)
    assert np.linalg.norm(out - want) <= 0.02 * np.linalg.norm(want)
    raw = image_ifft(geom.scatter(project2d(plane_fft(ref, gridding=False), R, geom)), box)[0]
    assert np.linalg.norm(raw - want) >= 2 * np.linalg.norm(out - want)
    # same place as the 3D projector: blob at (p, 0), A = euler(0, 0, psi), projection along z
    A = euler_to_matrix(0.0, 0.0, psi)
    assert np.allclose(A[0, :2, :2] @ p, q) and abs(A[0, 2, :2] @ p) < 1e-12
    c = np.arange(box) - box // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    vol = np.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + z ** 2) / (2 * sigma ** 2))
    proj = image_ifft(geom.scatter(project(volume_fft(vol), A, geom)), box)[0]
    proj /= np.sqrt(2 * np.pi) * sigma  # the z integral of the 3D Gaussian
    assert np.linalg.norm(proj - out) <= 0.03 * np.linalg.norm(want)


def test_batched_shapes_and_single_precision(rng):
    """R with extra leading axes (classes x psi) and float32 references stay float32 / complex64."""
    box, K = 16, 3
    geom = SliceGeometry(box)
    planes = plane_fft(rng.normal(size=(K, box, box)).astype(np.float32))
    assert planes.dtype == np.complex64 and planes.shape == (K,) + plane_shape(box)
    R = rotation_matrices_2d(rng.uniform(0, 360, 10)).reshape(2, 5, 2, 2)
    allv = project2d(planes, R, geom)
    assert allv.shape == (K, 2, 5, geom.m) and allv.dtype == np.complex64
    pidx = rng.integers(0, K, (2, 5))
    sel = project2d(planes, R, geom, plane_index=pidx)
    assert sel.shape == (2, 5, geom.m)
    assert np.allclose(sel, np.take_along_axis(allv, pidx[None, ..., None], axis=0)[0])
    F = np.zeros((K,) + plane_shape(box), complex)
    W = np.zeros((K,) + plane_shape(box))
    backproject2d(F, W, R, sel, np.float32(1.0), geom, plane_index=pidx)
    F1 = np.zeros((K,) + plane_shape(box), complex)
    backproject2d(F1, None, R.reshape(10, 2, 2), sel.reshape(10, -1), None, geom, plane_index=pidx.ravel())
    assert np.allclose(F, F1) and W.sum() == pytest.approx(10 * geom.m)


def test_enforce_hermitian_x0_2d():
    F = np.zeros(plane_shape(8), complex)
    W = np.zeros(plane_shape(8))
    F[3, 0], W[3, 0] = 1 + 2j, 1.0
    F[-3, 0], W[-3, 0] = 3 - 1j, 2.0
    enforce_hermitian_x0_2d(F, W)
    assert F[3, 0] == (1 + 2j) + (3 + 1j) and F[-3, 0] == np.conj(F[3, 0])
    assert W[3, 0] == W[-3, 0] == 3.0


def test_reconstruct_from_rotated_copies():
    """Noiseless copies rotated by known psi (made in real space), inserted with those angles, give back the
    reference within the band limit."""
    box, sigma = 32, 1.6
    blobs = [((5.0, -3.0), 1.0), ((-4.0, 2.0), 0.7), ((0.0, 6.0), -0.5), ((1.0, 1.0), 0.4)]
    ref = _blobs(box, blobs, sigma)
    geom = SliceGeometry(box)
    psi = np.arange(0.0, 360.0, 7.0) + 1.3
    R = rotation_matrices_2d(psi)
    copies = np.stack([_blobs(box, [(Ri @ np.array(p), a) for p, a in blobs], sigma) for Ri in R])
    data = geom.gather(image_fft(copies))
    F = np.zeros(plane_shape(box), complex)
    W = np.zeros(plane_shape(box))
    backproject2d(F, W, R, data, np.ones(data.shape), geom)
    rec = reconstruct2d(F, W, box, 2, geom.r_max)
    band = image_ifft(geom.scatter(geom.gather(image_fft(ref[None]))), box)[0]
    cc = np.sum(rec * band) / np.sqrt(np.sum(rec ** 2) * np.sum(band ** 2))
    assert cc > 0.99
    assert np.linalg.norm(rec - band) < 0.1 * np.linalg.norm(band)
    # stacked accumulators (two classes, plane_index) and a tau2 prior give the same class images
    F2 = np.zeros((2,) + plane_shape(box), complex)
    W2 = np.zeros((2,) + plane_shape(box))
    cls = np.arange(psi.size) % 2
    backproject2d(F2, W2, R, data, np.ones(data.shape), geom, plane_index=cls)
    rec2 = reconstruct2d(F2, W2, box, 2, geom.r_max, tau2=np.full(box // 2 + 1, 1e6))
    for k in range(2):
        cck = np.sum(rec2[k] * band) / np.sqrt(np.sum(rec2[k] ** 2) * np.sum(band ** 2))
        assert cck > 0.99
