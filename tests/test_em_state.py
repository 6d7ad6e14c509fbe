"""The EM jobs' state: saved into a checkpoint and loaded back unchanged; checkpoints of earlier versions brought
up to date in EMState.load (options that did not exist, translational sampling, the origin sign)."""
import json
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from mpi_em.em.state import MODES, PER_PARTICLE, EMState
from mpi_em.errors import InputError


def _saved(tmp_path, rng):
    mode = MODES["refine3d"]
    args = SimpleNamespace(healpix_order=2, ini_high=30.0, offset_range=3.0, offset_step=1.0, local=False)
    state = EMState.initial(args, mode, 32, 4.0, 1, ref=rng.normal(size=(32, 32, 32)).astype(np.float32))
    state.sigma2 = rng.uniform(1, 2, 17)
    state.resolution, state.ang_change, state.class_history = [20.0, 15.5], [12.0, 3.5], [[1.0], [1.0]]
    state.iter, state.order, state.offset_step, state.accuracy = 2, 3, 0.75, 2.25
    state.args = {"offset_step": 1.0, "offset_range": 3.0, "folds": 4, "refine_offsets": True}
    n = 10
    particles = {k: rng.normal(size=n) for k in PER_PARTICLE}
    particles["half"] = rng.integers(1, 3, n)
    state.save(str(tmp_path), 2, mode, particles, 1, {"path": "/data/particles.star", "n": n})
    return mode, state, particles


def test_state_round_trip(tmp_path, rng):
    mode, state, particles = _saved(tmp_path, rng)
    ptr, back, parts = EMState.load(str(tmp_path), mode)
    assert ptr["iteration"] == 2 and ptr["input"]["n"] == 10 and ptr["args"]["folds"] == 4
    for k in EMState.SCALARS:
        assert getattr(back, k) == getattr(state, k), k
    assert np.array_equal(back.maps, state.maps) and np.array_equal(back.sigma2, state.sigma2)
    assert back.resolution == state.resolution and back.class_history == state.class_history
    assert back.references is None
    for k, v in particles.items():
        assert np.array_equal(parts[k], v), k
    with pytest.raises(InputError, match="not class3d"):
        EMState.load(str(tmp_path), MODES["class3d"])


def test_old_checkpoint_is_brought_up_to_date(tmp_path, rng):
    """Written before --folds / --refine-offsets / --solvent-mask, before the translations were refined during
    the run, and with the old origin sign: the run's options of then, the options' translation grid, and RELION's
    origins (the negation of the stored ones)."""
    mode, state, particles = _saved(tmp_path, rng)
    ptr = json.load(open(tmp_path / "checkpoint.json"))
    for k in ("folds", "refine_offsets"):
        del ptr["args"][k]
    ptr["args"]["offset_step"], ptr["args"]["offset_range"] = 2.0, 5.0
    json.dump(ptr, open(tmp_path / "checkpoint.json", "w"))
    with h5py.File(tmp_path / ptr["checkpoint"], "r+") as f:
        scal = json.loads(f.attrs["state"])
        for k in ("origin_rule", "offset_step", "offset_range", "accuracy_trans", "offset_change", "perturb"):
            del scal[k]
        f.attrs["state"] = json.dumps(scal)
    ptr, back, parts = EMState.load(str(tmp_path), mode)
    assert ptr["args"]["folds"] == 1 and ptr["args"]["refine_offsets"] is False and ptr["args"]["solvent_mask"] is None
    assert (back.offset_step, back.offset_range) == (2.0, 5.0)
    assert (back.accuracy_trans, back.offset_change, back.perturb) == (0.0, 0.0, 0.0)
    assert np.array_equal(parts["origin_x"], -particles["origin_x"])
    assert np.array_equal(parts["origin_y"], -particles["origin_y"])
    assert np.array_equal(parts["rot"], particles["rot"]) and back.order == state.order


@pytest.mark.parametrize("job,order,local_from,flag,expected", [
    ("refine3d", 2, 4, False, False), ("refine3d", 4, 4, False, True), ("refine3d", 5, 4, False, True),
    ("class3d", 4, 4, False, False), ("class3d", 2, 4, True, True)])
def test_local_searches_from_the_start(rng, job, order, local_from, flag, expected):
    """refine3d started at an order at or past --local-from-order searches locally around the input poses from
    its first iteration (a continued auto-refine); below it, globally; class3d only with --local."""
    args = SimpleNamespace(healpix_order=order, local_from_order=local_from, ini_high=30.0, offset_range=3.0,
                           offset_step=1.0, local=flag)
    state = EMState.initial(args, MODES[job], 32, 4.0, 1 if job == "refine3d" else 2,
                            ref=rng.normal(size=(32, 32, 32)).astype(np.float32))
    assert state.local is expected


@pytest.mark.parametrize("job", ["refine3d", "class3d", "class2d"])
def test_checkpoint_holds_float32_maps_by_reference_to_the_iterations_map_files(tmp_path, rng, job):
    """An iteration's float32 maps are in its map files (run_itNNN_*.mrc / _classes.mrcs): the checkpoint records
    their names and CRC-32, not a second copy, and loads the same maps bit for bit from them; a map file changed or
    removed after the checkpoint was written is an error naming it; maps of another dtype stay in the checkpoint."""
    import os

    from mpi_em.em.outputs import map_files
    from mpi_em.io import write_map, write_stack

    mode, K = MODES[job], 3
    shape = (K, 96, 96) if mode.dim == 2 else ((2,) if mode.gold else (K,)) + (24, 24, 24)
    state = EMState(maps=rng.normal(size=shape).astype(np.float32), sigma2=np.ones(13), class_prior=np.full(K, 1 / K),
                    resolution=[9.0], iter=4)
    state.args = {"offset_step": 1.0, "offset_range": 3.0}
    particles = {k: rng.normal(size=6) for k in PER_PARTICLE}
    particles["half"] = rng.integers(1, 3, 6)
    files = map_files("run_it004", mode, shape[0])
    assert len(files) == (1 if mode.dim == 2 else shape[0]) and files[0].startswith("run_it004_")
    if mode.dim == 2:
        write_stack(tmp_path / files[0], state.maps, 2.0)
    else:
        for f, v in zip(files, state.maps):
            write_map(tmp_path / f, v, 2.0)
    state.save(str(tmp_path), 4, mode, particles, K, map_files=files)
    ck = tmp_path / "run_it004_checkpoint.h5"
    with h5py.File(ck, "r") as h:
        assert "maps" not in h and json.loads(h.attrs["maps_files"])["files"] == files
    assert os.path.getsize(ck) < state.maps.nbytes / 4
    _, back, _ = EMState.load(str(tmp_path), mode)
    assert back.maps.dtype == np.float32 and np.array_equal(back.maps, state.maps)

    last = tmp_path / files[-1]
    good = last.read_bytes()
    changed = bytearray(good)
    changed[-7] ^= 0x10                     # one bit of the last voxel
    last.write_bytes(bytes(changed))
    with pytest.raises(InputError, match="not those the checkpoint run_it004_checkpoint.h5 .*iteration 4"):
        EMState.load(str(tmp_path), mode)
    last.unlink()
    with pytest.raises(InputError, match=f"{files[-1]}.*missing: the checkpoint run_it004_checkpoint.h5"):
        EMState.load(str(tmp_path), mode)
    last.write_bytes(good)
    assert np.array_equal(EMState.load(str(tmp_path), mode)[1].maps, state.maps)

    state.maps = state.maps.astype(np.float64)  # not what the float32 files hold: kept in the checkpoint
    state.save(str(tmp_path), 5, mode, particles, K, map_files=files)
    with h5py.File(tmp_path / "run_it005_checkpoint.h5", "r") as h:
        assert h["maps"].dtype == np.float64 and "maps_files" not in h.attrs
    assert np.array_equal(EMState.load(str(tmp_path), mode)[1].maps, state.maps)
