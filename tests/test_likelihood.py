"""The E-step's pieces: cross terms as GEMMs, marginalisation over translations, top-k selection, the coarse
pass finding known poses."""
import numpy as np

from mpi_em.backend import to_host
from mpi_em.em.engine import SearchSpec, _coarse_pass, inverse_sigma2_points, shell_of_points
from mpi_em.em.likelihood import (log_likelihood_phased, log_likelihood_shared, marginalise_translations,
                                  shared_operands, shared_parts, top_k, weighted_translations)
from mpi_em.em.references import References, fine_offsets, global_grid
from mpi_em.fourier import SliceGeometry
from mpi_em.simulate import phantom
from mpi_em.timing import NULL_TIMER


def test_shared_parts_are_the_gaussian_log_likelihood(rng):
    """cross - norm = -|X_t - CTF P|^2 / (2 sigma^2) + |X_t|^2 / (2 sigma^2), computed directly in float64. Each
    of cross and norm sums 2m float32 products of size <= max|CTF / sigma^2| max|X| max|P| (<= 2 max|X| max|P|):
    worst-case rounding 2m * eps32 * that, twice."""
    n, T, C, m = 5, 3, 7, 60
    Xt = (rng.normal(size=(n, T, m)) + 1j * rng.normal(size=(n, T, m))).astype(np.complex64)
    P = (rng.normal(size=(C, m)) + 1j * rng.normal(size=(C, m))).astype(np.complex64)
    ctf = rng.uniform(-1, 1, (n, m)).astype(np.float32)
    inv_s2 = rng.uniform(0.5, 2, m).astype(np.float32)
    cross, norm = shared_parts(Xt, ctf, inv_s2, shared_operands(P))
    X64, P64 = Xt.astype(np.complex128), P.astype(np.complex128)
    r = X64[:, :, None, :] - ctf[:, None, None, :] * P64[None, None]
    want = (-0.5 * (np.abs(r) ** 2 - np.abs(X64[:, :, None, :]) ** 2) * inv_s2).sum(-1)
    got = cross - norm[:, None, :]
    bound = 2 * (2 * m * np.finfo(np.float32).eps * 2 * np.abs(X64).max() * max(np.abs(P64).max() ** 2, np.abs(P64).max() * np.abs(X64).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=bound)
    np.testing.assert_array_equal(log_likelihood_shared(Xt, ctf, inv_s2, P), got)


def test_phased_likelihood_is_the_gaussian_log_likelihood(rng, xp):
    """Per-particle poses P (n, C, m), translations as shared unit phases (X_t = X ph_t): log L + |X_t|^2 / (2
    sigma^2) = -|X_t - CTF P|^2 / (2 sigma^2) + |X_t|^2 / (2 sigma^2), computed directly in float64. The products
    are formed in float32 (Z = X CTF / sigma^2 conj(P), then Z ph_t: a few roundings each, |ph| = 1) and summed over
    2m terms: the bound of test_shared_parts_are_the_gaussian_log_likelihood with 4 roundings per term instead of
    one."""
    n, T, C, m = 5, 9, 7, 60
    X = (rng.normal(size=(n, m)) + 1j * rng.normal(size=(n, m))).astype(np.complex64)
    P = (rng.normal(size=(n, C, m)) + 1j * rng.normal(size=(n, C, m))).astype(np.complex64)
    ph = np.exp(1j * rng.uniform(-np.pi, np.pi, (T, m))).astype(np.complex64)
    ctf = rng.uniform(-1, 1, (n, m)).astype(np.float32)
    inv_s2 = rng.uniform(0.5, 2, m).astype(np.float32)
    got = log_likelihood_phased(xp.asarray(X), xp.asarray(ctf), xp.asarray(inv_s2), xp.asarray(P), xp.asarray(ph))
    assert got.shape == (n, T, C) and got.dtype == np.float32 and got.flags.c_contiguous
    got = to_host(got)
    Xt = X.astype(np.complex128)[:, None, :] * ph.astype(np.complex128)[None]           # (n, T, m)
    P64 = P.astype(np.complex128)
    r = Xt[:, :, None, :] - ctf[:, None, None, :] * P64[:, None]                        # (n, T, C, m)
    want = (-0.5 * (np.abs(r) ** 2 - np.abs(Xt[:, :, None, :]) ** 2) * inv_s2).sum(-1)
    big = 2 * np.abs(X).max() * max(np.abs(P64).max() ** 2, np.abs(P64).max() * np.abs(X).max())
    np.testing.assert_allclose(got, want, rtol=0, atol=2 * (2 * m * 4 * np.finfo(np.float32).eps * big))
    # the weighted sum over translations, sum_t w X_t, against float64
    w = rng.uniform(0, 1, (n, T, C))
    got_w = to_host(weighted_translations(xp.asarray(X), xp.asarray(w), xp.asarray(ph)))
    want_w = np.einsum("ntc,ntm->ncm", w, Xt)
    bound = T * 4 * np.finfo(np.float32).eps * np.abs(X).max()
    assert got_w.dtype == np.complex64
    np.testing.assert_allclose(got_w, want_w, rtol=0, atol=bound)


def test_marginalise_translations_matches_float64(rng):
    """float32 log-sum-exp over T = 9 translations with a prior, against float64: |L| <= 1000 here, so one
    float32 rounding of L + prior (2^-24 * 1000 = 6e-5) dominates; -inf columns stay -inf."""
    L = rng.uniform(-1000, 1000, (4, 9, 50)).astype(np.float32)
    L[0, :, 3] = -np.inf
    L[1, 2:, 4] = -np.inf
    prior = rng.uniform(-3, 0, (4, 9)).astype(np.float32)   # per particle (offset priors around each one's offset)
    got = marginalise_translations(L, prior)
    assert np.array_equal(marginalise_translations(L[:1], prior[0]), got[:1])   # a shared (T,) prior broadcasts
    a = L.astype(np.float64) + prior[:, :, None]
    mx = a.max(axis=1)
    with np.errstate(invalid="ignore"):
        want = mx + np.log(np.exp(a - mx[:, None, :]).sum(axis=1))
    assert got[0, 3] == -np.inf and np.isfinite(got[1, 4])
    ok = np.isfinite(want)
    np.testing.assert_allclose(got[ok], want[ok], rtol=0, atol=4 * 2.0 ** -24 * 1000)


def test_top_k_best_first_and_distinct(rng):
    v = rng.normal(size=(6, 40)).astype(np.float32)
    np.testing.assert_array_equal(top_k(v, 4), np.argsort(-v, axis=1, kind="stable")[:, :4])
    v[:, 2:] = -np.inf  # fewer finite entries than k: still k distinct indices, the finite ones first
    idx = top_k(v, 4)
    assert all(len(set(row)) == 4 for row in idx.tolist())
    assert all(set(row[:2]) == {0, 1} for row in idx.tolist())


def test_coarse_pass_finds_the_pose_and_translation_of_noiseless_projections():
    """Particles that are exact central slices of the reference at grid orientations, shifted by grid
    translations: the coarse pass ranks the true orientation first and picks the true translation (gold-standard
    halves with two references exercise the per-half rows). The grids are randomly perturbed (RELION's: poses
    right-multiplied by R(a, a, a), translations + p x step on both axes); the particles lie on the perturbed
    grids, so the pass must search those, not the unperturbed ones."""
    box = 32
    vol = phantom(box, seed=3).astype(np.float64)
    geom = SliceGeometry(box, r_max=10)
    refs = References(np.stack([vol, vol]), 3, 2)
    glob = global_grid(3, 1, "C1", np, perturb_deg=0.37 * 30.0)
    from mpi_em.em.references import perturbation_rotation
    np.testing.assert_allclose(glob, global_grid(3, 1, "C1", np) @ perturbation_rotation(3, 11.1), atol=1e-12)
    rng = np.random.default_rng(7)
    n = 12
    true_c = rng.integers(0, glob.shape[0], n)
    P = refs.project(glob[true_c], np.zeros(n, dtype=np.int64), geom)
    spec = SearchSpec(dim=3, n_classes=1, global_mats=glob, local_mats=None, fine_mats=fine_offsets(3, 30.0, np),
                      offset_range=3.0, offset_step=1.0, offset_sigma=10.0, log_class_prior=np.zeros(1, np.float32),
                      offset_perturb=0.37)
    from mpi_em.sampling import translation_grid
    T_c = translation_grid(3.0, 2.0) + 0.37
    true_t = rng.integers(0, T_c.shape[0], n)
    X = (P * np.conj(geom.phases(T_c[true_t][:, None, :])[:, 0])).astype(np.complex64)
    ctf = np.ones((n, geom.m), dtype=np.float32)
    inv_s2 = inverse_sigma2_points(np.ones(box // 2 + 1), shell_of_points(geom), np)
    base = np.arange(n) % 2
    po = np.zeros((n, 2))
    _, sel, best_t, _, _ = _coarse_pass(X, ctf, inv_s2, refs, base, None, np.zeros(n, np.int64), spec, geom,
                                     NULL_TIMER, po)
    np.testing.assert_array_equal(sel[:, 0], true_c)
    np.testing.assert_allclose(best_t, T_c[true_t])

    # the offset prior is centred on 0, not on the particle's current offset po: when the data say nothing
    # (1/sigma^2 -> 1e-9) and the prior is narrow, the translation taken is the one that brings po + t nearest 0
    spec.offset_sigma = 0.5
    po = -T_c[true_t[::-1]]
    _, _, best_t, _, _ = _coarse_pass(X, ctf, inv_s2 * 1e-9, refs, base, None, np.zeros(n, np.int64), spec, geom,
                                   NULL_TIMER, po)
    np.testing.assert_allclose(best_t, T_c[true_t[::-1]])


def test_fourier_fsc_one_where_shared_zero_where_independent():
    """The gold-standard FSC from down-sampled accumulators: halves made of the same noiseless slices of a
    low-passed phantom plus independent noise give FSC ~1 where the signal dominates and ~0 where it is absent
    (shells 9-14: |FSC| below 4 / sqrt(voxels in the shell of the half-complex grid), 4 standard errors)."""
    from mpi_em.distributed import world
    from mpi_em.em.model import fourier_fsc, lowpass
    from mpi_em.fourier import backproject, project, volume_fft
    from mpi_em.geometry import euler_to_matrix, random_rotations
    from mpi_em.fourier import radius_3d

    box, pad = 32, 2
    rng = np.random.default_rng(0)
    Fv = volume_fft(lowpass(phantom(box, seed=2).astype(float), box, 1.0, box / 6.0))
    geom = SliceGeometry(box, r_max=14)
    F = np.zeros((2,) + geom.vol_shape, complex)
    W = np.zeros((2,) + geom.vol_shape)
    A = euler_to_matrix(*random_rotations(600, rng))
    clean = project(Fv, A, geom)
    for h in range(2):
        noise = 0.05 * np.abs(clean).max() * (rng.normal(size=clean.shape) + 1j * rng.normal(size=clean.shape))
        backproject(F[h:h + 1], W[h:h + 1], A, clean + noise, np.ones(clean.shape), geom,
                    vol_index=np.zeros(len(A), int))
    curve = fourier_fsc(world(), F, W, np.arange(pad * box), pad * box, pad, 14)
    counts = np.bincount(np.rint(radius_3d(box)).astype(int).ravel())
    assert curve[1:4].min() > 0.95, curve
    assert np.all(np.abs(curve[9:15]) < 4 / np.sqrt(counts[9:15])), curve
    assert np.all(curve[15:] == 0)


def test_downsampled_sums_by_chunks_equal_one_pass_and_the_definition(monkeypatch):
    """The down-sampled sums go by chunks of planes (their indices and weights at most DOWNSAMPLE_CHUNK voxels):
    one plane at a time gives the one-pass sums to float64 rounding of the summation order, and both equal the
    definition (each padded voxel added at round(k / pad), by np.add.at), for a subset of planes too."""
    import mpi_em.em.model as model

    box, pad = 12, 2
    npad = pad * box
    rng = np.random.default_rng(5)
    planes = np.arange(1, npad, 3)
    shape = (2, len(planes), npad, npad // 2 + 1)
    F = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
    W = rng.uniform(0, 1, shape).astype(np.float32)
    one = model.downsampled_sums(F, W, planes, npad, pad)
    monkeypatch.setattr(model, "DOWNSAMPLE_CHUNK", npad * (npad // 2 + 1))  # one plane per chunk
    by_plane = model.downsampled_sums(F, W, planes, npad, pad)
    k = np.fft.fftfreq(npad, 1.0 / npad)
    down = lambda v: np.floor(v / pad + 0.5).astype(int)  # noqa: E731
    iz, iy, ix = np.meshgrid(down(k[planes]) % box, down(k) % box,
                             np.minimum(down(np.arange(npad // 2 + 1)), box // 2), indexing="ij")
    for v in range(2):
        ref_F = np.zeros((box, box, box // 2 + 1), complex)
        ref_W = np.zeros((box, box, box // 2 + 1))
        np.add.at(ref_F, (iz, iy, ix), F[v].astype(complex))
        np.add.at(ref_W, (iz, iy, ix), W[v].astype(float))
        for got_F, got_W in (one, by_plane):
            np.testing.assert_allclose(got_F[v], ref_F, rtol=0, atol=1e-12 * np.abs(ref_F).max())
            np.testing.assert_allclose(got_W[v], ref_W, rtol=0, atol=1e-12 * ref_W.max())


def test_shell_statistics_by_chunks_equal_the_whole_volume_without_its_indices(monkeypatch):
    """shell_statistics goes by chunks of planes (SHELL_CHUNK voxels): the same means as the whole volume's shell
    indices at once (float64 sums in another order: 1e-12), and no volume-sized array is made on the way (the
    whole volume's radii and indices were 24 bytes per padded voxel: 13e9 bytes at box 512, the M-step's peak
    measured on a GPU). tracemalloc: the peak stays below one float64 volume (8 bytes per voxel; measured 4.7 at
    box 32 with 4 of 64 planes a chunk, 24 before)."""
    import tracemalloc

    import mpi_em.em.model as model
    from mpi_em.distributed import world
    from mpi_em.fourier import radius_3d, shell_index

    box, pad = 32, 2
    npad, n_shells = pad * box, box // 2 + 1
    rng = np.random.default_rng(3)
    shape = (2, npad, npad, npad // 2 + 1)
    F = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
    W = rng.uniform(0, 1, shape).astype(np.float32)
    planes = np.arange(npad)
    sh = shell_index(radius_3d(npad) / pad, n_shells).reshape(-1)
    ref = model._shell_means(model._shell_sums(F, W, sh, n_shells), n_shells)
    monkeypatch.setattr(model, "SHELL_CHUNK", 4 * npad * (npad // 2 + 1))  # 4 planes at a time
    model.shell_statistics(world(), F, W, planes, npad, pad, n_shells)  # first call: imports, the world's set-up
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    got = model.shell_statistics(world(), F, W, planes, npad, pad, n_shells)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=0)
    assert peak < 8 * F[0].size, peak
    # without the power (the priors that do not use it): the same mean W, bit for bit, from half the bincounts
    mean_w, power = model.shell_statistics(world(), F, W, planes, npad, pad, n_shells, power=False)
    np.testing.assert_array_equal(mean_w, got[0])
    assert power is None
    F_nan = np.full_like(F, np.nan)                           # F is not read
    np.testing.assert_array_equal(model.shell_statistics(world(), F_nan, W, planes, npad, pad, n_shells,
                                                         power=False)[0], got[0])


def test_shell_statistics_inside_the_reach_equal_the_whole_layouts(monkeypatch):
    """reach (the insertion's padded reach, nothing past it): the sums over the block of planes, rows and columns
    inside it, each shell's mean W divided by its voxels over the whole layout, give the whole layout's means: bit
    for bit where the whole layout is one chunk (the same sums with only zeros left out), to float64 rounding where
    it goes by chunks; on the planes of one rank of three too. A reach past the layout's edge is the whole path.
    Accumulators with data past the reach would differ (the sums would miss them): asserted, so the test can fail."""
    import mpi_em.em.model as model
    from mpi_em.distributed import world
    from mpi_em.distvolume import owned_planes
    from mpi_em.fourier import padded_reach, radius_3d

    box, pad = 32, 2
    npad, n_shells = pad * box, box // 2 + 1
    reach = padded_reach(9.0, pad)  # 20 padded voxels
    rng = np.random.default_rng(5)
    shape = (2, npad, npad, npad // 2 + 1)
    inside = (radius_3d(npad) <= reach - 2.0)[None]
    F = np.where(inside, rng.normal(size=shape) + 1j * rng.normal(size=shape), 0).astype(np.complex128)
    W = np.where(inside, rng.uniform(0, 1, shape), 0.0)
    for planes in (np.arange(npad), owned_planes(npad, 1, 3)):
        whole = model.shell_statistics(world(), F[:, planes], W[:, planes], planes, npad, pad, n_shells)
        got = model.shell_statistics(world(), F[:, planes], W[:, planes], planes, npad, pad, n_shells, reach=reach)
        for a, b in zip(got, whole):
            np.testing.assert_array_equal(a, b)
        assert model._reach_block(npad, planes, npad / 2) is None
    monkeypatch.setattr(model, "SHELL_CHUNK", 4 * npad * (npad // 2 + 1))  # the whole layout 4 planes at a time
    whole = model.shell_statistics(world(), F, W, np.arange(npad), npad, pad, n_shells)
    got = model.shell_statistics(world(), F, W, np.arange(npad), npad, pad, n_shells, reach=reach)
    for a, b in zip(got, whole):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=0)
    W_past = W.copy()
    W_past[:, 0, 0, npad // 2] = 1.0  # a voxel past the reach
    past = model.shell_statistics(world(), F, W_past, np.arange(npad), npad, pad, n_shells, reach=reach)[0]
    assert not np.allclose(past, model.shell_statistics(world(), F, W_past, np.arange(npad), npad, pad,
                                                        n_shells)[0], rtol=1e-9, atol=0)


def test_significant_coarse_candidates():
    """RELION's significant samples: of the n_select best coarse poses, the fine pass refines those whose better
    ones hold less than 99.9% of the coarse posterior. A particle whose best pose holds 99.95% keeps one; one with
    a flat posterior keeps all n_select; with K = 1 the batch is cut to its widest posterior."""
    from mpi_em.em.engine import _select

    C, T = 50, 1
    L = np.full((2, T, C), -50.0, dtype=np.float32)
    L[0, 0, 7] = 0.0                                   # 1 / (1 + 49 e^-50): all but 1e-20 of the mass
    L[1, 0, :] = np.linspace(0.0, -0.01, C)            # nearly flat
    spec = SearchSpec(dim=3, n_classes=1, global_mats=None, local_mats=None, fine_mats=None, offset_range=0.0,
                      offset_step=1.0, offset_sigma=0.0, n_select=4)
    sel, valid, _ = _select(L, None, np.zeros((1, 2)), np.zeros((2, T), np.float32), np.zeros(1, np.float32),
                            np.zeros(2, np.int64), 1, C, spec, NULL_TIMER)
    assert sel[0, 0] == 7 and valid[0].tolist() == [True, False, False, False]
    assert valid[1].all() and sel[1].tolist() == [0, 1, 2, 3]


def test_global_grid_in_chunks_equals_the_kept_projections(xp):
    """The coarse pass with the grid projected in chunks per batch (SearchSpec.grid_chunk: the memory model's
    choice where the whole grid's projections would not fit) gives the same search as with the projections kept:
    the same best poses and translations for every particle of a two-class, two-reference-set batch (SNR 1: no
    float32 near-ties), posterior maxima and inserted sums equal to float32 rounding of the likelihoods."""
    from mpi_em.ctf import ctf_images
    from mpi_em.em.engine import Stats, expectation_batch, sigma2_from_images
    from mpi_em.reconstruction import centred_points
    from mpi_em.simulate import simulate_particles

    box, n, K = 24, 40, 2
    vols = np.stack([phantom(box, seed=4), phantom(box, seed=5)]).astype(np.float64)
    sim = simulate_particles(vols[0], n, pixel_size=5.0, snr=1.0, seed=9, max_shift=1.0)
    g0 = SliceGeometry(box, r_max=9)
    s_sum, s_cnt = sigma2_from_images(centred_points(sim.images, None, g0)[0], shell_of_points(g0), box // 2 + 1)
    sigma2 = s_sum / np.maximum(s_cnt, 1)
    geom = SliceGeometry(box, r_max=9, xp=xp)
    sh = shell_of_points(geom)
    c = ctf_images(box, 5.0, sim.defocus_u, sim.defocus_v, sim.defocus_angle, 300.0, 2.7, 0.1, xp=xp)
    X, ctf = centred_points(xp.asarray(sim.images), None, geom, c)
    refs = References(xp.asarray(np.concatenate([vols, vols[::-1]])), 3, 2)  # two reference sets of K = 2
    out = []
    for chunk in (0, 7):  # 7 does not divide the grid's 576 orientations: a short last chunk
        spec = SearchSpec(dim=3, n_classes=K, global_mats=global_grid(3, 1, "C1", xp), local_mats=None,
                          fine_mats=fine_offsets(3, 30.0, xp), offset_range=2.0, offset_step=1.0, offset_sigma=2.0,
                          log_class_prior=xp.zeros(K, dtype=xp.float32), grid_chunk=chunk)
        F = xp.zeros((4,) + geom.vol_shape, dtype=xp.complex128)
        W = xp.zeros((4,) + geom.vol_shape, dtype=xp.float64)
        res = expectation_batch(X, ctf, inverse_sigma2_points(sigma2, sh, xp), sh, refs,
                                xp.asarray(2 * (np.arange(n) % 2)), None, xp.zeros(n, dtype=xp.int64), spec, geom,
                                F, W, Stats.zeros(box // 2 + 1, K), box // 2 + 1)
        assert (len(spec.projection_cache) == 0) == (chunk > 0)
        out.append((res, to_host(F)))
    (r0, F0), (r1, F1) = out
    np.testing.assert_array_equal(r1["cls"], r0["cls"])
    np.testing.assert_allclose(r1["mats"], r0["mats"], atol=1e-12)
    np.testing.assert_allclose(r1["shift"], r0["shift"], atol=1e-12)
    np.testing.assert_allclose(r1["pmax"], r0["pmax"], rtol=1e-4, atol=1e-5)
    assert np.abs(F1 - F0).max() <= 1e-4 * np.abs(F0).max()


def test_references_of_some_sets_project_as_the_whole_stack(rng):
    """A rank that holds only the reference sets its particles use (``volumes``) projects, for the job's volume
    indices, exactly what the whole stack projects (the same transforms of the same maps)."""
    from mpi_em.geometry import euler_to_matrix

    box = 16
    vols = np.stack([phantom(box, seed=s) for s in range(4)]).astype(np.float32)
    whole = References(vols, 3, 2)
    some = References(vols[[1, 3]], 3, 2, volumes=[1, 3], n_total=4)
    geom = SliceGeometry(box, pad=2)
    mats = euler_to_matrix(rng.uniform(0, 360, 6), rng.uniform(0, 180, 6), rng.uniform(0, 360, 6))
    vi = np.array([1, 3, 3, 1, 1, 3])
    assert np.array_equal(some.project(mats, vi, geom), whole.project(mats, vi, geom))
    assert np.array_equal(some.slot, [-1, 0, -1, 1])


def _grid_case(xp, box=32, r_max=10.0, order=1):
    """Two references (K = 2), the HEALPix order-1 grid (576 orientations), box 32 at r_max 10 px."""
    maps = xp.asarray(np.stack([phantom(box, seed=4), phantom(box, seed=5)]).astype(np.float64))
    geom = SliceGeometry(box, r_max=r_max, xp=xp)
    return References(maps, 3), xp.asarray(global_grid(3, order, "C1", np)), geom


def test_grid_operands_are_the_grids_operands_chunk_by_chunk(xp, monkeypatch):
    """em.search.grid_operands (the coarse pass's shared operands of the whole grid for every class, written a
    chunk of orientations at a time) against the grid's projections P (K C, m), class-major: B = [Re P, Im P]
    rounded to float32 (exactly: one rounding per component), |P|^2 within 3 float32 roundings of its float64
    value (each square, their sum); chunks of 7 orientations (the last one short) give the same arrays bit for bit
    as the default chunk (each point is projected and squared alone)."""
    from mpi_em.em import search

    refs, G, geom = _grid_case(xp)
    K, C, m = 2, G.shape[0], geom.m
    P = to_host(refs.project(xp.broadcast_to(G[None], (K,) + G.shape), xp.arange(K)[:, None], geom)).reshape(K * C, m)
    B, P2 = (to_host(a) for a in search.grid_operands(refs, G, K, 0, geom))
    assert B.dtype == P2.dtype == np.float32 and B.shape == (K * C, 2 * m) and P2.shape == (K * C, m)
    np.testing.assert_array_equal(B, np.concatenate([P.real, P.imag], axis=1).astype(np.float32))
    want = P.real.astype(np.float64) ** 2 + P.imag.astype(np.float64) ** 2
    assert np.all(np.abs(P2 - want) <= 3 * np.finfo(np.float32).eps * want)
    monkeypatch.setattr(search, "PROJECT_POINTS", {True: 7 * m, False: 7 * m})
    B7, P27 = (to_host(a) for a in search.grid_operands(refs, G, K, 0, geom))
    np.testing.assert_array_equal(B7, B)
    np.testing.assert_array_equal(P27, P2)
