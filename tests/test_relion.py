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
                                                     "tests/run.sh installs it when run as root)")
BOX, APIX = 48, 3.0


def relion(args, cwd):
    """Run a RELION program (serial) in ``cwd``; its own output only on failure."""
    r = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, f"{args[0]} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r


def fsc_to_truth(path, truth):
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
