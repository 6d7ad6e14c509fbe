"""Distributed `mpi-em postprocess` (pytest-mpi): under `mpirun -n P python -m pytest --with-mpi -m mpi
tests/parallel`, the job is executed on sub-communicators of 1, 2, ..., P ranks (the 1-rank one is the serial job) and
every output agrees: FSC curves, final resolution, B-factor, sharpened maps (float32 files), headers.

Tolerances: the distributed FFTs and the allreduced shell sums add in other orders than the whole-array ones,
so curves agree to 1e-10 (float64 rounding of shell sums) and maps to 1e-6 of their maximum (float32 output)."""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pytest


def _world():
    from mpi4py import MPI
    return MPI.COMM_WORLD


@pytest.fixture(scope="module")
def maps(shared_dir):
    """Box 30 (P = 3 owns 10 planes each; P = 2, 15: odd counts), two half maps of a phantom with independent
    noise, a soft mask from the phantom, and a flat MTF table."""
    comm = _world()
    d = None
    if comm.rank == 0:
        from mpi_em.io import write_map
        from mpi_em.masks import threshold_mask
        from mpi_em.simulate import phantom

        d = tempfile.mkdtemp(dir=shared_dir)
        n, apix = 30, 2.0
        truth = phantom(n, seed=2).astype(np.float64)
        rng = np.random.default_rng(3)
        for k in (1, 2):
            write_map(os.path.join(d, f"half{k}.mrc"), truth + rng.normal(0, 0.6 * truth.std(), truth.shape), apix)
        write_map(os.path.join(d, "mask.mrc"), threshold_mask(truth, 0.05 * truth.max(), 2, 3), apix)
        with open(os.path.join(d, "mtf.star"), "w") as f:
            f.write("data_\nloop_\n_rlnResolutionInversePixel\n_rlnMtfValue\n0.0 1.0\n0.25 0.8\n0.5 0.6\n")
    return comm.bcast(d, root=0)


def _run(d, out, comm, extra):
    from mpi_em.cli import build_parser
    from mpi_em.jobs import postprocess as job

    args = build_parser().parse_args(["postprocess", "--half1", os.path.join(d, "half1.mrc"), "--half2",
                                      os.path.join(d, "half2.mrc"), "--o", out] + extra)
    return job.run(args, comm)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("case", ["masked", "unmasked"])
def test_postprocess_same_for_every_number_of_ranks(maps, case):
    import mrcfile
    import starfile

    world = _world()
    extra = ["--auto-bfac", "--autob-lowres", "20"]
    if case == "masked":
        extra += ["--mask", os.path.join(maps, "mask.mrc"), "--mtf", os.path.join(maps, "mtf.star"), "--seed", "7"]
    results = {}
    for p in range(1, world.size + 1):
        sub = world.Split(0 if world.rank < p else 1, world.rank)
        out = os.path.join(maps, f"{case}_p{p}")
        if world.rank < p:
            summary = _run(maps, out, sub, extra)
            assert summary["final_resolution"] > 0
        sub.Free()
        world.Barrier()
        results[p] = out
    if world.rank != 0:
        return
    ref = results[1]
    js = json.load(open(os.path.join(ref, "run.json")))
    assert js["ranks"] == 1 and js["mask_used"] == (case == "masked"), js
    star0 = starfile.read(os.path.join(ref, "postprocess.star"), always_dict=True)
    names = ["postprocess.mrc"] + (["postprocess_masked.mrc"] if case == "masked" else [])
    for p, out in results.items():
        if p == 1:
            continue
        jp = json.load(open(os.path.join(out, "run.json")))
        assert jp["ranks"] == p
        assert jp["final_resolution_shell"] == js["final_resolution_shell"]
        assert jp["randomize_at_shell"] == js["randomize_at_shell"]
        assert jp["bfactor"] == pytest.approx(js["bfactor"], rel=1e-9, abs=1e-9)
        star = starfile.read(os.path.join(out, "postprocess.star"), always_dict=True)
        for block in ("fsc", "guinier"):
            for col in star0[block].columns:
                np.testing.assert_allclose(star[block][col], star0[block][col], rtol=1e-10, atol=1e-10,
                                           err_msg=f"{p} ranks: {block} {col}")
        for name in names:
            with mrcfile.open(os.path.join(ref, name)) as a, mrcfile.open(os.path.join(out, name)) as b:
                assert b.data.shape == a.data.shape and b.data.dtype == np.float32
                assert float(b.voxel_size.x) == pytest.approx(float(a.voxel_size.x))
                scale = float(np.abs(a.data).max())
                np.testing.assert_allclose(b.data, a.data, rtol=0, atol=1e-6 * scale, err_msg=f"{p} ranks: {name}")
                for f in ("dmin", "dmax", "dmean", "rms"):
                    assert float(b.header[f]) == pytest.approx(float(a.header[f]), rel=1e-5, abs=1e-6 * scale), f
        assert not [f for f in os.listdir(out) if ".tmp-" in f]
    if case == "masked":  # the phase randomisation did something: the corrected FSC differs from the masked one
        f = star0["fsc"]
        assert np.abs(f["rlnFourierShellCorrelationCorrected"] - f["rlnFourierShellCorrelationMaskedMaps"]).max() > 0.01


@pytest.mark.mpi(min_size=2)
def test_slabs_transforms_equal_whole_array_ones():
    """postprocess.Slabs at the world's size: rfft / irfft / the phase randomisation of a rank's rows equal
    the whole-array results (numpy's rfftn, irfftn, and Slabs on one process) at its kz planes / y rows."""
    from mpi_em.postprocess import Slabs

    world = _world()
    n = 22
    x = np.random.default_rng(0).normal(size=(n, n, n))
    whole, L = Slabs(None, n), Slabs(world, n)
    rows = L.rows
    F = L.rfft(x[:, rows, :])
    Fw = np.fft.rfftn(x)
    np.testing.assert_allclose(F, Fw[rows], rtol=0, atol=1e-12 * np.abs(Fw).max())
    G = Fw * np.exp(1j * np.random.default_rng(1).uniform(0, 2 * np.pi, Fw.shape))  # not Hermitian at kx = 0
    np.testing.assert_allclose(L.irfft(G[rows]), np.fft.irfftn(G, s=x.shape, axes=(0, 1, 2))[:, rows, :],
                               rtol=0, atol=1e-13 * np.abs(x).max() * n)
    np.testing.assert_allclose(L.randomize_phases(x[:, rows, :], 5, 3, 2),
                               whole.randomize_phases(x, 5, 3, 2)[:, rows, :], rtol=0, atol=1e-12 * np.abs(x).max())
    c = L.fsc(F, F * 0.5 + 1)
    np.testing.assert_allclose(c, whole.fsc(Fw, Fw * 0.5 + 1), rtol=0, atol=1e-12)
