"""The EM jobs' M-step maps carry RELION's soft mask outside the box's sphere (circle in 2D), as every
reconstruction of RELION's does (``softMaskOutsideMap`` in ``BackProjector::windowToOridimRealSpace``, for 3D
references and 2D class averages alike): references, half maps, leave-one-fold-out references, the combined map and
the unregularised half maps behind a solvent-corrected FSC. Without it the corners keep the interpolation aliasing
and noise that the gridding correction amplifies: the refined box-96 map of
``benchmarks/results/relion-side-by-side/h200-box256-refine3d-options-2026-12-03/`` was 6.77 A against the truth, the
same map masked 6.37 A."""
import numpy as np
import pytest


def _comm():
    from mpi4py import MPI

    return MPI.COMM_SELF


def _accumulators(V, shape, seed=3):
    """Random Fourier sums with positive weights: maps with noise everywhere, the corners included."""
    rng = np.random.default_rng(seed)
    F = rng.normal(size=(V,) + shape) + 1j * rng.normal(size=(V,) + shape)
    W = 1.0 + rng.random((V,) + shape)
    return F, W


def _corners(n, ndim):
    c = np.arange(n) - n // 2
    r = np.sqrt(sum(np.expand_dims(c, [a for a in range(ndim) if a != d]) ** 2 for d in range(ndim)))
    return r > n / 2 + 3, r < n / 2


def _assert_masked(maps, ndim):
    """Each map constant beyond N/2 + 3 px (float32 rounding of one value), and not constant inside N/2."""
    outside, inside = _corners(maps.shape[-1], ndim)
    for m in maps.reshape((-1,) + maps.shape[-ndim:]):
        v = m[outside]
        assert np.ptp(v) <= 1e-6 * np.abs(m).max(), np.ptp(v)
        assert np.ptp(m[inside]) > 1e3 * max(np.ptp(v), 1e-30)


@pytest.mark.parametrize("gold,folds", [(True, 2), (True, 1), (False, 1)])
def test_3d_maps_masked_outside_the_sphere(gold, folds):
    from mpi_em.em.model import reduce_and_reconstruct_3d

    box, pad = 16, 2
    V = 2 * folds if gold else 3
    F, W = _accumulators(V, (pad * box, pad * box, pad * box // 2 + 1))
    maps, info = reduce_and_reconstruct_3d(_comm(), F, W, box, pad, box / 2 - 1, 1.0, gold, combined=gold,
                                           folds=folds)
    _assert_masked(maps, 3)
    if gold:
        _assert_masked(info["combined"][None], 3)
    if folds > 1:
        assert info["references"].shape[0] == 2 * folds
        _assert_masked(info["references"], 3)


def test_solvent_corrected_fsc_from_masked_unregularised_maps(monkeypatch):
    """With a solvent mask the FSC that sets tau^2 comes from the unregularised half maps: masked too (RELION's
    reconstruct() for --solvent_correct_fsc goes through the same windowToOridimRealSpace)."""
    import mpi_em.em.model as model

    seen = []
    real = model.distributed_reconstruct

    def spy(*a, **kw):
        out = real(*a, **kw)
        seen.append((kw.get("tau2") is None, out))
        return out

    monkeypatch.setattr(model, "distributed_reconstruct", spy)
    box, pad = 16, 2
    F, W = _accumulators(2, (pad * box, pad * box, pad * box // 2 + 1))
    mask = np.zeros((box,) * 3)
    mask[4:12, 4:12, 4:12] = 1.0
    model.reduce_and_reconstruct_3d(_comm(), F, W, box, pad, box / 2 - 1, 1.0, True, fsc_mask=mask)
    unreg = [out for no_tau2, out in seen if no_tau2]
    assert len(unreg) == 1
    _assert_masked(unreg[0], 3)


def test_2d_class_averages_masked_outside_the_circle():
    from mpi_em.em.model import reduce_and_reconstruct_2d

    box, pad = 24, 2
    F, W = _accumulators(4, (pad * box, pad * box // 2 + 1))
    maps, _ = reduce_and_reconstruct_2d(_comm(), F, W, box, pad, box / 2 - 1, 1.0, np.ones((4, box // 2 + 1)))
    assert maps.shape == (4, box, box)
    _assert_masked(maps, 2)


@pytest.mark.parametrize("box,res,lead,pruned", [(64, 16.0, (), True), (65, 13.0, (2,), True), (96, 30.0, (3,), True),
                                                 (40, 4.0, (), False)])
def test_lowpass_3d_pruned_transforms_equal_the_whole_ones(box, res, lead, pruned, monkeypatch):
    """The CPU's 3D low-pass transforms only the frequencies its filter passes (whole x, then y and z inside the
    band, back the same way): the maps of the definition (rfftn, the raised cosine on the whole grid, irfftn) to
    float rounding, float64 and float32, with leading axes, even and odd boxes; a band too wide for pruning (box 40
    at 4 Å, 2 Å/px) takes the whole transforms."""
    import mpi_em.em.model as model
    from mpi_em.em.model import lowpass
    from mpi_em.fourier import radius_3d

    calls = []
    monkeypatch.setattr(model, "_lowpass_3d_pruned", lambda *a, _f=model._lowpass_3d_pruned: calls.append(1) or _f(*a))
    apix = 2.0
    v = np.random.default_rng(box).standard_normal(lead + (box,) * 3)
    rc = box * apix / res
    r = radius_3d(box)
    filt = 0.5 + 0.5 * np.cos(np.pi * np.clip((r - rc) / 2.0, 0.0, 1.0))
    want = np.fft.irfftn(np.fft.rfftn(v, axes=(-3, -2, -1)) * filt, s=(box,) * 3, axes=(-3, -2, -1))
    got64, got32 = lowpass(v, box, apix, res), lowpass(v.astype(np.float32), box, apix, res)
    assert got64.shape == v.shape and got64.dtype == np.float64 and got32.dtype == np.float32
    scale = np.abs(want).max()
    assert np.abs(got64 - want).max() < 1e-12 * scale
    assert np.abs(got32 - want).max() < 2e-6 * scale
    assert len(calls) == (2 if pruned else 0)


def test_lowpass_in_the_maps_precision():
    """lowpass keeps the maps' dtype (float32 maps transformed in single precision, as the start reference is):
    Fourier components within the cut-off unchanged, beyond it + the 2-shell raised cosine zero, between them
    scaled by the cosine; the float32 result equals the float64 one to float32 precision."""
    from mpi_em.em.model import lowpass
    from mpi_em.fourier import radius_3d

    box, apix, res = 32, 2.0, 8.0             # cut-off radius 8 px
    v = np.random.default_rng(3).standard_normal((box,) * 3)
    lo64, lo32 = lowpass(v, box, apix, res), lowpass(v.astype(np.float32), box, apix, res)
    assert lo64.dtype == np.float64 and lo32.dtype == np.float32
    assert np.abs(lo32 - lo64).max() < 1e-5 * np.abs(lo64).max()
    r = radius_3d(box)
    ratio = np.abs(np.fft.rfftn(lo64)) / np.abs(np.fft.rfftn(v))
    assert np.allclose(ratio[r <= 8], 1.0, atol=1e-9) and np.allclose(ratio[r >= 10], 0.0, atol=1e-9)
    band = (r > 8) & (r < 10)
    assert np.allclose(ratio[band], 0.5 + 0.5 * np.cos(np.pi * (r[band] - 8) / 2), atol=1e-9)


def test_2d_data_vs_prior_is_the_spectral_snr_of_the_average():
    """RELION's data-vs-prior SSNR of a class average, tau^2 x mean W, with its prior 1 / (pad^2 x T x tau^2) in
    the padded plane (``BackProjector::reconstruct``'s ``oversampling_correction``: the padded plane's voxels
    dilute each image's weight pad^2-fold, W there is 1 / pad^2 of W per image pixel): with tau^2 the true
    signal's power (per real component, in the images' Fourier units) and T = 1 it is the average's spectral SNR,
    n S / sigma^2 for n images of signal power S in noise of variance sigma^2 per real component. Known truth: n
    noisy copies of one reference plane at random known in-plane angles, sampled and inserted by the E-step's own
    projector and back-projector. Without the pad^2 it was a quarter of the SNR (measured: 0.25 in every shell);
    with it 0.996-1.059 (the tolerance: the count of image points against padded pixels in small shells)."""
    from mpi_em.em.model import _reconstruct_2d, reference_power
    from mpi_em.em.references import rotation_2d
    from mpi_em.fourier import SliceGeometry
    from mpi_em.fourier2d import backproject2d, plane_fft, project2d

    box, pad, n, sigma2 = 64, 2, 400, 50.0
    rng = np.random.default_rng(11)
    yy, xx = np.mgrid[:box, :box] - box // 2
    img = np.exp(-(xx ** 2 + yy ** 2) / 80.0) + 0.5 * np.exp(-((xx - 6) ** 2 + (yy + 4) ** 2) / 3.0)
    ref = plane_fft(img, pad)
    r_max = box / 2 - 1
    geom = SliceGeometry(box, r_max=r_max, pad=pad)
    mats = rotation_2d(rng.uniform(0, 360, n))
    X = project2d(ref, mats, geom)
    X = X + np.sqrt(sigma2) * (rng.standard_normal(X.shape) + 1j * rng.standard_normal(X.shape))
    F = np.zeros((1,) + ref.shape, dtype=np.complex128)
    W = np.zeros((1,) + ref.shape)
    backproject2d(F, W, mats, X / sigma2, np.full(X.shape, 1.0 / sigma2), geom, plane_index=np.zeros(n, int))
    S = reference_power(ref[None], box, pad, r_max)        # the signal's power per real component
    _, info = _reconstruct_2d(F, W, box, pad, r_max, 1.0, S)
    ssnr = (info["tau2"] * info["mean_w"])[0]
    expected = n * S[0] / sigma2
    shells = np.arange(4, 29)
    ratio = ssnr[shells] / expected[shells]
    print("data-vs-prior / (n S / sigma^2), shells 4-28:", np.round(ratio, 3))
    assert np.all(np.abs(ratio - 1.0) < 0.1), ratio


def test_3d_data_vs_prior_is_the_spectral_snr_of_the_map(monkeypatch):
    """The 3D classification prior as RELION's: 1 / (pad^3 x T x tau^2) added to the padded volume's weights,
    tau^2 the power (per real component) of the references the E-step used (``oversampling_correction`` = pad^3
    for 3D references in ``BackProjector::reconstruct``). With tau^2 the true signal's power and T = 1 the
    data-vs-prior tau^2 x mean W is the map's spectral SNR: n images at uniformly random known orientations
    observe a voxel of shell s n / (2 s) times on average (a slice's 2 pi s points over the shell's 4 pi s^2), so
    SSNR(s) = n S(s) / (2 s sigma^2). Known truth: noisy central slices of a reference volume through the E-step's
    own projector and back-projector."""
    from mpi_em.em.model import reduce_and_reconstruct_3d, reference_power
    from mpi_em.fourier import SliceGeometry, backproject, project, volume_fft
    from mpi_em.initial.schedule import random_rotations

    box, pad, n, sigma2 = 24, 2, 3000, 20.0
    rng = np.random.default_rng(5)
    zz, yy, xx = np.mgrid[:box, :box, :box] - box // 2
    vol = np.exp(-(xx ** 2 + yy ** 2 + zz ** 2) / 30.0) + 0.7 * np.exp(-((xx - 3) ** 2 + (yy + 2) ** 2 + zz ** 2) / 4.0)
    ref = volume_fft(vol, pad)
    r_max = box / 2 - 1
    geom = SliceGeometry(box, r_max=r_max, pad=pad)
    mats = random_rotations(n, 3)
    X = project(ref, mats, geom)
    X = X + np.sqrt(sigma2) * (rng.standard_normal(X.shape) + 1j * rng.standard_normal(X.shape))
    F = np.zeros((1,) + ref.shape, dtype=np.complex128)
    W = np.zeros((1,) + ref.shape)
    backproject(F, W, mats, X / sigma2, np.full(X.shape, 1.0 / sigma2), geom, vol_index=np.zeros(n, int))
    S = reference_power(ref[None], box, pad, r_max)
    from mpi_em.em import model

    monkeypatch.setattr(model, "POWER_SLAB_VOXELS", 3 * 2 * box * (box + 1))  # slabs of 3 planes: the same sums
    assert np.allclose(reference_power(ref[None], box, pad, r_max), S, rtol=1e-12, atol=0)
    _, info = reduce_and_reconstruct_3d(_comm(), F, W, box, pad, r_max, 1.0, False, tau2_ref=S)
    ssnr = (info["tau2"] * info["mean_w"])[0]
    s = np.arange(S.shape[1], dtype=np.float64)
    shells = np.arange(3, 11)
    ratio = ssnr[shells] / (n * S[0][shells] / (2 * s[shells] * sigma2))
    print("data-vs-prior / (n S / (2 s sigma^2)), shells 3-10:", np.round(ratio, 3))
    assert np.all(np.abs(ratio - 1.0) < 0.1), ratio


@pytest.mark.parametrize("dim", [2, 3])
def test_reference_power_is_the_shell_mean_inside_the_ball(monkeypatch, dim):
    """em.model.reference_power against its definition written out on the whole padded grid: per reference and
    image-pixel shell round(|k| / pad), the mean of |F|^2 / 2 over the points with |k| / pad <= r_max + 1/2 and
    < box / 2 (the reconstruction ball), 0 beyond. Small and large r_max (the ball inside the grid, and reaching
    its Nyquist sphere), odd pad, slabs of a few planes, each shell's sum spread over lanes (as on a GPU): the same
    sums to float64 rounding."""
    from mpi_em.em import model

    rng = np.random.default_rng(3)
    for box, pad, V in ((20, 2, 3), (18, 3, 2)):
        npad = box * pad
        shape = (V,) + (npad,) * (dim - 1) + (npad // 2 + 1,)
        F = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
        axes = [np.fft.fftfreq(npad, 1.0 / npad)] * (dim - 1) + [np.arange(npad // 2 + 1.0)]
        r = np.sqrt(sum(k ** 2 for k in np.meshgrid(*axes, indexing="ij"))) / pad
        n_shells = box // 2 + 1
        for r_max in (2.0, 5.5, box / 2 - 1, box / 2):
            inside = (r <= r_max + 0.5) & (r < box / 2)
            sh = np.rint(r).astype(int)
            p = 0.5 * np.abs(F.astype(np.complex128)) ** 2
            want = np.zeros((V, n_shells))
            for s in range(n_shells):
                sel = inside & (sh == s)
                if sel.any():
                    want[:, s] = p[:, sel].mean(axis=1)
            got = model.reference_power(F, box, pad, r_max)
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
            with monkeypatch.context() as m:
                m.setattr(model, "POWER_SLAB_VOXELS", 2 * int(np.prod(shape[2:])) + 1)
                np.testing.assert_allclose(model.reference_power(F, box, pad, r_max), want, rtol=1e-12, atol=0)
                m.setattr(model, "_power_lanes", lambda xp: 7)   # a GPU's sums spread over lanes, here on the CPU
                np.testing.assert_allclose(model.reference_power(F, box, pad, r_max), want, rtol=1e-12, atol=0)
