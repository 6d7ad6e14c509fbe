"""refine3d / class3d with accumulators as owned kz planes (--owned-accumulators, mpi_em.em.model.OwnedAccumulators)
against the full local partial sums, in-process on every rank (run under `mpirun -n P python -m pytest --with-mpi
-m mpi tests/parallel`, P = 2 and 3: uneven splits of particles and planes).

Tolerance: the routed insertion scatter-adds the same contributions in another order than the full accumulators'
bincount and reduce-scatter, so the sums agree to float64 rounding; the maps are written as float32, so they agree
to float32 rounding (1e-5 of the map's largest value).
"""
import os
import tempfile

import numpy as np
import pytest


def _comm():
    from mpi4py import MPI
    return MPI.COMM_WORLD


@pytest.fixture(scope="module")
def dataset(shared_dir):
    comm = _comm()
    out = None
    if comm.rank == 0:
        from mpi_em.simulate import phantom, simulate_particles, write_dataset
        d = tempfile.mkdtemp(dir=shared_dir)
        vol = phantom(32, seed=4)
        sim = simulate_particles(vol, 60, 4.0, snr=1.0, seed=5, max_shift=2.0)
        star = write_dataset(d, vol, sim, 4.0, per_stack=25, start_resolution=32.0)
        out = (star, os.path.join(d, "start.mrc"))
    return comm.bcast(out, root=0)


def _run(mode, star, start, out, owned, extra=()):
    from mpi_em.cli import build_parser
    from mpi_em.jobs import em

    args = build_parser().parse_args([mode, "--i", star, "--ref", start, "--o", out, "--healpix-order", "1",
                                      "--ini-high", "16", "--batch", "16", "--owned-accumulators", owned,
                                      *extra])
    return em.run(args, _comm())  # the parser sets args.mode


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("mode,extra", [("refine3d", ("--iter", "1", "--max-order", "1")),
                                        ("class3d", ("--iter", "1", "--K", "2"))])
def test_owned_accumulators_give_the_same_maps(dataset, shared_dir, mode, extra):
    import mrcfile

    comm = _comm()
    star, start = dataset
    outs = comm.bcast(tempfile.mkdtemp(dir=shared_dir) if comm.rank == 0 else None, root=0)
    for owned in ("off", "on"):
        _run(mode, star, start, os.path.join(outs, owned), owned, extra)
    if comm.rank == 0:
        import json

        rec = {o: json.load(open(os.path.join(outs, o, "run.json")))["memory"] for o in ("off", "on")}
        assert rec["on"]["inputs"]["owned_accumulators"] and not rec["off"]["inputs"]["owned_accumulators"]
        # the modelled accumulators per rank: the owned planes (1/P of the volumes, the largest rank's share)
        assert rec["on"]["phases_bytes"]["E-step"]["accumulators"] < \
            rec["off"]["phases_bytes"]["E-step"]["accumulators"] / comm.size * 1.3
        maps = sorted(f for f in os.listdir(os.path.join(outs, "off")) if f.endswith(".mrc"))
        assert len(maps) >= 3
        for name in maps:
            a = mrcfile.read(os.path.join(outs, "off", name)).astype(np.float64)
            b = mrcfile.read(os.path.join(outs, "on", name)).astype(np.float64)
            assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max(), name
    comm.Barrier()


@pytest.mark.mpi(min_size=2)
def test_owned_accumulators_failure_on_one_rank_stops_every_rank(dataset, shared_dir, monkeypatch):
    """A batch failing on the last rank (its second batch: the other ranks are in a routed round, or in their
    empty or closing rounds) ends the E-step on every rank with the same RankFailed, nobody waits."""
    from mpi_em.distributed import RankFailed
    from mpi_em.em import steps

    comm = _comm()
    star, start = dataset
    calls = [0]
    real = steps.expectation_batch

    def failing(*a, **k):
        calls[0] += 1
        if comm.rank == comm.size - 1 and calls[0] == 2:
            raise ValueError("bad batch")
        return real(*a, **k)

    monkeypatch.setattr(steps, "expectation_batch", failing)
    outs = comm.bcast(tempfile.mkdtemp(dir=shared_dir) if comm.rank == 0 else None, root=0)
    with pytest.raises(RankFailed, match="bad batch"):
        _run("refine3d", star, start, os.path.join(outs, "r"), "on", ("--iter", "1", "--max-order", "1"))
    comm.Barrier()


@pytest.mark.mpi(min_size=2)
def test_default_batch_lowered_on_every_rank_alike():
    """The memory check's first step for --batch's default (batch_floor) on several ranks, logged on rank 0:
    every collective of the adaptation is entered by every rank (a rank-0-only one would hang here), and every
    rank takes the same batch and accumulators; the model only, nothing allocated (refine3d box 256 on GPU ranks,
    a 12 GB limit: the default's batch 256 lowered, the cache and full accumulators kept)."""
    import logging

    from mpi_em.memory import EMInputs, check, default_batch, estimate

    comm = _comm()
    inp = EMInputs("refine3d", 256, ranks=comm.size, batch=default_batch(256, "gpu"), n_particles=20000,
                   coarse_poses=4608, translations=49, device="gpu", cache_images=True)
    limit = 12 * 10 ** 9
    got = check(comm, inp, str(limit), log=logging.getLogger("mpi_em.test"), adapt="auto", cache="auto",
                batch_floor=64).inputs
    assert 64 <= got.batch < inp.batch and got.cache_images and not got.owned_accumulators
    assert estimate(got).total <= limit
    assert comm.allgather((got.batch, got.owned_accumulators, got.cache_images)) == \
        [(got.batch, False, True)] * comm.size
