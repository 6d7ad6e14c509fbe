"""`mpi-em mask` and `mpi-em postprocess`: known-truth checks of each step, and RELION's own programs
(`relion_mask_create`, `relion_postprocess`, Debian's relion 3.1.3) on the same inputs."""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import starfile

from conftest import mpi_em
from mpi_em import postprocess as pp
from mpi_em.fsc import fsc
from mpi_em.io import read_map, write_map
from mpi_em.masks import lowpass_map, threshold_mask
from mpi_em.simulate import phantom

needs_mask_create = pytest.mark.skipif(not shutil.which("relion_mask_create"),
                                       reason="relion_mask_create not installed (Debian: apt-get install relion)")
needs_postprocess = pytest.mark.skipif(not shutil.which("relion_postprocess"),
                                       reason="relion_postprocess not installed (Debian: apt-get install relion)")


def relion(args, cwd=None):
    r = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, f"{args[0]} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r


# ------------------------------------------------------------------------------------------------ mask
def brute_force_mask(vol, threshold, extend, width):
    """RELION's autoMask written from its definition, pair by pair (every voxel against every voxel of the cube
    around it), independently of the separable implementation."""
    m = vol >= threshold
    n = vol.shape[0]
    idx = np.argwhere(np.ones_like(m))
    ones = np.argwhere(m)

    def min_d2(targets, reach):
        d = np.full(len(idx), np.inf)
        for t in targets:
            diff = np.abs(idx - t)
            inside = (diff <= reach).all(axis=1)
            d[inside] = np.minimum(d[inside], (diff[inside] ** 2).sum(axis=1))
        return d.reshape(m.shape)

    if extend > 0:
        m = m | (min_d2(ones, int(np.ceil(extend))) < extend ** 2)
    elif extend < 0:
        m = m & ~(min_d2(np.argwhere(~m), int(np.ceil(-extend))) < extend ** 2)
    out = m.astype(np.float64)
    if width > 0:
        d2 = min_d2(np.argwhere(m), int(np.ceil(width)))
        edge = ~m & (d2 < width ** 2)
        out[edge] = 0.5 + 0.5 * np.cos(np.pi * np.sqrt(d2[edge]) / width)
    assert n == vol.shape[0]
    return out


@pytest.mark.parametrize("extend,width", [(0, 3), (2.5, 4), (-1.5, 2.2), (3, 0)])
def test_threshold_mask_is_relion_automask(extend, width):
    """The separable distance search gives exactly the pair-by-pair definition (extension, shrinking, edge)."""
    rng = np.random.default_rng(4)
    vol = np.zeros((14, 14, 14))
    for c in rng.integers(4, 10, size=(4, 3)):
        vol[tuple(c)] = 1.0
    vol[6:9, 5:8, 6:10] = 0.8
    got = threshold_mask(vol, 0.5, extend, width)
    want = brute_force_mask(vol, 0.5, extend, width)
    np.testing.assert_allclose(got, want, atol=1e-6)  # float32 output of the same cosine
    assert got.dtype == np.float32 and got.min() >= 0 and got.max() <= 1


@needs_mask_create
@pytest.mark.parametrize("lowpass", [0, 15.0])
def test_mask_matches_relion_mask_create(tmp_path, lowpass):
    """`mpi-em mask` and relion_mask_create on the same map. Same algorithm (threshold, extension within the cube
    of ceil(extend), raised cosine on the distance to the nearest 1-voxel), so the masks agree to float32 rounding
    of the cosine. With --lowpass the two FFTs differ by ~1e-7 relative: a voxel that close to the threshold could
    flip, hence at most 0.1% of voxels may differ there (none did when this was written)."""
    vol = phantom(40, seed=2).astype(np.float32)
    write_map(tmp_path / "map.mrc", vol, 2.5)
    thr = float(0.1 * vol.max())
    opts = ["--extend", 3, "--soft-edge", 5]
    rel = ["--extend_inimask", 3, "--width_soft_edge", 5]
    if lowpass:
        opts += ["--lowpass", lowpass]
        rel += ["--lowpass", lowpass, "--angpix", 2.5]
    r = mpi_em(["mask", "--i", tmp_path / "map.mrc", "--o", tmp_path / "ours.mrc", "--threshold", thr] + opts,
               ranks=0)
    assert r.returncode == 0, r.stderr
    relion(["relion_mask_create", "--i", tmp_path / "map.mrc", "--o", tmp_path / "relion.mrc", "--ini_threshold",
            thr] + rel)
    ours, a = read_map(tmp_path / "ours.mrc")
    theirs, _ = read_map(tmp_path / "relion.mrc")
    assert a == pytest.approx(2.5)
    assert 0.05 < ours.mean() < 0.9  # a mask with both inside and outside
    diff = np.abs(ours - theirs)
    if lowpass:
        assert (diff > 1e-5).mean() <= 1e-3
        assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] >= 0.999
    else:
        assert diff.max() <= 1e-6


def test_mask_bad_input(tmp_path):
    write_map(tmp_path / "map.mrc", np.zeros((16, 16, 16), np.float32), 2.0)
    r = mpi_em(["mask", "--i", tmp_path / "map.mrc", "--o", tmp_path / "m.mrc", "--threshold", 1], ranks=0)
    assert r.returncode == 2 and "map.mrc" in r.stderr and "threshold" in r.stderr
    assert not (tmp_path / "m.mrc").exists()


# ------------------------------------------------------------------------------------------ postprocess
def test_corrected_fsc_formula():
    fm = np.array([1.0, 0.9, 0.8, 0.6, 0.5, 0.3])
    fr = np.array([-1.0, 0.9, 0.5, 0.2, 0.1, 0.0])
    got = pp.corrected_fsc(fm, fr, randomize_at=2)
    np.testing.assert_allclose(got[:4], [1.0, 0.9, 0.8, 0.6])  # below randomize_at + 2: the masked FSC
    np.testing.assert_allclose(got[4:], [(0.5 - 0.1) / 0.9, 0.3])


def test_phase_randomisation_keeps_amplitudes_and_low_shells():
    rng = np.random.default_rng(0)
    vol = phantom(32, seed=1).astype(np.float64) + rng.normal(0, 0.01, (32, 32, 32))
    out = pp.randomize_phases_beyond(vol, 6, np.random.default_rng(1))
    F0, F1 = np.fft.rfftn(vol), np.fft.rfftn(out)
    r2 = np.rint(pp.radius_3d(32) ** 2)
    low = r2 < 36
    np.testing.assert_allclose(F1[low], F0[low], rtol=1e-9, atol=1e-9 * np.abs(F0).max())
    # amplitudes kept except where irfftn makes the kx = 0 and Nyquist planes Hermitian again
    inner = (r2 >= 36) & (np.arange(17) > 0) & (np.arange(17) < 16)
    np.testing.assert_allclose(np.abs(F1[inner]), np.abs(F0[inner]), rtol=1e-9)
    f = fsc(vol, out)
    assert np.all(f[:6] > 0.999) and np.abs(f[8:]).max() < 0.2


def test_guinier_fit_recovers_a_known_bfactor():
    """Halves = truth blurred by exp(-B/4 s^2) + weak independent noise (FSC ~ 1): the fitted B-factor of the
    blurred pair minus that of the unblurred pair is -B, the B-factor that undoes the blur (RELION's sign: the
    fitted B is 4x the Guinier slope and is applied as exp(-B/4 s^2)). The log of a product is a sum; within a shell
    exp(-B/4 s^2) varies by ~1%, which bounds the error."""
    n, apix, B = 48, 2.0, 150.0
    truth = phantom(n, seed=3).astype(np.float64)
    rng = np.random.default_rng(2)
    s2 = (pp.radius_3d(n) / (n * apix)) ** 2
    blurred = np.fft.irfftn(np.fft.rfftn(truth) * np.exp(-B / 4 * s2), s=truth.shape, axes=(0, 1, 2))

    def fitted(v):
        noise = 1e-4 * v.std()
        h1, h2 = v + rng.normal(0, noise, v.shape), v + rng.normal(0, noise, v.shape)
        r = pp.fsc_curves(h1, h2, None, apix)
        assert r.resolution == pytest.approx(2 * apix)
        return pp.sharpen(r, h1, h2, auto_bfac=True, fit_lowres=10.0, fit_highres=4.5).bfactor

    assert fitted(blurred) - fitted(truth) == pytest.approx(-B, rel=0.03)


def test_mtf_divides_the_map():
    """A constant MTF of 0.5 doubles the final map and leaves the B-factor alone (everything after it is linear
    or a log-slope)."""
    n, apix = 32, 3.0
    truth = phantom(n, seed=5).astype(np.float64)
    rng = np.random.default_rng(3)
    h1, h2 = truth + rng.normal(0, truth.std(), truth.shape), truth + rng.normal(0, truth.std(), truth.shape)
    mtf = pp.mtf_curve([0.0, 0.5], [0.5, 0.5], apix, n, apix)
    a = pp.sharpen(pp.fsc_curves(h1, h2, None, apix), h1, h2, fit_lowres=20.0, fit_highres=-1)
    b = pp.sharpen(pp.fsc_curves(h1, h2, None, apix), h1, h2, fit_lowres=20.0, fit_highres=-1, mtf=mtf)
    np.testing.assert_allclose(b.map, 2 * a.map, rtol=1e-5, atol=1e-6 * np.abs(a.map).max())
    assert b.bfactor == pytest.approx(a.bfactor, rel=1e-9)


@pytest.fixture(scope="module")
def half_maps(tmp_path_factory):
    """Half maps from `mpi-em simulate` + `mpirun -n 2 mpi-em reconstruct` (box 48, 2 Å/px, 2000 particles, SNR
    0.1: the gold-standard FSC falls at about 8 Å, Nyquist is 4 Å), and a mask from `mpi-em mask`."""
    d = tmp_path_factory.mktemp("postprocess")
    r = mpi_em(["simulate", "--out", d / "sim", "--box", 48, "--n", 2000, "--snr", 0.1, "--apix", 2.0,
                "--seed", 7], ranks=0)
    assert r.returncode == 0, r.stderr
    r = mpi_em(["reconstruct", "--i", d / "sim" / "particles.star", "--o", d / "rec"], ranks=2)
    assert r.returncode == 0, r.stderr
    avg, _ = read_map(d / "rec" / "map.mrc")
    thr = float(0.1 * lowpass_map(avg, 15.0, 2.0).max())
    r = mpi_em(["mask", "--i", d / "rec" / "map.mrc", "--o", d / "mask.mrc", "--threshold", thr, "--lowpass", 15,
                "--extend", 2, "--soft-edge", 5], ranks=0)
    assert r.returncode == 0, r.stderr
    return d


@pytest.fixture(scope="module")
def ours(half_maps):
    d = half_maps
    r = mpi_em(["postprocess", "--half1", d / "rec" / "half1.mrc", "--half2", d / "rec" / "half2.mrc", "--mask",
                d / "mask.mrc", "--auto-bfac", "--o", d / "pp"], ranks=2)
    assert r.returncode == 0, r.stderr
    return json.loads((d / "pp" / "run.json").read_text())


def test_postprocess_outputs(half_maps, ours):
    d = half_maps / "pp"
    for f in ("postprocess.mrc", "postprocess_masked.mrc", "postprocess.star", "postprocess_fsc.png",
              "postprocess_guinier.png", "run.json", "run.log"):
        assert (d / f).is_file(), f
    assert "final resolution" in (d / "run.log").read_text()
    star = starfile.read(d / "postprocess.star", always_dict=True)
    assert {"general", "fsc", "guinier"} <= set(star)
    t = star["fsc"]
    assert len(t) == 25
    n, apix = 48, 2.0
    assert ours["mask_used"] and ours["final_resolution"] < 10.0 and ours["final_resolution"] > 2 * apix
    i = ours["final_resolution_shell"]
    assert ours["final_resolution"] == pytest.approx(n * apix / i)
    true = t["rlnFourierShellCorrelationCorrected"].to_numpy()
    assert true[i] >= 0.143 and true[i + 1] < 0.143
    assert ours["bfactor_fit"]["highres"] == pytest.approx(ours["final_resolution"])
    assert ours["bfactor_fit"]["lowres"] <= 10.0


@pytest.mark.slow
@needs_postprocess
def test_postprocess_matches_relion_postprocess(half_maps, ours):
    """relion_postprocess on the same half maps and mask, the same B-factor fit range (10 Å to our final
    resolution; RELION keeps a shell when its resolution >= --autob_highres, so the limit is given a hair below
    ours) and the same low-pass.

    Deterministic parts agree to the STAR files' printed precision: the unmasked and masked FSC, the input Guinier
    plot, and, given RELION's own corrected FSC, our B-factor and sharpened map. The phase-randomised FSC uses
    other random numbers, so end to end the corrected-FSC resolution may differ by one shell and the B-factor (a
    slope through FSC-weighted amplitudes over 5 shells) by up to 10% (on this data the B-factor's spread over
    random seeds is ~7% for both programs, and the means over 8 and 6 seeds agree within 1%)."""
    d = half_maps
    n, apix = 48, 2.0
    res = ours["final_resolution"]
    relion(["relion_postprocess", "--i", d / "rec" / "half1.mrc", "--i2", d / "rec" / "half2.mrc", "--mask",
            d / "mask.mrc", "--angpix", apix, "--auto_bfac", "--autob_lowres", 10, "--autob_highres",
            f"{res - 1e-3:.4f}", "--low_pass", f"{res:.6f}", "--o", d / "relion"])
    theirs = starfile.read(d / "relion.star", always_dict=True)
    mine = starfile.read(d / "pp" / "postprocess.star", always_dict=True)
    for col in ("rlnFourierShellCorrelationUnmaskedMaps", "rlnFourierShellCorrelationMaskedMaps"):
        np.testing.assert_allclose(mine["fsc"][col], theirs["fsc"][col], atol=2e-5)
    np.testing.assert_allclose(mine["guinier"]["rlnLogAmplitudesOriginal"],
                               theirs["guinier"]["rlnLogAmplitudesOriginal"], atol=2e-5)
    g = theirs["general"]
    rel_res, rel_b = float(g["rlnFinalResolution"]), float(g["rlnBfactorUsedForSharpening"])

    # end to end
    assert abs(round(n * apix / rel_res) - ours["final_resolution_shell"]) <= 1
    assert ours["bfactor"] < 0 and abs(ours["bfactor"] - rel_b) <= 0.1 * abs(rel_b)

    # the sharpening chain given RELION's corrected FSC: the same B-factor and map
    h1, _ = read_map(d / "rec" / "half1.mrc")
    h2, _ = read_map(d / "rec" / "half2.mrc")
    r = pp.Result(box=n, pixel_size=apix, fsc_unmasked=None,
                  fsc_true=theirs["fsc"]["rlnFourierShellCorrelationCorrected"].to_numpy(), resolution=res)
    pp.sharpen(r, h1, h2, fit_lowres=10.0, fit_highres=res)
    assert r.bfactor == pytest.approx(rel_b, rel=1e-4)  # RELION's STAR holds 6 significant digits
    rmap, _ = read_map(d / "relion.mrc")
    assert np.abs(r.map - rmap).max() <= 1e-5 * np.abs(rmap).max()  # measured 3e-7: float32 maps


def test_sharpened_map_no_worse_against_truth(half_maps, ours):
    """FSC against the truth up to the final resolution: the sharpened, FSC-weighted map is no worse than the plain
    average of the half maps. Both are per-shell rescalings of the same coefficients except that exp(-B/4 s^2) and
    the low-pass edge vary inside a shell (radius +-0.5), hence 0.01."""
    d = half_maps
    truth, _ = read_map(d / "sim" / "truth.mrc")
    h1, _ = read_map(d / "rec" / "half1.mrc")
    h2, _ = read_map(d / "rec" / "half2.mrc")
    sharp, _ = read_map(d / "pp" / "postprocess.mrc")
    i = ours["final_resolution_shell"]
    f_sharp = fsc(sharp, truth)[1:i + 1]
    f_plain = fsc(0.5 * (h1 + h2), truth)[1:i + 1]
    assert np.all(f_sharp >= f_plain - 0.01), (f_sharp, f_plain)
    assert np.all(f_plain > 0.2)  # signal in every compared shell


def test_postprocess_bad_mask_ends_cleanly(half_maps, tmp_path):
    d = half_maps
    bad = read_map(d / "mask.mrc")[0] * 2.0
    write_map(tmp_path / "bad.mrc", bad, 2.0)
    r = mpi_em(["postprocess", "--half1", d / "rec" / "half1.mrc", "--half2", d / "rec" / "half2.mrc", "--mask",
                tmp_path / "bad.mrc", "--o", tmp_path / "out"], ranks=2)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("mpi-em: error")]
    assert len(lines) == 1 and "bad.mrc" in lines[0] and "field data" in lines[0]
    assert not (tmp_path / "out" / "postprocess.mrc").exists()


@pytest.mark.parametrize("case", ["shape", "nan"])
def test_postprocess_distributed_bad_input(half_maps, tmp_path, case):
    """Under mpirun -n 2 (the distributed path: headers checked on rank 0, rows read on every rank): a mask of
    another box, and a half map with a NaN in a y row that only rank 1 reads; exit 2, one line naming the file
    and the field, no map written."""
    d = half_maps
    half2, mask = d / "rec" / "half2.mrc", d / "mask.mrc"
    if case == "shape":
        mask = tmp_path / "bad.mrc"
        write_map(mask, np.ones((46, 46, 46), np.float32), 2.0)
        field, bad = "nx/ny/nz", mask
    else:
        vol = read_map(half2)[0]
        vol[10, 1, 7] = np.nan  # y = 1: rank 1's rows at P = 2
        half2 = tmp_path / "bad.mrc"
        write_map(half2, vol, 2.0)
        field, bad = "data", half2
    r = mpi_em(["postprocess", "--half1", d / "rec" / "half1.mrc", "--half2", half2, "--mask", mask, "--o",
                tmp_path / "out"], ranks=2)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("mpi-em: error")]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert str(bad) in lines[0] and f"field {field}" in lines[0], lines[0]
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".mrc")]


def test_postprocess_into_a_used_folder_needs_overwrite(tmp_path):
    """A second postprocess into the same folder is refused in one line naming --overwrite, which postprocess
    accepts (the output-folder protection applies to every job that writes run.json)."""
    d = tmp_path / "maps"
    d.mkdir()
    rng = np.random.default_rng(0)
    base = rng.normal(size=(32, 32, 32)).astype(np.float32)
    for k in (1, 2):
        write_map(str(d / f"h{k}.mrc"), base + 0.5 * rng.normal(size=base.shape).astype(np.float32), 3.0)
    write_map(str(d / "mask.mrc"), np.ones((32, 32, 32), np.float32), 3.0)
    args = ["postprocess", "--half1", d / "h1.mrc", "--half2", d / "h2.mrc", "--mask", d / "mask.mrc",
            "--o", tmp_path / "pp", "--adhoc-bfac", -50]
    assert mpi_em(args, ranks=0).returncode == 0
    r = mpi_em(args, ranks=0)
    assert r.returncode == 3 and "--overwrite" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = mpi_em(args + ["--overwrite"], ranks=0)
    assert r.returncode == 0, r.stderr
