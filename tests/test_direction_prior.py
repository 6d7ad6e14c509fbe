"""class3d's prior per class and projection direction (``--direction-prior``, RELION's pdf_direction): the E-step's
weights summed per class and direction of the global grid, the prior acting per direction, and its update and
re-seeding in the model."""
import numpy as np

from mpi_em.backend import to_host
from mpi_em.ctf import ctf_images
from mpi_em.em.classes import reseeded_direction_prior
from mpi_em.em.engine import SearchSpec, Stats, expectation_batch, inverse_sigma2_points, shell_of_points, \
    sigma2_from_images
from mpi_em.em.references import References, fine_offsets, global_grid
from mpi_em.fourier import SliceGeometry
from mpi_em.reconstruction import centred_points
from mpi_em.sampling import direction_vectors, healpix_directions, psi_angles
from mpi_em.simulate import phantom, simulate_particles

BOX, N, ORDER = 24, 40, 1


def _batch(xp, K, direction_log_prior, seed=9):
    """One E-step batch of N particles of phantom 4 (SNR 1) against K references (phantom 4, then 5, ...) on the
    order-1 grid -> (result, stats, D)."""
    vols = np.stack([phantom(BOX, seed=4 + k) for k in range(K)]).astype(np.float64)
    sim = simulate_particles(vols[0], N, pixel_size=5.0, snr=1.0, seed=seed, max_shift=1.0)
    g0 = SliceGeometry(BOX, r_max=9)
    s_sum, s_cnt = sigma2_from_images(centred_points(sim.images, None, g0)[0], shell_of_points(g0), BOX // 2 + 1)
    geom = SliceGeometry(BOX, r_max=9, xp=xp)
    sh = shell_of_points(geom)
    c = ctf_images(BOX, 5.0, sim.defocus_u, sim.defocus_v, sim.defocus_angle, 300.0, 2.7, 0.1, xp=xp)
    X, ctf = centred_points(xp.asarray(sim.images), None, geom, c)
    grid = global_grid(3, ORDER, "C1", xp)
    n_psi = len(psi_angles(ORDER))
    D = grid.shape[0] // n_psi
    spec = SearchSpec(dim=3, n_classes=K, global_mats=grid, local_mats=None, fine_mats=fine_offsets(3, 30.0, xp),
                      offset_range=2.0, offset_step=1.0, offset_sigma=2.0,
                      log_class_prior=xp.full(K, np.log(1.0 / K), dtype=xp.float32),
                      direction_log_prior=None if direction_log_prior is None else xp.asarray(direction_log_prior),
                      n_psi=n_psi)
    F = xp.zeros((K,) + geom.vol_shape, dtype=xp.complex128)
    W = xp.zeros((K,) + geom.vol_shape, dtype=xp.float64)
    stats = Stats.zeros(BOX // 2 + 1, K, D)
    res = expectation_batch(X, ctf, inverse_sigma2_points(s_sum / np.maximum(s_cnt, 1), sh, xp), sh,
                            References(xp.asarray(vols), 3, 2), xp.zeros(N, dtype=xp.int64), None,
                            xp.zeros(N, dtype=xp.int64), spec, geom, F, W, stats, BOX // 2 + 1)
    return res, stats, D


def _upper(D):
    """The order-1 grid's directions pointing up (z > 0.1), as a bool mask (D,)."""
    rot, tilt = healpix_directions(ORDER)
    assert rot.size == D
    return direction_vectors(rot, tilt, np)[:, 2] > 0.1


def test_direction_weights_sum_to_the_class_weights(xp):
    """Each particle's posterior (summing to 1) goes to the class and the direction of the coarse pose each fine
    pose oversamples: summed over the directions, the class weights; over everything, the particles (float64 sums
    of float32 weights: 1e-5)."""
    D = 48
    _, st, D = _batch(xp, 2, np.full((2, D), np.log(0.5 / D), dtype=np.float32))
    dw = st.direction_weight.reshape(2, D)
    np.testing.assert_allclose(dw.sum(axis=1), st.class_weight, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dw.sum(), N, rtol=1e-5)
    assert st.class_weight[0] > 0.9 * N  # the particles' own map (phantom 4) takes them: the setting is informative


def test_a_direction_without_prior_gets_no_weight(xp):
    """K = 1, the directions pointing up given the floor prior (log 1e-30): none of the posterior lands there
    (< 1e-20 of it), and the particles' best poses look elsewhere; without the prior ~40% of it does, so the check
    can fail."""
    from mpi_em.em.schedule import DIRECTION_PRIOR_FLOOR

    D = 48
    up = _upper(D)
    lp = np.where(up, np.log(DIRECTION_PRIOR_FLOOR), np.log(1.0 / (~up).sum()))[None].astype(np.float32)
    res, st, _ = _batch(xp, 1, lp)
    assert st.direction_weight[up].sum() < 1e-20 * N
    res0, st0, _ = _batch(xp, 1, np.full((1, D), np.log(1.0 / D), dtype=np.float32))
    assert st0.direction_weight[up].sum() > 0.25 * N
    # the best fine poses lie within the oversampling (step / 4 about each axis: < 30 deg) of a permitted direction
    z = to_host(res["mats"])[:, 2, 2]
    z0 = to_host(res0["mats"])[:, 2, 2]
    assert (z0 > 0.6).sum() >= 5 and (z > 0.6).sum() == 0


def test_the_class_prior_alone_without_directions(xp):
    """Without a direction prior the search uses the class prior (SearchSpec.log_class_prior); a uniform direction
    prior gives the same poses and class weights as the uniform class prior it sums to (the same log prior up to
    the constant log D, which the posterior does not see)."""
    D = 48
    res0, st0, _ = _batch(xp, 2, None)
    res1, st1, _ = _batch(xp, 2, np.full((2, D), np.log(0.5 / D), dtype=np.float32))
    np.testing.assert_array_equal(res1["cls"], res0["cls"])
    np.testing.assert_allclose(res1["mats"], res0["mats"], atol=1e-12)
    np.testing.assert_allclose(st1.class_weight, st0.class_weight, rtol=1e-4)


def test_stats_travel_as_one_vector_with_the_direction_weights():
    """Stats.as_vector / from_vector (the ranks' allreduce) keep the direction weights apart from the rest."""
    st = Stats.zeros(5, 2, 3)
    st.sigma2_sum[:] = 1.0
    st.class_weight[:] = [2.0, 3.0]
    st.direction_weight[:] = np.arange(6.0)
    st.offset_sq, st.offset_var = 7.0, 8.0
    back = Stats.from_vector(st.as_vector(), 5, 2, 3)
    np.testing.assert_array_equal(back.direction_weight, np.arange(6.0))
    np.testing.assert_array_equal(back.class_weight, [2.0, 3.0])
    assert (back.offset_sq, back.offset_var) == (7.0, 8.0)
    assert Stats.from_vector(Stats.zeros(5, 2).as_vector(), 5, 2).direction_weight is None


def test_reseeded_classes_take_the_directions_of_all_classes():
    """After re-seeding (class 2 split off class 0: shares 0.3, 0.4, 0.3), each row sums to its class's new share;
    the re-seeded class's row has the directions' distribution over all classes."""
    dp = np.array([[0.4, 0.2, 0.0], [0.1, 0.1, 0.2], [0.0, 0.0, 0.0]])
    out = reseeded_direction_prior(dp, np.array([0.3, 0.4, 0.3]), [2])
    np.testing.assert_allclose(out.sum(axis=1), [0.3, 0.4, 0.3])
    np.testing.assert_allclose(out[0], [0.2, 0.1, 0.0])
    np.testing.assert_allclose(out[1], [0.1, 0.1, 0.2])
    np.testing.assert_allclose(out[2], 0.3 * np.array([0.5, 0.3, 0.2]))
