"""Tests of mpi_em.io: STAR / MRC / HDF5 reading and writing, and clear errors."""
from __future__ import annotations

import hashlib
import os
import re

import h5py
import mrcfile
import numpy as np
import pandas as pd
import pytest

from mpi_em.errors import InputError, OutputError
from mpi_em.io import (ParticleStar, atomic_path, check_stacks, check_writable_dir,
                       particles_table, read_hdf5, read_images, read_map, read_particles, rebase_image_names,
                       stack_info, write_hdf5, write_map, write_particles, write_stack)

BOX = 16
PSIZE = 1.5


def optics_row(group=1, psize=PSIZE, box=BOX):
    return {"rlnOpticsGroup": group, "rlnOpticsGroupName": f"opticsGroup{group}",
            "rlnAmplitudeContrast": 0.1, "rlnSphericalAberration": 2.7, "rlnVoltage": 300.0,
            "rlnImagePixelSize": psize, "rlnImageSize": box, "rlnImageDimensionality": 2}


def make_dataset(tmp_path, n=6, n_stack=None, groups=None, optics=None, stack_psize=PSIZE,
                 stack_box=BOX, extra=None):
    """A stack (relative to the STAR file's folder) plus a STAR file; returns (star_path, images)."""
    rng = np.random.default_rng(0)
    n_stack = n if n_stack is None else n_stack
    images = rng.standard_normal((n_stack, stack_box, stack_box)).astype(np.float32)
    (tmp_path / "Particles").mkdir(exist_ok=True)
    write_stack(tmp_path / "Particles" / "stack.mrcs", images, stack_psize)
    cols = {
        "rlnImageName": [f"{i + 1:06d}@Particles/stack.mrcs" for i in range(n)],
        "rlnDefocusU": rng.uniform(10000, 30000, n),
        "rlnDefocusV": rng.uniform(10000, 30000, n),
        "rlnDefocusAngle": rng.uniform(-180, 180, n),
        "rlnAngleRot": rng.uniform(-180, 180, n),
        "rlnAngleTilt": rng.uniform(0, 180, n),
        "rlnOriginXAngst": rng.uniform(-3, 3, n),
        "rlnOpticsGroup": np.ones(n, dtype=int) if groups is None else np.asarray(groups),
        "rlnRandomSubset": np.arange(n) % 2 + 1,
    }
    cols.update(extra or {})
    tables = particles_table(optics or [optics_row()], cols)
    star = tmp_path / "particles.star"
    write_particles(star, tables)
    return star, images


def assert_names(err: InputError, path, field):
    msg = str(err)
    assert str(path) in msg, msg
    assert f"field {field}" in msg, msg
    assert err.field == field


def snapshot(folder):
    return {p: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ STAR

def test_read_particles_arrays(tmp_path, monkeypatch):
    monkeypatch.chdir("/")  # stack path must resolve relative to the STAR file's folder
    star_path, _ = make_dataset(tmp_path)
    s = read_particles(star_path)
    assert isinstance(s, ParticleStar) and s.n == 6
    assert all(p == str(tmp_path / "Particles" / "stack.mrcs") for p in s.stack)
    np.testing.assert_array_equal(s.index, np.arange(6))
    assert s.index.dtype == np.int64
    np.testing.assert_array_equal(s.voltage, 300.0)
    np.testing.assert_array_equal(s.cs, 2.7)
    np.testing.assert_array_equal(s.amp_contrast, 0.1)
    np.testing.assert_array_equal(s.pixel_size, PSIZE)
    np.testing.assert_array_equal(s.box, BOX)
    np.testing.assert_array_equal(s.psi, 0.0)        # absent -> 0
    np.testing.assert_array_equal(s.origin_y, 0.0)   # absent -> 0
    np.testing.assert_array_equal(s.class_number, 1)  # absent -> 1
    np.testing.assert_array_equal(s.phase_shift, 0.0)
    np.testing.assert_array_equal(s.random_subset, np.arange(6) % 2 + 1)
    np.testing.assert_array_equal(s.rot, s.particles["rlnAngleRot"].to_numpy())


def test_star_round_trip_exact(tmp_path):
    star_path, _ = make_dataset(tmp_path, extra={"rlnTiny": np.array([1e-7, 1e-300, -0.0, 2.0, 1 / 3, 5e20])})
    a = read_particles(star_path)
    out = tmp_path / "out" / "again.star"
    write_particles(out, a)
    b = read_particles(out)
    for name, x, y in (("optics", a.optics, b.optics), ("particles", a.particles, b.particles)):
        assert list(x.columns) == list(y.columns), name
        for col in x.columns:
            xv, yv = x[col].to_numpy(), y[col].to_numpy()
            if xv.dtype.kind == "f":
                np.testing.assert_array_equal(xv, yv)  # bit-exact, not approximate
            else:
                assert list(map(str, xv)) == list(map(str, yv)), col
    np.testing.assert_array_equal(a.defocus_u, b.defocus_u)


def test_write_particles_updates(tmp_path):
    star_path, _ = make_dataset(tmp_path)
    s = read_particles(star_path)
    new_rot = np.linspace(-90, 90, s.n)
    out = tmp_path / "it001.star"
    write_particles(out, s, updates={"rlnAngleRot": new_rot, "rlnAnglePsi": new_rot / 3})
    t = read_particles(out)
    np.testing.assert_array_equal(t.rot, new_rot)
    np.testing.assert_array_equal(t.psi, new_rot / 3)
    assert list(t.particles.columns)[: len(s.particles.columns)] == list(s.particles.columns)


def _big_table(n, seed=0):
    rng = np.random.default_rng(seed)
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1], "rlnImagePixelSize": [1.06],
                           "rlnImageSize": [64], "rlnImageDimensionality": [2]})
    particles = pd.DataFrame({
        "rlnImageName": [f"{i % 1000 + 1:06d}@Extract/job012/mic_{i // 1000:05d}.mrcs" for i in range(n)],
        "rlnMicrographName": [f"mic {i // 1000}.mrc" for i in range(n)],   # a space: starfile quotes it
        "rlnDefocusU": rng.uniform(8000, 25000, n), "rlnAngleRot": rng.uniform(-180, 180, n) * 1e-7,
        "rlnOpticsGroup": np.ones(n, int), "rlnClassNumber": rng.integers(1, 50, n)})
    return optics, particles


def test_write_particles_in_parts_is_the_same_text(tmp_path):
    """A table formatted by several processes (each a range of rows through starfile.write, joined in order) is the
    text one process writes, the optics block and quoted strings included (the first line, starfile's time stamp,
    aside); uneven parts, and more parts than rows, too; and it reads back exactly."""
    from mpi_em.io.star_write import format_workers

    optics, particles = _big_table(2503)
    up = {"rlnAnglePsi": np.linspace(-180, 180, len(particles)) / 3}
    texts = {}
    for w in (1, 4, 7):
        write_particles(tmp_path / f"w{w}.star", (optics, particles), updates=up, workers=w)
        texts[w] = (tmp_path / f"w{w}.star").read_text().split("\n", 1)[1]
    assert texts[4] == texts[1] and texts[7] == texts[1]
    write_particles(tmp_path / "few.star", (optics, particles.iloc[:3]), workers=5)   # 3 parts of one row
    write_particles(tmp_path / "few1.star", (optics, particles.iloc[:3]), workers=1)
    assert (tmp_path / "few.star").read_text().split("\n", 1)[1] == (tmp_path / "few1.star").read_text().split("\n", 1)[1]
    import starfile

    got = starfile.read(tmp_path / "w4.star", always_dict=True)["particles"]
    np.testing.assert_array_equal(got["rlnAngleRot"].to_numpy(), particles["rlnAngleRot"].to_numpy())
    np.testing.assert_array_equal(got["rlnAnglePsi"].to_numpy(), up["rlnAnglePsi"])
    assert list(got["rlnMicrographName"][:2]) == ["mic 0.mrc", "mic 0.mrc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["few.star", "few1.star", "w1.star", "w4.star", "w7.star"]
    # the default: one process per 100 000 rows, at most the cores this process may use and 8
    cores = len(os.sched_getaffinity(0))
    assert format_workers(50_000) == 1 and format_workers(10_000_000) == min(8, cores)
    assert format_workers(250_000) == min(2, cores) and format_workers(10, workers=3) == 3


def test_write_particles_in_parts_from_the_background_writer(tmp_path):
    """The EM jobs write their particles in the background writer's process, a daemon: the formatting processes
    start from there too (multiprocessing refuses a daemon children) and give the same text."""
    from mpi_em.io import BackgroundWriter

    optics, particles = _big_table(1001)
    w = BackgroundWriter(use_process=True)
    w.submit(write_particles, tmp_path / "bg.star", (optics, particles), None, 3)
    w.wait()
    w.close()
    write_particles(tmp_path / "one.star", (optics, particles), workers=1)
    assert (tmp_path / "bg.star").read_text().split("\n", 1)[1] == (tmp_path / "one.star").read_text().split("\n", 1)[1]


_STARFILE_WRITE = []


def _write_failing_for_later_parts(blocks, path, **kwargs):
    if "optics" not in blocks:   # a formatting process of a later part (the first one writes every block)
        raise RuntimeError("formatting failed")
    return _STARFILE_WRITE[0](blocks, path, **kwargs)


def test_write_particles_in_parts_failure_leaves_nothing(tmp_path, monkeypatch):
    """A formatting process that fails fails the write: the file keeps its old content, no part file is left."""
    import starfile

    optics, particles = _big_table(400)
    path = tmp_path / "it.star"
    path.write_text("old")
    _STARFILE_WRITE[:] = [starfile.write]
    monkeypatch.setattr(starfile, "write", _write_failing_for_later_parts)   # inherited by the forked processes
    with pytest.raises(RuntimeError, match="formatting failed"):
        write_particles(path, (optics, particles), workers=4)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["it.star"]


def test_old_style_single_block(tmp_path):
    make_dataset(tmp_path)  # for the stack
    n = 3
    df = pd.DataFrame({
        "rlnImageName": [f"{i + 1}@Particles/stack.mrcs" for i in range(n)],
        "rlnDefocusU": [1e4] * n, "rlnDefocusV": [1.1e4] * n, "rlnDefocusAngle": [5.0] * n,
        "rlnVoltage": [200.0] * n, "rlnSphericalAberration": [2.0] * n,
        "rlnAmplitudeContrast": [0.07] * n, "rlnPixelSize": [PSIZE] * n, "rlnImageSize": [BOX] * n,
    })
    path = tmp_path / "old.star"
    write_particles(path, (None, df))
    s = read_particles(path)
    assert s.optics is None and s.n == 3
    np.testing.assert_array_equal(s.voltage, 200.0)
    np.testing.assert_array_equal(s.optics_group, 1)
    check_stacks(s)


def test_stack_resolved_relative_to_cwd_first(tmp_path, monkeypatch):
    star_path, _ = make_dataset(tmp_path)
    other = tmp_path / "cwd"
    (other / "Particles").mkdir(parents=True)
    write_stack(other / "Particles" / "stack.mrcs", np.zeros((6, BOX, BOX), np.float32), PSIZE)
    monkeypatch.chdir(other)
    s = read_particles(star_path)
    assert s.stack[0] == str(other / "Particles" / "stack.mrcs")


def test_rebased_image_names_resolve_from_the_new_folder(tmp_path, monkeypatch):
    """A job's output STAR lives in another folder than its input: image names that were found relative to the
    input STAR's folder are rewritten relative to the output folder, so the output STAR reads the same images
    from any working directory; absolute names stay as they are."""
    star_path, _ = make_dataset(tmp_path)
    s = read_particles(star_path)
    out = tmp_path / "job" / "run1"
    out.mkdir(parents=True)
    rebased = rebase_image_names(s, out)
    assert rebased["rlnImageName"].iloc[0] == "000001@../../Particles/stack.mrcs"
    write_particles(out / "run_data.star", (s.optics, rebased))
    monkeypatch.chdir(tmp_path / "job")
    t = read_particles(out / "run_data.star")
    np.testing.assert_array_equal(t.stack, s.stack)
    np.testing.assert_array_equal(t.index, s.index)
    check_stacks(t)
    # absolute names are kept; the input table is not modified
    s.particles["rlnImageName"] = [f"{i + 1:06d}@{tmp_path}/Particles/stack.mrcs" for i in range(s.n)]
    before = s.particles.copy()
    assert rebase_image_names(s, out)["rlnImageName"].tolist() == before["rlnImageName"].tolist()
    pd.testing.assert_frame_equal(s.particles, before)


def test_pose_errors_match_particles_by_image_not_by_name_text(tmp_path):
    """pose_errors pairs a refined STAR's rows with the truth's by the image they read (stack file and index),
    so rows in another order and names rewritten for another folder still pair up; a row whose image is not in
    the truth is an error, not a silent mismatch."""
    from mpi_em.evaluate import pose_errors

    star_path, _ = make_dataset(tmp_path)
    s = read_particles(star_path)
    out = tmp_path / "run"
    out.mkdir()
    moved = rebase_image_names(s, out).iloc[::-1].reset_index(drop=True)    # other order, other name text
    moved["rlnAngleRot"] = moved["rlnAngleRot"] + 10.0                       # 10° about the z axis
    write_particles(out / "data.star", (s.optics, moved))
    ang, sh = pose_errors(out / "data.star", star_path)
    np.testing.assert_allclose(ang, 10.0, atol=1e-6)
    np.testing.assert_allclose(sh, 0.0, atol=1e-12)
    moved.loc[0, "rlnImageName"] = "000099@../Particles/stack.mrcs"
    write_particles(out / "bad.star", (s.optics, moved))
    with pytest.raises(ValueError, match="000099"):
        pose_errors(out / "bad.star", star_path)


def test_star_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found") as e:
        read_particles(tmp_path / "nope.star")
    assert str(tmp_path / "nope.star") in str(e.value)


def test_star_garbage(tmp_path):
    p = tmp_path / "garbage.star"
    p.write_bytes(os.urandom(4000))
    with pytest.raises(InputError, match="not a STAR file"):
        read_particles(p)
    p.write_text("just some text\nno blocks here\n")
    with pytest.raises(InputError, match="not a STAR file"):
        read_particles(p)


# rlnImageSize may be absent (RELION's own relion_project writes files without it): the box is then the stack's,
# tests/test_metadata_variants.py::test_box_from_stack_when_image_size_absent
@pytest.mark.parametrize("column", ["rlnImageName", "rlnDefocusU", "rlnVoltage", "rlnImagePixelSize",
                                    "rlnOpticsGroup"])
def test_star_missing_column(tmp_path, column):
    star_path, _ = make_dataset(tmp_path)
    s = read_particles(star_path)
    optics = s.optics.drop(columns=[column], errors="ignore")
    particles = s.particles.drop(columns=[column], errors="ignore")
    bad = tmp_path / "bad.star"
    write_particles(bad, (optics, particles))
    with pytest.raises(InputError, match="missing") as e:
        read_particles(bad)
    assert_names(e.value, bad, column)


def test_star_non_numeric_and_nan(tmp_path):
    star_path, _ = make_dataset(tmp_path)
    s = read_particles(star_path)
    p = s.particles.copy()
    p["rlnDefocusV"] = p["rlnDefocusV"].astype(object)
    p.loc[3, "rlnDefocusV"] = "abc"
    bad = tmp_path / "bad.star"
    write_particles(bad, (s.optics, p))
    with pytest.raises(InputError, match="row 4") as e:
        read_particles(bad)
    assert_names(e.value, bad, "rlnDefocusV")

    p = s.particles.copy()
    p.loc[1, "rlnAngleRot"] = np.nan
    write_particles(bad, (s.optics, p))
    with pytest.raises(InputError, match="row 2") as e:
        read_particles(bad)
    assert_names(e.value, bad, "rlnAngleRot")


@pytest.mark.parametrize("name,match", [("12", "malformed"), ("x@Particles/stack.mrcs", "malformed"),
                                        ("0@Particles/stack.mrcs", "below 1")])
def test_star_bad_image_name(tmp_path, name, match):
    star_path, _ = make_dataset(tmp_path)
    s = read_particles(star_path)
    p = s.particles.copy()
    p.loc[2, "rlnImageName"] = name
    bad = tmp_path / "bad.star"
    write_particles(bad, (s.optics, p))
    with pytest.raises(InputError, match=match) as e:
        read_particles(bad)
    assert_names(e.value, bad, "rlnImageName")
    assert "row 3" in str(e.value)


def test_star_unknown_optics_group(tmp_path):
    star_path, _ = make_dataset(tmp_path, groups=[1, 1, 1, 2, 1, 1])
    with pytest.raises(InputError, match="optics group 2") as e:
        read_particles(star_path)
    assert_names(e.value, star_path, "rlnOpticsGroup")


def test_star_optics_groups_mismatch(tmp_path):
    groups = [1, 2, 1, 2, 1, 2]
    star_path, _ = make_dataset(tmp_path, groups=groups, optics=[optics_row(1), optics_row(2, psize=1.6)])
    with pytest.raises(InputError, match="mismatched pixel sizes across optics groups") as e:
        read_particles(star_path)
    assert_names(e.value, star_path, "rlnImagePixelSize")

    star_path, _ = make_dataset(tmp_path, groups=groups, optics=[optics_row(1), optics_row(2, box=32)])
    with pytest.raises(InputError, match="mismatched image sizes") as e:
        read_particles(star_path)
    assert_names(e.value, star_path, "rlnImageSize")

    # Two groups that agree on pixel and box size are fine, with per-group voltage.
    opt2 = optics_row(2)
    opt2["rlnVoltage"] = 200.0
    star_path, _ = make_dataset(tmp_path, groups=groups, optics=[optics_row(1), opt2])
    s = read_particles(star_path)
    np.testing.assert_array_equal(s.voltage, [300, 200, 300, 200, 300, 200])


def test_star_zero_particles(tmp_path):
    path = tmp_path / "empty.star"
    optics, particles = particles_table([optics_row()], {c: [] for c in
                                        ("rlnImageName", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle",
                                         "rlnOpticsGroup")})
    write_particles(path, (optics, particles))
    with pytest.raises(InputError, match="no particles") as e:
        read_particles(path)
    assert str(path) in str(e.value)


# ------------------------------------------------------------------ MRC

def test_write_stack_and_map_validate(tmp_path, capsys):
    imgs = np.random.default_rng(1).standard_normal((5, 8, 8)).astype(np.float32)
    write_stack(tmp_path / "s.mrcs", imgs, 1.25)
    vol = np.random.default_rng(2).standard_normal((8, 8, 8)).astype(np.float32)
    write_map(tmp_path / "m.mrc", vol, 2.5)
    assert mrcfile.validate(str(tmp_path / "s.mrcs"))
    assert mrcfile.validate(str(tmp_path / "m.mrc"))
    with mrcfile.open(tmp_path / "s.mrcs") as m:
        assert m.is_image_stack()
    for name, data in (("s.mrcs", imgs), ("m.mrc", vol)):   # header statistics of the data written
        with mrcfile.open(tmp_path / name, header_only=True) as m:
            h = m.header
            assert (h.dmin, h.dmax) == (data.min(), data.max()), name
            assert h.dmean == pytest.approx(data.mean(), rel=1e-6) and h.rms == pytest.approx(data.std(), rel=1e-6)
    assert stack_info(tmp_path / "s.mrcs") == (5, 8, 8, pytest.approx(1.25))
    v, vs = read_map(tmp_path / "m.mrc")
    assert v.dtype == np.float32 and vs == pytest.approx(2.5)
    np.testing.assert_array_equal(v, vol)
    # No temp files left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mrc", "s.mrcs"]


def test_write_map_with_given_statistics(tmp_path):
    """write_map with ``stats`` (a GPU rank's, computed on the device before the maps come to the host) writes them
    as the header's dmin, dmax, dmean, rms instead of computing them from the data. With map_statistics' values the
    file is the one write_map makes without them: the same data, voxel size and volume header, and mrcfile's
    validation (which checks the header statistics against the data) passes; values given wrong on purpose are
    what the header holds (they are not recomputed) and the validation then fails."""
    from mpi_em.io.mrc import map_statistics

    vol = np.random.default_rng(4).standard_normal((10, 12, 14)).astype(np.float32)
    write_map(tmp_path / "a.mrc", vol, 1.5)
    stats = map_statistics(vol[None])[0]
    write_map(tmp_path / "b.mrc", vol, 1.5, stats=stats)
    write_map(tmp_path / "c.mrc", vol, 1.5, stats=(-9.0, 9.0, 0.25, 2.0))
    assert mrcfile.validate(str(tmp_path / "a.mrc")) and mrcfile.validate(str(tmp_path / "b.mrc"))
    with mrcfile.open(tmp_path / "a.mrc") as a, mrcfile.open(tmp_path / "b.mrc") as b:
        np.testing.assert_array_equal(b.data, a.data)
        assert b.is_volume() and b.voxel_size.x == pytest.approx(1.5) and b.data.shape == (10, 12, 14)
        ha, hb = a.header, b.header
        assert (hb.dmin, hb.dmax) == (ha.dmin, ha.dmax)
        assert float(hb.dmean) == pytest.approx(float(ha.dmean), rel=1e-6)
        assert float(hb.rms) == pytest.approx(float(ha.rms), rel=1e-6)
    with mrcfile.open(tmp_path / "c.mrc") as c:
        h = c.header
        assert (float(h.dmin), float(h.dmax), float(h.dmean), float(h.rms)) == (-9.0, 9.0, 0.25, 2.0)
    assert not mrcfile.validate(str(tmp_path / "c.mrc"), print_file=open(os.devnull, "w"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mrc", "b.mrc", "c.mrc"]


@pytest.mark.parametrize("shape", [(3, 10, 12, 14), (4, 48, 48, 48), (2, 50, 50, 50), (1, 7, 7, 7)])
def test_map_statistics_in_two_stages_equal_the_whole_maps(shape):
    """map_statistics reduces segments of voxels (512 where the voxel count allows, 16, 8 and 1 for these shapes) and
    then the segments' results: per map exactly the data's min and max, and its mean and standard deviation (float64) to
    within 1e-12 of the standard deviation."""
    from mpi_em.io.mrc import _stat_run, map_statistics

    maps = (np.random.default_rng(5).standard_normal(shape) * 2 + 0.3).astype(np.float32)
    assert _stat_run(int(np.prod(shape[1:]))) == {10: 16, 48: 512, 50: 8, 7: 1}[shape[1]]
    s = map_statistics(maps)
    assert s.shape == (shape[0], 4) and s.dtype == np.float64
    for v, m in enumerate(maps):
        sd = m.std(dtype=np.float64)
        assert (s[v, 0], s[v, 1]) == (m.min(), m.max())
        assert abs(s[v, 2] - m.mean(dtype=np.float64)) <= 1e-12 * sd
        assert abs(s[v, 3] - sd) <= 1e-12 * sd


def test_read_images_slices(tmp_path):
    imgs = np.random.default_rng(3).standard_normal((7, 8, 6)).astype(np.float32)
    write_stack(tmp_path / "s.mrcs", imgs, 1.0)
    idx = [5, 0, 5, 2]
    got = read_images(tmp_path / "s.mrcs", idx)
    assert got.dtype == np.float32 and got.shape == (4, 8, 6)
    np.testing.assert_array_equal(got, imgs[idx])


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # mrcfile's header statistics of the broken stacks
@pytest.mark.parametrize("dtype", ["<f4", ">f4", "<i2", "<f2"])
def test_read_images_runs_gathers_and_reads_into_a_given_batch(tmp_path, dtype):
    """Series of consecutive slices (copied from the file's pages in one pass each), scattered and repeated slices
    (gathered), each into a given batch or a new array, in any stored type (little- and big-endian float32, int16,
    float16): the images bit for bit as float32; a NaN or an infinity in any position of an image is found; an
    image of another size than the batch's is an error naming the stack."""
    from mpi_em.particles import read_rows

    rng = np.random.default_rng(4)
    imgs = (rng.standard_normal((40, 6, 5)) * 100).astype(dtype)
    path = tmp_path / "s.mrcs"
    with mrcfile.new(path) as m:
        m.set_data(imgs)   # mrcfile stores the data's byte order and type (modes 2, 1, 12)
    want = imgs.astype(np.float32)
    for idx in ([3, 4, 5, 6, 20, 21, 0], list(range(40)), [7], [9, 2, 2, 31, 17, 0, 39, 8, 8, 1, 30, 12],
                list(range(40))[::-1]):
        got = read_images(path, idx)
        assert got.dtype == np.float32 and got.shape == (len(idx), 6, 5) and got.flags.c_contiguous
        np.testing.assert_array_equal(got, want[idx])
        batch = np.full((len(idx) + 2, 6, 5), -1.0, np.float32)
        assert read_images(path, idx, out=batch[1:-1]) is not None
        np.testing.assert_array_equal(batch[1:-1], want[idx])
        assert (batch[0] == -1).all() and (batch[-1] == -1).all()
        made = []                                   # or a function of the shape that makes the batch
        got = read_images(path, idx, out=lambda shape: made.append(shape) or np.empty(shape, np.float32))
        assert made == [(len(idx), 6, 5)] and np.array_equal(got, want[idx])
    other = tmp_path / "o.mrcs"
    write_stack(other, np.zeros((2, 6, 5), np.float32), 1.0)
    np.testing.assert_array_equal(read_rows([str(path)] * 3 + [str(other)], [5, 6, 7, 1]),
                                  np.concatenate([want[5:8], np.zeros((1, 6, 5), np.float32)]))
    with pytest.raises(InputError, match="images of 5 x 6 px where the batch holds 4 x 6 px") as e:
        read_images(path, [0, 1], out=np.zeros((2, 6, 4), np.float32))
    assert_names(e.value, path, "nx")
    if dtype in ("<f4", ">f4"):
        for bad in (np.nan, np.inf, -np.inf):
            for pos in ((0, 0), (5, 4), (2, 3)):
                broken = imgs.copy()
                broken[11][pos] = bad
                with mrcfile.new(path, overwrite=True) as m:
                    m.set_data(broken)
                for idx in ([10, 11, 12], [30, 11, 2, 2, 5, 19, 27, 1, 0]):
                    with pytest.raises(InputError, match="NaN or infinite pixel values in image 12"):
                        read_images(path, idx)
                np.testing.assert_array_equal(read_images(path, [10, 12]), want[[10, 12]])


def test_read_images_single_2d_image(tmp_path):
    img = np.arange(64, dtype=np.float32).reshape(8, 8)
    with mrcfile.new(tmp_path / "one.mrc") as m:
        m.set_data(img)
    assert stack_info(tmp_path / "one.mrc")[:3] == (1, 8, 8)
    np.testing.assert_array_equal(read_images(tmp_path / "one.mrc", [0])[0], img)


def test_read_images_past_end(tmp_path):
    write_stack(tmp_path / "s.mrcs", np.zeros((3, 4, 4), np.float32), 1.0)
    with pytest.raises(InputError, match=r"image index 4 is past the end of the stack \(3 images\)") as e:
        read_images(tmp_path / "s.mrcs", [0, 3])
    assert_names(e.value, tmp_path / "s.mrcs", "rlnImageName")


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_read_images_nan(tmp_path):
    imgs = np.zeros((3, 4, 4), np.float32)
    imgs[1, 2, 2] = np.nan
    write_stack(tmp_path / "s.mrcs", imgs, 1.0)
    np.testing.assert_array_equal(read_images(tmp_path / "s.mrcs", [0, 2]), 0)
    with pytest.raises(InputError, match="NaN or infinite pixel values in image 2") as e:
        read_images(tmp_path / "s.mrcs", [0, 1])
    assert_names(e.value, tmp_path / "s.mrcs", "data")


def test_truncated_mrc(tmp_path):
    p = tmp_path / "s.mrcs"
    write_stack(p, np.ones((4, 8, 8), np.float32), 1.0)
    p.write_bytes(p.read_bytes()[:-100])
    for call in (lambda: stack_info(p), lambda: read_images(p, [0])):
        with pytest.raises(InputError) as e:
            call()
        assert_names(e.value, p, "data size")


def test_corrupt_header(tmp_path):
    p = tmp_path / "s.mrcs"
    p.write_bytes(os.urandom(5000))
    with pytest.raises(InputError) as e:
        stack_info(p)
    assert_names(e.value, p, "header")
    p.write_bytes(b"xx")  # shorter than a header
    with pytest.raises(InputError) as e:
        read_map(p)
    assert_names(e.value, p, "header")


def test_missing_mrc(tmp_path):
    with pytest.raises(InputError, match="not found"):
        stack_info(tmp_path / "none.mrcs")


# ------------------------------------------------------------------ check_stacks

def test_check_stacks_ok(tmp_path):
    star_path, images = make_dataset(tmp_path)
    s = read_particles(star_path)
    check_stacks(s)
    np.testing.assert_array_equal(read_images(s.stack[0], s.index), images)


def test_check_stacks_missing_stack(tmp_path):
    star_path, _ = make_dataset(tmp_path)
    os.remove(tmp_path / "Particles" / "stack.mrcs")
    s = read_particles(star_path)
    with pytest.raises(InputError, match="stack file not found") as e:
        check_stacks(s)
    assert_names(e.value, tmp_path / "Particles" / "stack.mrcs", "rlnImageName")
    assert str(star_path) in str(e.value)


def test_check_stacks_row_past_end(tmp_path):
    star_path, _ = make_dataset(tmp_path, n=6, n_stack=4)
    s = read_particles(star_path)
    with pytest.raises(InputError, match=r"row 6 .* refers to image 6, past the end of the stack \(4 images\)") as e:
        check_stacks(s)
    assert_names(e.value, s.stack[0], "rlnImageName")


def test_check_stacks_pixel_size_mismatch(tmp_path):
    star_path, _ = make_dataset(tmp_path, stack_psize=1.6)
    s = read_particles(star_path)
    with pytest.raises(InputError, match="STAR file .* says 1.5 Å but the MRC header says 1.6 Å") as e:
        check_stacks(s)
    assert_names(e.value, s.stack[0], "rlnImagePixelSize")


def test_check_stacks_zero_header_pixel_size_ok(tmp_path):
    star_path, _ = make_dataset(tmp_path, stack_psize=0.0)
    check_stacks(read_particles(star_path))


def test_check_stacks_box_mismatch(tmp_path):
    star_path, _ = make_dataset(tmp_path, stack_box=12)
    s = read_particles(star_path)
    with pytest.raises(InputError) as e:
        check_stacks(s)
    assert_names(e.value, s.stack[0], "rlnImageSize")


def test_check_stacks_truncated(tmp_path):
    star_path, _ = make_dataset(tmp_path)
    stack = tmp_path / "Particles" / "stack.mrcs"
    stack.write_bytes(stack.read_bytes()[:-7])
    with pytest.raises(InputError) as e:
        check_stacks(read_particles(star_path))
    assert_names(e.value, stack, "data size")


def test_inputs_not_modified(tmp_path):
    star_path, _ = make_dataset(tmp_path)
    before = snapshot(tmp_path)
    s = read_particles(star_path)
    check_stacks(s)
    read_images(s.stack[0], s.index)
    stack_info(s.stack[0])
    write_particles(tmp_path / "out.star", s, updates={"rlnAngleRot": np.zeros(s.n)})
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k.name != "out.star"} == before


# ------------------------------------------------------------------ output

def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    target = blocker / "sub"  # a folder under a regular file: fails even for root
    with pytest.raises(OutputError) as e:
        check_writable_dir(target)
    assert str(target) in str(e.value)
    with pytest.raises(OutputError):
        write_map(target / "m.mrc", np.zeros((4, 4, 4), np.float32), 1.0)
    with pytest.raises(OutputError):
        write_particles(target / "p.star", (pd.DataFrame([optics_row()]), pd.DataFrame({"a": [1]})))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
def test_unwritable_output_folder_chmod(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="not writable"):
            check_writable_dir(ro)
        with pytest.raises(OutputError):
            write_stack(ro / "s.mrcs", np.zeros((1, 4, 4), np.float32), 1.0)
    finally:
        ro.chmod(0o700)


def test_check_writable_dir_creates(tmp_path):
    d = check_writable_dir(tmp_path / "x" / "y")
    assert os.path.isdir(d) and os.listdir(d) == []


def test_atomic_write_failure_leaves_nothing(tmp_path):
    final = tmp_path / "map.mrc"

    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom):
        with atomic_path(final) as tmp:
            assert os.path.dirname(tmp) == str(tmp_path) and tmp.endswith(".mrc")
            with open(tmp, "wb") as f:
                f.write(b"partial")
            raise Boom()
    assert list(tmp_path.iterdir()) == []

    # An existing final file keeps its old content when a rewrite fails.
    write_map(final, np.ones((4, 4, 4), np.float32), 1.0)
    old = final.read_bytes()
    with pytest.raises(Boom):
        with atomic_path(final) as tmp:
            with mrcfile.new(tmp, overwrite=True) as m:
                m.set_data(np.zeros((4, 4, 4), np.float32))
            raise Boom()
    assert final.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["map.mrc"]


def test_hdf5_round_trip(tmp_path):
    arrays = {"a": np.arange(5.0), "grp/b": np.eye(3, dtype=np.float32), "names": np.array(["x", "yy"])}
    write_hdf5(tmp_path / "f.h5", arrays, attrs={"iteration": 3, "note": "hi"})
    got, attrs = read_hdf5(tmp_path / "f.h5")
    assert set(got) == set(arrays)
    np.testing.assert_array_equal(got["a"], arrays["a"])
    np.testing.assert_array_equal(got["grp/b"], arrays["grp/b"])
    assert list(got["names"]) == ["x", "yy"]
    assert attrs == {"iteration": 3, "note": "hi"}
    assert [p.name for p in tmp_path.iterdir()] == ["f.h5"]
    with h5py.File(tmp_path / "f.h5") as f:
        assert f["grp/b"].dtype == np.float32
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    with pytest.raises(InputError):
        read_hdf5(tmp_path / "bad.h5")


def _append_line(path, text, delay=0.0):
    import time

    time.sleep(delay)
    with open(path, "a") as f:
        f.write(f"{text} {os.getpid()}\n")


@pytest.mark.parametrize("use_process", [True, False])
def test_background_writer_runs_in_order_and_reraises(tmp_path, use_process):
    """submit returns at once and runs one call at a time, in order, in another process (where the platform
    forks) or thread; wait re-raises the call's exception, once; a writer process that dies is an error."""
    from mpi_em.errors import OutputError
    from mpi_em.io import BackgroundWriter

    log = tmp_path / "log.txt"
    w = BackgroundWriter(use_process=use_process)
    w.submit(_append_line, log, "a", 0.3)
    assert not log.exists()                  # returned before the call finished
    w.submit(_append_line, log, "b")
    w.wait()
    lines = [line.split() for line in log.read_text().splitlines()]
    assert [t for t, _ in lines] == ["a", "b"]
    assert all((int(pid) != os.getpid()) == use_process for _, pid in lines)
    w.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        w.wait()
    w.wait()                                 # reported once
    if use_process:
        w.submit(os._exit, 7)                # the child vanishes without a word
        with pytest.raises(OutputError, match="exit code 7"):
            w.wait()
    w.close()


def _wait_for_file(path, found, timeout=20.0, then=0.0):
    import time

    t0 = time.monotonic()
    while not os.path.exists(path) and time.monotonic() - t0 < timeout:
        time.sleep(0.01)
    time.sleep(then)
    with open(found, "w") as f:
        f.write("seen" if os.path.exists(path) else "timed out")


def _fail_after_writing(path):
    with open(path, "w") as f:
        f.write("b")
    raise ValueError("the call failed")


def test_background_writer_runs_submit_all_side_by_side(tmp_path):
    """submit_all starts its calls at once, each in its own process: the first waits for a file that only the second
    writes (run one after the other, it would wait its 20 s out); wait returns when all have finished, and raises a
    call's failure only after every call has ended."""
    from mpi_em.io import BackgroundWriter

    w = BackgroundWriter(use_process=True)
    w.submit_all([(_wait_for_file, (tmp_path / "b.txt", tmp_path / "a.txt"), {}),
                  (_append_line, (tmp_path / "b.txt", "b"), {})])
    w.wait()
    assert (tmp_path / "a.txt").read_text() == "seen"
    # the failing call first: wait still waits for the other, which ends 0.5 s after the failure
    w.submit_all([(_fail_after_writing, (tmp_path / "d.txt",), {}),
                  (_wait_for_file, (tmp_path / "d.txt", tmp_path / "c.txt"), {"then": 0.5})])
    with pytest.raises(ValueError, match="call failed"):
        w.wait()
    assert (tmp_path / "c.txt").read_text() == "seen"   # the other call had ended too
    w.wait()                                            # reported once
    w.close()


_PRELOADED = []


def _slow_preload(fail=False):
    import time

    time.sleep(0.3)
    if fail:
        raise ImportError("no such module")
    _PRELOADED.append(True)


def _write_preloaded(path):
    with open(path, "w") as f:
        f.write(str(bool(_PRELOADED)))


@pytest.mark.parametrize("use_process", [True, False])
def test_background_writer_preloads_before_the_first_call(tmp_path, use_process):
    """``preload`` runs once in the writer's owner (the rank's process, in a thread, started at once) and has
    finished before the first call starts, so a forked writer inherits what it imported; a failing preload is
    ignored (the call then imports for itself)."""
    from mpi_em.io import BackgroundWriter

    _PRELOADED.clear()
    w = BackgroundWriter(use_process=use_process, preload=_slow_preload)
    w.submit(_write_preloaded, tmp_path / "seen.txt")   # at once, while the preload sleeps
    w.wait()
    assert (tmp_path / "seen.txt").read_text() == "True"
    assert _PRELOADED == [True]                         # once, in this process
    w.close()
    _PRELOADED.clear()
    w = BackgroundWriter(use_process=use_process, preload=lambda: _slow_preload(fail=True))
    w.submit(_write_preloaded, tmp_path / "seen2.txt")
    w.wait()
    assert (tmp_path / "seen2.txt").read_text() == "False"
    w.close()


def test_the_star_library_is_imported_when_a_star_file_is_read():
    """pandas (under starfile) is imported by the STAR functions that use it, not with the package: its import
    took 0.66 s of every process (`mpi-em --help` 1.76 -> 0.75 s; every rank but the one that reads and writes
    the STAR files of a job saves it)."""
    import subprocess
    import sys

    code = ("import sys\nimport mpi_em.cli, mpi_em.io, mpi_em.jobs.em, mpi_em.jobs.reconstruct\n"
            "mpi_em.cli.build_parser()\nprint('pandas' in sys.modules, 'starfile' in sys.modules)\n"
            "from mpi_em.io import particles_table\nparticles_table([{'rlnOpticsGroup': 1}], {'rlnAngleRot': [0.0]})\n"
            "print('pandas' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False", "True"], r.stdout


def test_disk_outlook_after_the_first_iteration(tmp_path, monkeypatch):
    """After iteration 1's files are written, their bytes (the checkpoint excepted: only the last is kept) times
    the iterations still allowed, and the final copies, against the folder's free space: a warning naming the
    figures and what to do where they would not fit (a box-512 refine3d wrote 2.5 GB per iteration and stopped
    at iteration 18 on a full 64 GB disk), nothing where they fit."""
    import shutil
    from collections import namedtuple

    from mpi_em.io.disk import disk_outlook

    for name, size in (("half1_class001_unfil.mrc", 400), ("half2_class001_unfil.mrc", 400),
                       ("class001.mrc", 400), ("data.star", 100), ("checkpoint.h5", 5000)):
        (tmp_path / f"run_it001_{name}").write_bytes(b"x" * size)
    (tmp_path / "run_it002_class001.mrc").write_bytes(b"x" * 9999)  # another iteration's: not counted
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 ** 6, 0, 20000))
    text = disk_outlook(str(tmp_path), 1, 20)
    assert text is not None and "iteration 1 wrote 1.27 KiB; up to 19 more iterations and the final files need " \
        "25.4 KiB, 19.5 KiB free" in text and str(tmp_path) in text and "--continue" in text, text
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 ** 6, 0, 1300 * 20))
    assert disk_outlook(str(tmp_path), 1, 20) is None
    assert disk_outlook(str(tmp_path), 1, 1) is None  # nothing more to write but the final copies... which fit


def test_em_job_warns_when_its_outputs_will_not_fit(tmp_path, monkeypatch, small_dataset):
    """The EM jobs log the outlook once, after the first iteration's files: a class2d whose disk is (made to
    look) nearly full warns in its log and still finishes all its iterations."""
    import shutil
    from collections import namedtuple

    from mpi_em.cli import main

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 ** 12, 10 ** 12 - 1000, 1000))
    out = tmp_path / "c2"
    assert main([str(a) for a in ["class2d", "--i", small_dataset / "particles_unaligned.star", "--o", out,
                                  "--K", 2, "--iter", 3, "--device", "cpu"]]) == 0
    log = open(out / "run.log").read()
    assert len(re.findall(r"disk: iteration 1 wrote [\d.]+ [KMG]iB; up to 2 more iterations and the final "
                          r"files need [\d.]+ [KMG]iB, 1000 B free", log)) == 1, log
    assert (out / "run_it003_data.star").exists()
