"""--zero-mask: RELION's particle-image mask (``softMaskOutsideMap`` of ``--zero_mask``), the images it feeds the
search while the unmasked ones are inserted, and the first noise spectrum against RELION's own
(``relion_refine --iter 0`` writes it in ``run_it000_model.star``)."""
import shutil
import subprocess

import numpy as np
import pytest
import starfile

from conftest import mpi_em
from mpi_em.backend import to_host
from mpi_em.em.engine import (SearchSpec, Stats, expectation_batch, inverse_sigma2_points, masked_points,
                              shell_of_points, sigma2_from_images)
from mpi_em.em.references import References, fine_offsets, global_grid
from mpi_em.em.steps import initial_noise
from mpi_em.fourier import SliceGeometry
from mpi_em.io.mrc import read_map
from mpi_em.masks import particle_masked_images, soft_sphere
from mpi_em.reconstruction import centred_points
from mpi_em.simulate import phantom, simulate_particles


def test_mask_about_the_centre_is_relions_soft_circle(xp, rng):
    """Particles at the centre: inside the radius the image, outside radius + edge the background value, between
    the raised cosine 0.5 + 0.5 cos(pi (r - R) / w) (``soft_sphere``, built another way), the background value
    the image's mean weighted by 1 - mask; float32 rounding only."""
    N, R, w = 40, 13.3, 5.0
    imgs = rng.normal(size=(3, N, N)).astype(np.float32) + 0.3
    got = to_host(particle_masked_images(xp.asarray(imgs), np.zeros((3, 2)), R, w))
    m = soft_sphere(N, R, width=w, ndim=2).astype(np.float64)
    bg = ((1 - m) * imgs).sum(axis=(1, 2)) / (1 - m).sum()
    want = m * imgs + (1 - m) * bg[:, None, None]
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())
    assert np.all(np.abs(bg - 0.3) < 0.1)  # the weighted mean of the background, not 0


def test_mask_follows_the_particle_and_commutes_with_recentring(xp, rng):
    """A particle at N//2 + (sx, sy) (x along columns): masked about it and re-centred by the Fourier shift of
    ``centred_points`` equals the image rolled to the centre and masked there, for integer shifts (exact
    circular moves), sx != sy so that a swapped axis fails; and the particle itself is kept."""
    N, R = 32, 9.0
    shifts = np.array([[5.0, -3.0], [-7.0, 2.0]])
    imgs = rng.normal(size=(2, N, N)).astype(np.float32)
    rolled = np.stack([np.roll(im, (-int(s[1]), -int(s[0])), axis=(0, 1)) for im, s in zip(imgs, shifts)])
    geom = SliceGeometry(N, xp=xp)
    a = centred_points(particle_masked_images(xp.asarray(imgs), shifts, R), shifts, geom)[0]
    b = centred_points(particle_masked_images(xp.asarray(rolled), np.zeros((2, 2)), R), None, geom)[0]
    np.testing.assert_allclose(to_host(a), to_host(b), rtol=0, atol=2e-5 * float(np.abs(to_host(b)).max()))
    masked = to_host(particle_masked_images(xp.asarray(imgs), shifts, R))
    for im, mk, s in zip(imgs, masked, shifts):  # the pixels within R - 1 of the particle are untouched
        y, x = N // 2 + int(s[1]), N // 2 + int(s[0])
        np.testing.assert_array_equal(mk[y - 5:y + 6, x - 5:x + 6], im[y - 5:y + 6, x - 5:x + 6])


def test_insertion_of_other_images_leaves_the_search_and_the_noise(xp):
    """``X_insert``: the search, the poses and the noise statistics are the searched images' (``X``); only the
    insertion takes ``X_insert``. X_insert = X gives the run without it; X_insert = 2 X the same poses, weights and
    statistics and twice the inserted data (a power of 2: exact in floating point). Exact on CPU ranks; a GPU's
    atomic additions sum in any order, so there the float64 sums agree to 1e-12 relative."""
    box, n = 24, 30
    vol = phantom(box, seed=4).astype(np.float64)
    sim = simulate_particles(vol, n, pixel_size=5.0, snr=1.0, seed=9, max_shift=1.0)
    geom = SliceGeometry(box, r_max=9, xp=xp)
    sh = shell_of_points(geom)
    X, ctf = centred_points(xp.asarray(sim.images), None, geom)
    s_sum, s_cnt = sigma2_from_images(X, sh, box // 2 + 1)
    inv = inverse_sigma2_points(s_sum / np.maximum(s_cnt, 1), sh, xp)
    refs = References(xp.asarray(vol[None]), 3, 2)
    out = []
    for X_ins in (None, X, 2 * X):
        spec = SearchSpec(dim=3, n_classes=1, global_mats=global_grid(3, 1, "C1", xp), local_mats=None,
                          fine_mats=fine_offsets(3, 30.0, xp), offset_range=2.0, offset_step=1.0, offset_sigma=2.0,
                          log_class_prior=xp.zeros(1, dtype=xp.float32))
        F = xp.zeros((1,) + geom.vol_shape, dtype=xp.complex128)
        W = xp.zeros((1,) + geom.vol_shape, dtype=xp.float64)
        st = Stats.zeros(box // 2 + 1, 1)
        res = expectation_batch(X, ctf, inv, sh, refs, xp.zeros(n, dtype=xp.int64), None,
                                xp.zeros(n, dtype=xp.int64), spec, geom, F, W, st, box // 2 + 1, X_insert=X_ins)
        out.append((res, to_host(F), to_host(W), st))
    (r0, F0, W0, s0), (r1, F1, W1, s1), (r2, F2, W2, s2) = out
    for r, F, W, s, k in ((r1, F1, W1, s1, 1.0), (r2, F2, W2, s2, 2.0)):
        for key in ("mats", "shift", "pmax", "loglike", "cls"):
            np.testing.assert_array_equal(r[key], r0[key])
        np.testing.assert_allclose(F, k * F0, rtol=0, atol=1e-12 * k * np.abs(F0).max())
        np.testing.assert_allclose(W, W0, rtol=0, atol=1e-12 * W0.max())
        np.testing.assert_allclose(s.sigma2_sum, s0.sigma2_sum, rtol=1e-12)
    assert np.abs(F0).max() > 0


# ------------------------------------------------------------------------------------- against RELION
RELION_REFINE = shutil.which("relion_refine")


@pytest.mark.skipif(not RELION_REFINE, reason="RELION not installed (Debian: apt-get install relion; tests/run.sh "
                                              "installs it where it has root)")
def test_first_noise_spectrum_is_relions(tmp_path):
    """The first noise spectrum of --zero-mask (the job's first pass: :func:`masked_points`, then
    :func:`initial_noise` with the average image) against RELION 3.1's ``rlnSigma2Noise`` of
    ``run_it000_model.star`` with --zero_mask on the same 300 particles (box 64, particle diameter 150 Å: the mask
    cuts the noise power to ~0.6). RELION's Fourier transform is ours / N^2, so its spectrum is ours / N^4. The same
    images in both: the per-shell values agree to the rounding and the points a shell holds (measured within 0.5%),
    and their mean over shells 5-31 within 0.15%: without the mask the ratio is ~1.7, without the average image's
    power subtracted +0.5% at every shell (1 / 300 of the noise) and ~10x at shells 0-2. (Without --zero-mask the
    first pass leaves the average's power in, unlike RELION: :func:`mpi_em.em.steps.first_pass` says why.)"""
    N, apix, diam, n = 64, 3.0, 150.0, 300
    r = mpi_em(["simulate", "--out", tmp_path, "--box", N, "--n", n, "--snr", 0.05, "--apix", apix, "--seed", 7,
                "--max-shift", 0], ranks=0)
    assert r.returncode == 0, r.stderr
    (tmp_path / "out").mkdir()
    cmd = [RELION_REFINE, "--i", "particles_unaligned.star", "--o", "out/run", "--ref", "truth.mrc", "--ini_high", 30,
           "--K", 1, "--iter", 0, "--ctf", "--particle_diameter", diam, "--dont_combine_weights_via_disc", "--j", 1,
           "--dont_check_norm", "--healpix_order", 1, "--offset_range", 3, "--offset_step", 3, "--random_seed", 1,
           "--zero_mask"]
    p = subprocess.run([str(a) for a in cmd], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    relion = starfile.read(tmp_path / "out" / "run_it000_model.star")["model_group_1"]["rlnSigma2Noise"].to_numpy()

    imgs = read_map(str(tmp_path / "stacks" / "particles_0000.mrcs"))[0][:n].astype(np.float32)
    assert imgs.shape == (n, N, N)
    geom = SliceGeometry(N, pad=2)
    sh = shell_of_points(geom)
    plan = {"origin_x": np.zeros(n), "origin_y": np.zeros(n)}
    X = masked_points(imgs, plan, slice(0, n), geom, apix, diam / (2 * apix))
    s, c = sigma2_from_images(X, sh, N // 2 + 1)
    ours = initial_noise(s, c, X.sum(axis=0, dtype=np.complex128) / n, sh) / N ** 4
    ratio = ours[1:N // 2] / relion[1:N // 2]
    assert np.all(np.abs(ratio - 1) < 0.01), ratio
    assert abs(ratio[4:].mean() - 1) < 0.0015, ratio[4:].mean()
    assert abs(ours[0] / relion[0] - 1) < 0.05


@pytest.mark.slow
def test_zero_mask_class3d_one_rank_equals_two_ranks(tmp_path):
    """class3d with --zero-mask (its default) on 1 and 2 ranks: the same poses and classes (sums over ranks change
    float rounding only: at least 97% identical), and its noise spectrum below --no-zero-mask's at high frequency
    (the mask keeps ~half of a box-32 image's area at the default 80% particle diameter)."""
    d = tmp_path / "data"
    r = mpi_em(["simulate", "--out", d, "--box", 32, "--n", 200, "--snr", 1.0, "--apix", 4.0, "--seed", 2,
                "--max-shift", 2], ranks=0)
    assert r.returncode == 0, r.stderr
    args = ["class3d", "--i", d / "particles_unaligned.star", "--ref", d / "truth.mrc", "--ini-high", 32, "--K", 2,
            "--iter", 2]
    for name, p, extra in (("p1", 1, []), ("p2", 2, ["--zero-mask"]), ("plain", 1, ["--no-zero-mask"])):
        r = mpi_em(args + ["--o", tmp_path / name] + extra, ranks=p)
        assert r.returncode == 0, r.stderr

    def poses(run):
        t = starfile.read(tmp_path / run / "run_data.star")["particles"]
        return t[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
                  "rlnClassNumber"]].to_numpy()

    same = np.all(np.abs(poses("p1") - poses("p2")) < 1e-3, axis=1).mean()
    assert same >= 0.97, same

    def noise(run):
        m = starfile.read(tmp_path / run / "run_it001_model.star")["model_optics_group_1"]
        return m["rlnSigma2Noise"].to_numpy()

    q = noise("p1")[8:15] / noise("plain")[8:15]
    assert np.all((q > 0.4) & (q < 0.8)), q
