"""RELION as the reference implementation: data made by RELION's own programs, and our files read by RELION.

Our simulator shares our conventions, so a convention error (origin sign, Euler angles, CTF, optics groups) passes
every test written against it; these tests use Debian's `relion` package (3.1.3: `relion_project`,
`relion_reconstruct`). `tests/run.sh` installs it where it can (root + apt-get); elsewhere they skip, saying why.
"""
import importlib.metadata
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import starfile

from conftest import MPIRUN, mpi_em
from mpi_em.fsc import fsc
from mpi_em.io.mrc import read_map

RELION = shutil.which("relion_project") and shutil.which("relion_reconstruct")
needs_relion = pytest.mark.skipif(not RELION, reason="RELION not installed (Debian: apt-get install relion; "
                                                     "tests/run.sh installs it where it has root)")
BOX, APIX = 48, 3.0  # the RELION-projected set (box, Å per pixel)


def relion(args, cwd):
    """A serial RELION program, started in ``cwd``; its own output shown only on failure."""
    r = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, f"{args[0]} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r


def fsc_to_truth(path, truth):
    """FSC per shell of the map at ``path`` against the truth."""
    return fsc(read_map(str(path))[0].astype(np.float64), truth)


def shell(fraction):
    """The last integer shell at ``fraction`` of Nyquist."""
    return int(np.floor(fraction * BOX / 2))


@pytest.fixture(scope="module")
def truth_set(tmp_path_factory):
    """Our phantom and poses (box 48, 3 Å/px, 1000 particles, origins up to 4 px), noise-free."""
    d = tmp_path_factory.mktemp("relion_truth")
    r = mpi_em(["simulate", "--out", d, "--box", BOX, "--n", 1000, "--snr", 1e6, "--apix", APIX,
                "--max-shift", 4, "--seed", 3], ranks=0)
    assert r.returncode == 0, r.stderr
    return d


@pytest.fixture(scope="module")
def relion_projected(truth_set):
    """RELION's `relion_project --ctf` of the truth with the poses of ``truth_set``, in two optics groups (300 kV,
    Cs 2.7, Q0 0.1 and 200 kV, Cs 1.4, Q0 0.07), astigmatism up to 1500 Å, phase shifts 0-90°, B-factors 0-60 Å²,
    origins in rlnOriginXAngst/YAngst: noise-free particles none of our code made."""
    d = truth_set
    two_optics_groups(d / "particles.star", d / "poses_two_groups.star", seed=11)
    relion([shutil.which("relion_project"), "--i", "truth.mrc", "--o", "relion_proj", "--ang",
            "poses_two_groups.star", "--ctf", "--angpix", APIX], cwd=d)
    return d / "relion_proj.star"


def two_optics_groups(star_in, star_out, seed):
    """Our simulated poses and CTFs rewritten as two optics groups (300 kV, Cs 2.7, Q0 0.1 and 200 kV, Cs 1.4,
    Q0 0.07; odd and even particles), with astigmatism up to 1500 Å, phase shifts 0-90° and B-factors 0-60 Å²."""
    tables = starfile.read(star_in, always_dict=True)
    optics, parts = tables["optics"], tables["particles"]
    second = optics.copy()
    second["rlnOpticsGroup"], second["rlnOpticsGroupName"] = 2, "opticsGroup2"
    second["rlnVoltage"], second["rlnSphericalAberration"], second["rlnAmplitudeContrast"] = 200.0, 1.4, 0.07
    optics = pd.concat([optics, second], ignore_index=True)
    rng = np.random.default_rng(seed)
    n = len(parts)
    parts["rlnOpticsGroup"] = np.where(np.arange(n) % 2 == 0, 1, 2)
    parts["rlnPhaseShift"] = rng.uniform(0, 90, n)
    parts["rlnCtfBfactor"] = rng.uniform(0, 60, n)
    parts["rlnDefocusV"] = parts["rlnDefocusU"] - rng.uniform(0, 1500, n)
    starfile.write({"optics": optics, "particles": parts}, star_out, overwrite=True)


def test_mpi_of_the_tests_is_the_venvs_mpich():
    """Debian's relion package puts Open MPI into /usr/bin: the MPI tests must still use the MPI that mpi4py was
    installed with (PyPI's MPICH through the `mpi` extra), both the launcher and the library."""
    try:
        importlib.metadata.version("mpich")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("mpi4py uses a system MPI here (no `mpich` wheel installed)")
    assert MPIRUN is not None and os.path.dirname(MPIRUN) == os.path.dirname(sys.executable), MPIRUN
    code = ("from mpi4py import MPI; c = MPI.COMM_WORLD; "
            "print(f'<{c.size}:{MPI.Get_library_version().startswith(\"MPICH\")}>', flush=True)")
    r = subprocess.run([MPIRUN, "-n", "2", sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("<2:True>") == 2, r.stdout  # two ranks of one job, each with MPICH's library


@pytest.mark.slow
@needs_relion
def test_relion_projected_particles_reconstruct_to_the_truth(relion_projected, tmp_path):
    """RELION's projections (origin sign, Euler angles, astigmatic CTF with phase shift and B-factor, two optics
    groups) reconstructed by `mpi-em reconstruct` on 2 ranks: FSC vs truth >= 0.99 up to 0.9 Nyquist, as
    RELION's own reconstruction of the same particles (with the origins' sign reversed it fell to -0.71 at shell
    5; without RELION's soft mask outside the sphere of diameter N, the aliasing of trilinear insertion that the
    gridding correction amplifies in the box corners held it at 0.96 at 0.9 Nyquist and 0.84 at shell N/2 - 1)."""
    truth = read_map(str(relion_projected.parent / "truth.mrc"))[0].astype(np.float64)
    r = mpi_em(["reconstruct", "--i", relion_projected, "--o", tmp_path / "rec"], ranks=2)
    assert r.returncode == 0, r.stderr
    ours = fsc_to_truth(tmp_path / "rec" / "map.mrc", truth)
    assert ours[1:shell(0.9) + 1].min() >= 0.99, np.round(ours, 3)
    relion([shutil.which("relion_reconstruct"), "--i", relion_projected.name, "--o", tmp_path / "relion.mrc",
            "--ctf", "--angpix", APIX], cwd=relion_projected.parent)
    theirs = fsc_to_truth(tmp_path / "relion.mrc", truth)
    assert theirs[1:shell(0.9) + 1].min() >= 0.99, np.round(theirs, 3)


@pytest.mark.slow
@needs_relion
def test_relion_reconstructs_our_simulated_particles(truth_set, tmp_path):
    """`mpi-em simulate`'s STAR and stacks read by `relion_reconstruct --ctf` give the truth: RELION reads our
    origins, angles, CTF columns and MRC stacks as we meant them. Our simulator's projections lose accuracy near
    Nyquist (trilinear interpolation; RELION reconstructs RELION's own projections to 0.99 at 0.9 Nyquist), so
    the bound is 0.98 up to 3/4 Nyquist; any convention error gives far less (a sign error: FSC < 0 at 1/4)."""
    truth = read_map(str(truth_set / "truth.mrc"))[0].astype(np.float64)
    relion([shutil.which("relion_reconstruct"), "--i", "particles.star", "--o", tmp_path / "relion.mrc",
            "--ctf", "--angpix", APIX], cwd=truth_set)
    theirs = fsc_to_truth(tmp_path / "relion.mrc", truth)
    assert theirs[1:shell(0.75) + 1].min() >= 0.98, np.round(theirs, 3)


def resolution_shell(curve, threshold=0.5):
    """The fractional shell where ``curve`` first falls below ``threshold`` (linear between shells)."""
    for i in range(1, len(curve)):
        if curve[i] < threshold:
            return i - 1 + (curve[i - 1] - threshold) / (curve[i - 1] - curve[i])
    return float(len(curve) - 1)


@pytest.mark.slow
@needs_relion
def test_relion_refine_poses_reconstruct_as_relion_does(relion_projected, tmp_path):
    """A short `relion_refine` run (3D classification, K = 1, one iteration, healpix order 1) on RELION's own
    particles writes a `_data.star` of RELION 3.1 (its extra columns, its origins and angles); `mpi-em
    reconstruct` of it reaches the same map-vs-truth resolution (FSC 0.5) as `relion_reconstruct` of it, within
    one Fourier shell."""
    d = relion_projected.parent
    tables = starfile.read(relion_projected, always_dict=True)
    starfile.write({"optics": tables["optics"], "particles": tables["particles"].iloc[:200]},
                   d / "relion_proj_200.star", overwrite=True)
    out = tmp_path / "rr"
    out.mkdir()
    relion([shutil.which("relion_refine"), "--i", "relion_proj_200.star", "--o", out / "run", "--ref", "truth.mrc",
            "--ini_high", 12, "--K", 1, "--iter", 1, "--healpix_order", 1, "--offset_range", 2, "--offset_step", 1,
            "--ctf", "--particle_diameter", 120, "--tau2_fudge", 4, "--pad", 2, "--j", 1, "--firstiter_cc",
            "--random_seed", 1], cwd=d)
    data = out / "run_it001_data.star"
    truth = read_map(str(d / "truth.mrc"))[0].astype(np.float64)
    r = mpi_em(["reconstruct", "--i", data, "--o", tmp_path / "rec"], ranks=2, cwd=d)
    assert r.returncode == 0, r.stderr
    relion([shutil.which("relion_reconstruct"), "--i", data, "--o", tmp_path / "relion.mrc", "--ctf",
            "--angpix", APIX], cwd=d)
    ours = resolution_shell(fsc_to_truth(tmp_path / "rec" / "map.mrc", truth))
    theirs = resolution_shell(fsc_to_truth(tmp_path / "relion.mrc", truth))
    assert abs(ours - theirs) <= 1.0, (ours, theirs)


@pytest.mark.slow
@needs_relion
def test_relion_reconstructs_our_refine3d_output(tmp_path):
    """`mpi-em refine3d`'s `run_data.star` (our poses and origins, image names rebased to the output folder) read
    by `relion_reconstruct`: RELION's map of our poses is as close to the truth (FSC 0.5) as our own final map,
    within one Fourier shell (our map averages over the posteriors, RELION's takes the best pose; a sign or angle
    error in what we write moves RELION's map many shells away)."""
    d = tmp_path / "data"
    r = mpi_em(["simulate", "--out", d, "--box", 32, "--n", 300, "--snr", 1.0, "--apix", 4.0, "--seed", 2,
                "--max-shift", 2], ranks=0)
    assert r.returncode == 0, r.stderr
    truth = read_map(str(d / "truth.mrc"))[0].astype(np.float64)
    r = mpi_em(["refine3d", "--i", d / "particles_unaligned.star", "--ref", d / "truth.mrc", "--ini-high", 32,
                "--o", tmp_path / "ref", "--max-order", 2, "--iter", 2], ranks=1)
    assert r.returncode == 0, r.stderr
    relion([shutil.which("relion_reconstruct"), "--i", "run_data.star", "--o", tmp_path / "relion.mrc", "--ctf",
            "--angpix", 4.0], cwd=tmp_path / "ref")
    ours = fsc(read_map(str(tmp_path / "ref" / "run_class001.mrc"))[0].astype(np.float64), truth)
    theirs = fsc_to_truth(tmp_path / "relion.mrc", truth)
    assert abs(resolution_shell(ours) - resolution_shell(theirs)) <= 1.0, (np.round(ours, 3), np.round(theirs, 3))


def _class3d_against_relion(d, out, ini_high, iters, diameter, relion_offset_step, ours_extra):
    """Our class3d (one rank) and RELION 3.1.3's 3D classification (`relion_refine --ref`) of the particles in ``d``
    from ``d/start.mrc``, both K = 2, HEALPix order 1, offset range 3 px, ``ini_high`` Å, ``iters`` iterations
    (RELION: T = 4, the particle ``diameter``, --pad 2, C1, its coarse offset step ``relion_offset_step``; ours: fine
    step 1 and ``ours_extra``): ours in out/ours, RELION's in out/rel."""
    r = mpi_em(["class3d", "--i", d / "particles_unaligned.star", "--ref", d / "start.mrc", "--ini-high", ini_high,
                "--K", 2, "--iter", iters, "--healpix-order", 1, "--offset-range", 3, "--offset-step", 1,
                *ours_extra, "--o", out / "ours"], ranks=1)
    assert r.returncode == 0, r.stderr
    (out / "rel").mkdir()
    relion([shutil.which("relion_refine"), "--i", "particles_unaligned.star", "--o", out / "rel" / "run",
            "--ref", "start.mrc", "--ini_high", ini_high, "--K", 2, "--iter", iters, "--tau2_fudge", 4,
            "--particle_diameter", diameter, "--healpix_order", 1, "--offset_range", 3, "--offset_step",
            relion_offset_step, "--sym", "C1", "--zero_mask", "--flatten_solvent", "--ctf",
            "--dont_combine_weights_via_disc", "--j", 1, "--pad", 2, "--random_seed", 1], cwd=d)


@pytest.mark.slow
@needs_relion
def test_class3d_reports_the_resolution_relion_reports(tmp_path):
    """class3d's signal prior is RELION's (pad^3 x T x the power of the references the E-step used), so on the same
    data, start and sampling its reported resolution after 3 iterations is RELION 3.1.3's (`relion_refine`, K = 2)
    within 2 Fourier shells (RELION steps one shell back from the first below data-vs-prior 1; the two programs'
    alignments differ). Box 32, 4 Å/px, two conformations at SNR 0.5, start = their mean low-passed to 16 Å:
    measured RELION 18.3 Å (shell 7), ours 16.0 Å (shell 8); with tau^2 from the maps' own power (noise included)
    ours reported 8.5 Å (shell 15) for maps 15 Å from the truth (benchmarks/results/class3d-prior/). And our rule
    for reading a resolution off the data-vs-prior SSNR (mpi_em.em.classes.data_vs_prior_shells, at least shell 5),
    applied to RELION's own curves (rlnSsnrMap of each class in its model STARs), gives RELION's reported resolution
    in every iteration, shell for shell (an off-by-one, the last shell past a drop, or another floor would not)."""
    d = tmp_path / "conf"
    r = mpi_em(["simulate", "--out", d, "--box", 32, "--n", 600, "--snr", 0.5, "--apix", 4.0, "--conformations", 2,
                "--seed", 2, "--start-lowpass", 16], ranks=0)
    assert r.returncode == 0, r.stderr
    _class3d_against_relion(d, tmp_path, 16, 3, 102.4, 1, ["--tau2-fudge", 4])

    def shell_of(model):
        general = starfile.read(model, always_dict=True)["model_general"]  # RELION's: a key-value block
        res = float(np.ravel(general["rlnCurrentResolution"])[0])
        return 32 * 4.0 / res

    ours, theirs = shell_of(tmp_path / "ours" / "run_it003_model.star"), shell_of(tmp_path / "rel" / "run_it003_model.star")
    print(f"reported resolution after 3 iterations: ours shell {ours:.1f}, RELION's {theirs:.1f}")
    assert abs(ours - theirs) <= 2.0, (ours, theirs)
    # the rule that reads a resolution from the data-vs-prior SSNR, on RELION's own curves (its model STAR's
    # rlnSsnrMap per class, every iteration): our rule gives RELION's rlnCurrentResolution, shell for shell, and
    # each class's rlnEstimatedResolution where RELION's run starts at shell 0
    from mpi_em.em.classes import data_vs_prior_shells
    from mpi_em.em.schedule import MINRES_MAP

    for it in (1, 2, 3):
        m = starfile.read(tmp_path / "rel" / f"run_it{it:03d}_model.star", always_dict=True)
        ssnr = np.stack([m[f"model_class_{k}"]["rlnSsnrMap"].to_numpy() for k in (1, 2)])
        got = max(int(data_vs_prior_shells(ssnr).max()), MINRES_MAP)
        assert got == round(shell_of(tmp_path / "rel" / f"run_it{it:03d}_model.star")), (it, got, ssnr)
        est = m["model_classes"]["rlnEstimatedResolution"].to_numpy()
        for k in (0, 1):
            if ssnr[k, 0] >= 1.0:
                assert 32 * 4.0 / est[k] == pytest.approx(data_vs_prior_shells(ssnr[k])[0]), (it, k, est, ssnr[k])


@pytest.mark.slow
@needs_relion
def test_class3d_first_image_size_is_relions(tmp_path):
    """class3d's first current image size is RELION's, against RELION 3.1.3's 3D classification (`relion_refine
    --ref`, K = 2, one iteration) of the same particles from the same start (box 64, 2.5 Å/px, 300 particles, SNR
    0.2, the truth low-passed to 30 Å, --ini-high 30): RELION takes the start's shell ROUND(64 x 2.5 / 30) = 5 as
    its resolution before the first iteration (updateCurrentResolution at iteration 0) and grows the size by
    --incr_size 10 (updateImageSizeAndResolutionPointers): 2 x (5 + 10) = 30, the size its model STAR of iteration
    1 holds. Ours with class3d's default --incr-size (10) is the same; before 2026-12-05 it was the start's shell
    rounded up plus 2, 2 x (6 + 2) = 16, whatever --incr-size. The later sizes follow RELION's rule from the
    reported resolution (checked on RELION's own curves for class2d in test_class2d_image_sizes_are_relions)."""
    box, apix = 64, 2.5
    d = tmp_path / "data"
    r = mpi_em(["simulate", "--out", d, "--box", box, "--n", 300, "--snr", 0.2, "--apix", apix, "--seed", 5,
                "--start-lowpass", 30], ranks=0)
    assert r.returncode == 0, r.stderr
    _class3d_against_relion(d, tmp_path, 30, 1, 120, 2, ["--particle-diameter", 120])

    def size(model):
        return int(float(np.ravel(starfile.read(model, always_dict=True)["model_general"]["rlnCurrentImageSize"])[0]))

    ours, theirs = size(tmp_path / "ours" / "run_it001_model.star"), size(tmp_path / "rel" / "run_it001_model.star")
    print(f"first current image size: ours {ours}, RELION's {theirs}")
    assert ours == theirs == 30, (ours, theirs)


@pytest.mark.slow
@needs_relion
def test_class2d_image_sizes_are_relions(tmp_path):
    """class2d's current image size per iteration is RELION's, against RELION 3.1.3's reference-free 2D
    classification (`relion_refine` without --ref, K = 4, 4 iterations) of the same particles (box 64, 2.5 Å/px,
    600 particles, SNR 0.2). RELION low-pass filters its first references at 0.07 of the sampling frequency and
    takes that shell, round(0.07 x 64) = 4, as the first resolution (40 Å in its log): the first size is
    2 x (4 + --incr_size 10) = 28. Ours (mpi_em.em.classes.first_shell_2d, with --incr-size 10) is the same; our
    class2d before 2026-12-05 started at size 32 (r = box / 4) whatever the options. Each later RELION size is what
    our schedule (mpi_em.em.schedule.update_schedule: the resolution's shell from the data-vs-prior curves plus 10,
    recomputed every iteration) gives from RELION's own curves of the iteration before (rlnSsnrMap per class), size
    for size; a size that never shrinks (ours until 2026-12-05: 48 in iteration 3), another floor or another margin
    would not (RELION's model STAR holds the size the iteration used, as ours now does). Measured: RELION 28, 48,
    34, 44."""
    from types import SimpleNamespace

    from mpi_em.em.schedule import update_schedule
    from mpi_em.em.state import MODES, EMState
    from mpi_em.em.classes import first_shell_2d

    box, apix = 64, 2.5
    d = tmp_path / "data"
    r = mpi_em(["simulate", "--out", d, "--box", box, "--n", 600, "--snr", 0.2, "--apix", apix, "--seed", 5,
                "--domains", 4], ranks=0)
    assert r.returncode == 0, r.stderr
    r = mpi_em(["class2d", "--i", d / "particles_unaligned.star", "--o", tmp_path / "ours", "--K", 4, "--iter", 1,
                "--incr-size", 10, "--particle-diameter", 120], ranks=1)
    assert r.returncode == 0, r.stderr
    (tmp_path / "rel").mkdir()
    out = relion([shutil.which("relion_refine"), "--i", "particles_unaligned.star", "--o", tmp_path / "rel" / "run",
                  "--K", 4, "--iter", 4, "--tau2_fudge", 2, "--particle_diameter", 120, "--psi_step", 10,
                  "--offset_range", 3, "--offset_step", 1, "--zero_mask", "--flatten_solvent", "--ctf",
                  "--dont_combine_weights_via_disc", "--j", 1, "--pad", 2, "--random_seed", 1], cwd=d).stdout

    def model(path):
        return starfile.read(path, always_dict=True)

    def general(m, key):
        return float(np.ravel(m["model_general"][key])[0])

    import re

    first = float(re.search(r"CurrentResolution= *([0-9.]+) Angstroms", out).group(1))  # iteration 1's (its log)
    assert round(box * apix / first) == first_shell_2d(box) == 4, first
    theirs = [int(general(model(tmp_path / "rel" / f"run_it{it:03d}_model.star"), "rlnCurrentImageSize"))
              for it in range(1, 5)]
    ours = int(general(model(tmp_path / "ours" / "run_it001_model.star"), "rlnCurrentImageSize"))
    print(f"RELION's sizes in iterations 1-4: {theirs}; ours in iteration 1: {ours}")
    assert theirs[0] == ours == 28, (theirs, ours)
    state = EMState(r_cur=theirs[0] / 2)
    for it in (1, 2, 3):  # our schedule after each iteration, fed RELION's data-vs-prior curves
        m = model(tmp_path / "rel" / f"run_it{it:03d}_model.star")
        ssnr = np.stack([m[f"model_class_{k}"]["rlnSsnrMap"].to_numpy() for k in range(1, 5)])
        update_schedule(state, {"tau2": ssnr, "mean_w": np.ones_like(ssnr)}, MODES["class2d"],
                        SimpleNamespace(incr_size=10), box, apix, None)
        assert 2 * state.r_cur == theirs[it], (it, state.r_cur, theirs)
