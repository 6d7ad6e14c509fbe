"""Orientation / translation sampling: HEALPix directions, asymmetric units, local and translation grids."""
import numpy as np
import pytest

from mpi_em.geometry import angular_distance, euler_to_matrix, random_rotations
from mpi_em.sampling import (angular_step, direction_vectors, healpix_directions, local_rotations,
                             orientation_grid, perturb, pix2ang_ring, psi_angles, reduce_to_asymmetric_unit,
                             rotation_vector_to_matrix, rotations_near, translation_grid)
from mpi_em.symmetry import symmetry_matrices


def _nn_angles(v):
    c = np.clip(v @ v.T, -1.0, 1.0)
    np.fill_diagonal(c, -2.0)
    return np.rad2deg(np.arccos(c.max(axis=1)))


def test_angular_step_matches_relion():
    assert [angular_step(k) for k in range(5)] == [60.0, 30.0, 15.0, 7.5, 3.75]


def test_pix2ang_ring_known_values():
    # nside 1: three rings at z = 2/3, 0, -2/3; the outer rings at phi = 45 + 90 j, the equator at 90 j
    theta, phi = pix2ang_ring(1, np.arange(12))
    assert np.allclose(np.cos(theta), np.repeat([2 / 3, 0.0, -2 / 3], 4))
    assert np.allclose(np.rad2deg(phi), [45, 135, 225, 315, 0, 90, 180, 270, 45, 135, 225, 315])
    # nside 2: first pixel is the first of the 4 pixels of ring 1 (z = 1 - 1/12), the last one mirrors it
    theta, phi = pix2ang_ring(2, np.array([0, 47]))
    assert np.allclose(np.cos(theta), [1 - 1 / 12, -1 + 1 / 12])
    assert np.allclose(np.rad2deg(phi), [45.0, 315.0])


@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
def test_healpix_directions(order):
    rot, tilt = healpix_directions(order)
    n = 12 * 4 ** order
    assert rot.shape == tilt.shape == (n,)
    assert (rot >= 0).all() and (rot < 360).all() and (tilt >= 0).all() and (tilt <= 180).all()
    v = direction_vectors(rot, tilt)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0)
    assert len(np.unique(np.round(v, 9), axis=0)) == n            # all distinct
    assert np.abs(v.sum(axis=0)).max() < 1e-10 * n                 # equal area: balanced
    # equal area: z = cos(tilt) is spread uniformly over [-1, 1], so <z^2> ~ 1/3
    assert abs((v[:, 2] ** 2).mean() - 1 / 3) < 0.05
    nn = _nn_angles(v)
    assert abs(nn.mean() - angular_step(order)) < 0.25 * angular_step(order)


def test_psi_angles():
    psi = psi_angles(2)
    assert psi.shape == (24,) and psi[0] == 0 and np.allclose(np.diff(psi), 15.0) and psi[-1] < 360


@pytest.mark.parametrize("sym,order", [("C1", 2), ("C4", 3), ("D7", 3), ("I", 3), ("I", 4), ("O", 3), ("T", 3)])
def test_asymmetric_unit(sym, order):
    rot, tilt = healpix_directions(order)
    L = symmetry_matrices(sym)
    kr, kt = reduce_to_asymmetric_unit(rot, tilt, sym)
    n = rot.size
    assert abs(kr.size - n / len(L)) <= 0.15 * n / len(L)
    # every direction is near an image L v of a kept direction v
    kept = direction_vectors(kr, kt)
    images = np.einsum("gij,nj->gni", L, kept).reshape(-1, 3)
    v = direction_vectors(rot, tilt)
    ang = np.rad2deg(np.arccos(np.clip(v @ images.T, -1, 1).max(axis=1)))
    assert ang.max() <= 1.5 * angular_step(order)
    # and kept directions are pairwise inequivalent (no two in the same orbit, to grid precision)
    if len(L) > 1:
        cross = np.einsum("gij,nj->gni", L, kept)  # (g, k, 3)
        dots = np.einsum("gni,mi->gnm", cross, kept)
        dots[0][np.diag_indices(kept.shape[0])] = -2  # identity image of itself
        assert dots.max() < 1 - 1e-9


def test_asymmetric_unit_c4_is_the_y_wedge():
    """For C4 z is invariant, so the unit is the 90 deg wedge around +y: 45 <= rot < 135 (plus the poles)."""
    rot, tilt = healpix_directions(3)
    kr, kt = reduce_to_asymmetric_unit(rot, tilt, "C4")
    off_axis = (kt > 1e-6) & (kt < 180 - 1e-6)
    assert ((kr[off_axis] >= 45 - 1e-9) & (kr[off_axis] < 135 - 1e-9)).all()


def test_orientation_grid():
    A, rot, tilt, psi = orientation_grid(1, "C2")
    ndir = reduce_to_asymmetric_unit(*healpix_directions(1), "C2")[0].size
    assert A.shape == (ndir * 12, 3, 3) and rot.shape == tilt.shape == psi.shape == (ndir * 12,)
    assert np.allclose(A, euler_to_matrix(rot, tilt, psi))
    assert np.allclose(psi[:12], psi_angles(1)) and np.all(rot[:12] == rot[0])
    # the beam (3rd row) is the grid direction
    assert np.allclose(A[:, 2], direction_vectors(rot, tilt))


def test_local_rotations():
    step = 7.5
    R = local_rotations(step)
    assert R.shape == (27, 3, 3)
    assert np.allclose(R[0], np.eye(3))
    assert np.allclose(np.einsum("kji,kjl->kil", R, R), np.eye(3), atol=1e-12)
    assert np.allclose(np.linalg.det(R), 1.0)
    ang = angular_distance(R, np.broadcast_to(np.eye(3), R.shape))
    assert ang.max() <= step * np.sqrt(3) / 2 + 1e-9
    assert np.isclose(ang.max(), step * np.sqrt(3) / 2)
    d = angular_distance(np.repeat(R, 27, axis=0), np.tile(R, (27, 1, 1))).reshape(27, 27)
    np.fill_diagonal(d, np.inf)
    assert d.min() > 0.95 * step / 2  # distinct, spaced by ~step/2 (rotation vectors do not add exactly)
    # left multiplication by a rotation about z changes psi only
    A = euler_to_matrix(30.0, 50.0, 70.0)
    assert np.allclose(perturb(A, euler_to_matrix(0, 0, 4.0))[0, 0], euler_to_matrix(30.0, 50.0, 74.0))
    assert perturb(np.concatenate([A, A]), R).shape == (2, 27, 3, 3)


def test_local_rotations_cover_coarse_cell(rng):
    """Every pose within step/2 of a coarse pose is within ~step/2 * 0.9 of one of the 27 perturbed poses."""
    step = 10.0
    R = local_rotations(step)
    A = euler_to_matrix(*random_rotations(1, rng))
    Af = perturb(A, R)[0]
    w = rng.normal(size=(200, 3))
    w *= np.deg2rad(step / 2) * rng.uniform(0, 1, (200, 1)) ** (1 / 3) / np.linalg.norm(w, axis=1, keepdims=True)
    targets = rotation_vector_to_matrix(w) @ A
    d = angular_distance(np.repeat(targets, 27, axis=0), np.tile(Af, (200, 1, 1))).reshape(200, 27)
    assert d.min(axis=1).max() < step / 2


def test_rotations_near(rng):
    order = 2
    A_grid = orientation_grid(order)[0]
    centres = np.concatenate([A_grid[[5, 1000]], euler_to_matrix(*random_rotations(3, rng))])
    mask = rotations_near(centres, 20.0, order)
    assert mask.shape == (5, A_grid.shape[0])
    for c in range(5):
        d = angular_distance(np.broadcast_to(centres[c], A_grid.shape), A_grid)
        assert np.array_equal(mask[c], d <= 20.0)
    assert mask[0, 5] and mask[1, 1000]
    assert 0 < mask.sum(axis=1).min()
    # max angle 0 around a grid pose: just that pose
    m0 = rotations_near(A_grid[[7]], 0.0, order)
    assert np.flatnonzero(m0[0]).tolist() == [7]


def test_rotations_near_with_symmetry(rng):
    """A centre given as a symmetry copy A @ L finds the same grid poses as A itself."""
    order, sym = 2, "D2"
    L = symmetry_matrices(sym)
    Ag = orientation_grid(order, sym)[0]
    A = euler_to_matrix(*random_rotations(4, rng))
    m1 = rotations_near(A, 25.0, order, sym)
    m2 = rotations_near(A @ L[3], 25.0, order, sym)
    assert m1.shape == (4, Ag.shape[0]) and np.array_equal(m1, m2)
    for c in range(4):
        d = angular_distance(np.broadcast_to(A[c], Ag.shape), Ag, sym=L)
        assert np.array_equal(m1[c], d <= 25.0)
    # without symmetry the copy A @ L[3] is a different pose with different neighbours
    assert not np.array_equal(rotations_near(A, 25.0, order), rotations_near(A @ L[3], 25.0, order))


def test_translation_grid():
    assert np.array_equal(translation_grid(0, 1), [[0.0, 0.0]])
    t = translation_grid(2, 1)
    assert np.array_equal(t[0], [0, 0])
    assert len(t) == 13 and (np.hypot(t[:, 0], t[:, 1]) <= 2 + 1e-12).all()
    assert len(np.unique(t, axis=0)) == 13
    t = translation_grid(5, 2)  # grid 0, +-2, +-4 in the disc r <= 5
    assert len(t) == 21 and np.array_equal(t[0], [0, 0])
    t = translation_grid(1.5, 1.0)  # 3x3 square: corners at sqrt(2) < 1.5
    assert len(t) == 9


def test_grid_perturbation_changes_by_half_its_range_and_is_seeded():
    """RELION's resetRandomlyPerturbedSampling: p <- p + U(f/2, f), wrapped into [-f, f). Every step moves the
    grid by at least f/2 (mod the wrap), the sequence is the same for the same seed (every rank, resumed runs)
    and different for another seed; factor 0 turns it off."""
    from mpi_em.sampling import next_perturbation

    f = 0.5
    seq, p = [], 0.0
    for it in range(1, 200):
        q = next_perturbation(p, f, seed=3, iteration=it)
        assert -f <= q < f
        step = (q - p) % (2 * f)
        assert 0.5 * f - 1e-12 <= step <= f + 1e-12, (p, q)
        seq.append(q)
        p = q
    assert np.std(seq) > 0.2   # spread over the whole range (uniform on [-0.5, 0.5): std 0.29)
    assert next_perturbation(0.1, f, 3, 7) == next_perturbation(0.1, f, 3, 7)
    assert next_perturbation(0.1, f, 3, 7) != next_perturbation(0.1, f, 4, 7)
    assert next_perturbation(0.3, 0.0, 3, 7) == 0.0


def test_perturbed_2d_grid_adds_the_angle_to_psi():
    from mpi_em.em.references import angles_from_mats, global_grid

    g0 = global_grid(2, 0, "C1", np, psi_step=10.0)
    g1 = global_grid(2, 0, "C1", np, psi_step=10.0, perturb_deg=3.0)
    d = (angles_from_mats(g1, 2)[2] - angles_from_mats(g0, 2)[2]) % 360.0
    np.testing.assert_allclose(d, 3.0, atol=1e-9)


def test_translational_sampling_follows_accuracy_and_changes():
    """RELION's update of the translations with the angular sampling: coarse step 2 x min(1.5, 0.75 accuracy),
    range 5 x the last offset change within [1.5, 4] coarse steps and at most 1.3 x the old range."""
    from mpi_em.sampling import next_translations

    step, rng = next_translations(1.0, 3.0, 0.4, 0.3)                   # coarse 0.6: range 1.5 in [0.9, 2.4]
    assert step == pytest.approx(0.3) and rng == pytest.approx(1.5)
    step, rng = next_translations(1.0, 3.0, 0.4, 0.05)                  # tiny change: at least 1.5 coarse steps
    assert step == pytest.approx(0.3) and rng == pytest.approx(0.9)
    step, rng = next_translations(1.0, 3.0, 0.2, 1.0)                   # 3.9 > 4 x 0.3: halved, still > 1.2
    assert rng == pytest.approx(1.95) and step == pytest.approx(1.95 / 8)
    step, rng = next_translations(1.0, 3.0, 5.0, 2.0)                   # accuracy capped at a 3 px coarse step
    assert step == pytest.approx(1.5) and rng == pytest.approx(4.5)
    # the coarse grid keeps 9 to ~49 translations
    from mpi_em.sampling import translation_grid
    for acc in (0.05, 0.3, 1.0, 3.0):
        for chg in (0.0, 0.2, 1.0, 5.0):
            step, rng = next_translations(1.0, 3.0, acc, chg)
            assert 9 <= len(translation_grid(rng, 2 * step)) <= 49, (acc, chg, step, rng)


def test_laplace_offset_variance_recovers_a_gaussian_width():
    """On the log-density of a Gaussian of standard deviation s, sampled at -h, 0, +h around its mode, the
    curvature gives s^2 back exactly, for a grid step h far coarser than s; a flat or convex profile gives the
    cap."""
    from mpi_em.sampling import laplace_offset_variance

    for s, h in ((0.2, 1.0), (0.5, 1.0), (1.3, 0.5)):
        lp = lambda x: -0.5 * (x / s) ** 2 + 3.0
        v = laplace_offset_variance(np.array([lp(0.0)]), np.array([lp(-h)]), np.array([lp(h)]), h, cap=9.0)
        assert v[0] == pytest.approx(s * s, rel=1e-12)
    v = laplace_offset_variance(np.array([0.0, 0.0]), np.array([0.0, 1.0]), np.array([0.0, 1.0]), 1.0, cap=9.0)
    np.testing.assert_array_equal(v, [9.0, 9.0])
