"""Real-world metadata variants: read correctly, or refused with one line naming the file and the field.

RELION 3.0 single-table STAR files, RELION 3.1+ files with several optics groups, MRC headers without the ``MAP ``
id or with voxel size 0, float16 (mode 12) stacks, rlnCtfScalefactor and rlnCtfDataAreCtfPremultiplied; where
RELION (relion_project, Debian's 3.1.3) is installed, files it writes are read back and compared with what it was
given, and its conversion of a 3.0 file is the reference for ours.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess

import mrcfile
import numpy as np
import pandas as pd
import pytest

from conftest import mpi_em
from mpi_em.ctf import ctf_points
from mpi_em.distributed import make_plan
from mpi_em.em.engine import prepare_batch
from mpi_em.errors import InputError
from mpi_em.fourier import SliceGeometry
from mpi_em.io import (check_stacks, particles_table, read_images, read_particles, stack_info, write_particles,
                       write_stack)

BOX = 16
RELION_PROJECT = shutil.which("relion_project")
needs_relion = pytest.mark.skipif(RELION_PROJECT is None,
                                  reason="relion_project not installed (Debian: apt-get install relion)")


def star_text(columns: dict, block: str = "") -> str:
    """A one-table STAR file as RELION 3.0 writes it (``data_`` + loop, columns numbered)."""
    names = list(columns)
    n = len(columns[names[0]])
    lines = [f"\ndata_{block}\n", "loop_"] + [f"_{c} #{i + 1}" for i, c in enumerate(names)]
    for r in range(n):
        lines.append(" ".join(str(columns[c][r]) for c in names))
    return "\n".join(lines) + "\n"


def _reprs(values):
    return [repr(float(v)) for v in values]


def write_images(path, n=6, box=BOX, psize=1.25, seed=0):
    imgs = np.random.default_rng(seed).standard_normal((n, box, box)).astype(np.float32)
    write_stack(path, imgs, psize)
    return imgs


def relion30_columns(n=6, stack="stack.mrcs"):
    rng = np.random.default_rng(3)
    return {
        "rlnImageName": [f"{i + 1:06d}@{stack}" for i in range(n)],
        "rlnMicrographName": ["mic1.mrc"] * n,
        "rlnDefocusU": np.round(rng.uniform(1e4, 3e4, n), 2),
        "rlnDefocusV": np.round(rng.uniform(1e4, 3e4, n), 2),
        "rlnDefocusAngle": np.round(rng.uniform(-180, 180, n), 2),
        "rlnVoltage": [300.0, 300.0, 200.0, 300.0, 200.0, 300.0][:n],   # per particle in 3.0
        "rlnSphericalAberration": [2.7, 2.7, 2.0, 2.7, 2.0, 2.7][:n],
        "rlnAmplitudeContrast": [0.1, 0.1, 0.07, 0.1, 0.07, 0.1][:n],
        "rlnMagnification": [40000.0] * n,
        "rlnDetectorPixelSize": [5.0] * n,                               # µm: 5e4 / 4e4 = 1.25 Å
        "rlnAngleRot": np.round(rng.uniform(-180, 180, n), 3),
        "rlnAngleTilt": np.round(rng.uniform(0, 180, n), 3),
        "rlnAnglePsi": np.round(rng.uniform(-180, 180, n), 3),
        "rlnOriginX": np.round(rng.uniform(-3, 3, n), 3),                # pixels in 3.0
        "rlnOriginY": np.round(rng.uniform(-3, 3, n), 3),
        "rlnRandomSubset": np.arange(n) % 2 + 1,
    }


# ------------------------------------------------------------------ RELION 3.0: one table

def test_relion30_single_table(tmp_path, caplog):
    write_images(tmp_path / "stack.mrcs", psize=1.25)
    cols = relion30_columns()
    path = tmp_path / "relion30.star"
    path.write_text(star_text(cols))
    assert "rlnImagePixelSize" not in path.read_text() and "rlnImageSize" not in path.read_text()
    s = read_particles(path)
    assert s.optics is None and s.n == 6
    np.testing.assert_allclose(s.pixel_size, 5.0 * 1e4 / 40000.0, rtol=1e-15)
    assert s.pixel_size_field == "rlnDetectorPixelSize"
    np.testing.assert_array_equal(s.box, BOX)                          # from the stack header
    np.testing.assert_allclose(s.origin_x, np.asarray(cols["rlnOriginX"]) * 1.25, rtol=1e-15)  # stored in Å
    np.testing.assert_allclose(s.origin_y, np.asarray(cols["rlnOriginY"]) * 1.25, rtol=1e-15)
    np.testing.assert_array_equal(s.voltage, cols["rlnVoltage"])       # per particle
    np.testing.assert_array_equal(s.cs, cols["rlnSphericalAberration"])
    np.testing.assert_array_equal(s.amp_contrast, cols["rlnAmplitudeContrast"])
    np.testing.assert_array_equal(s.rot, cols["rlnAngleRot"])
    np.testing.assert_array_equal(s.ctf_scale, 1.0)
    with caplog.at_level(logging.WARNING, logger="mpi_em"):
        check_stacks(s)
    assert not caplog.records
    plan = make_plan(s, 1)[0]
    np.testing.assert_array_equal(plan["voltage"], s.voltage[plan["row"]])


def test_relion30_pixel_size_errors(tmp_path, caplog):
    write_images(tmp_path / "stack.mrcs", psize=1.25)
    cols = relion30_columns()
    path = tmp_path / "bad.star"

    only_dstep = {k: v for k, v in cols.items() if k != "rlnMagnification"}
    path.write_text(star_text(only_dstep))
    with pytest.raises(InputError, match="rlnDetectorPixelSize is given but rlnMagnification is not") as e:
        read_particles(path)
    assert e.value.field == "rlnMagnification" and str(path) in str(e.value)

    mags = dict(cols, rlnMagnification=[40000.0, 40000.0, 40000.0, 50000.0, 40000.0, 40000.0])
    path.write_text(star_text(mags))
    with pytest.raises(InputError, match=r"mismatched pixel sizes across particles \(row 1: 1.25 Å, row 4: 1 Å\)") as e:
        read_particles(path)
    assert e.value.field == "rlnDetectorPixelSize"
    assert "\n" not in str(e.value)

    # no pixel size at all: the stack header's, with a warning naming both files ...
    none = {k: v for k, v in cols.items() if k not in ("rlnMagnification", "rlnDetectorPixelSize")}
    path.write_text(star_text(none))
    with caplog.at_level(logging.WARNING, logger="mpi_em"):
        s = read_particles(path)
    np.testing.assert_array_equal(s.pixel_size, 1.25)
    assert len(caplog.records) == 1 and str(tmp_path / "stack.mrcs") in caplog.text and str(path) in caplog.text
    # ... but not from a header whose voxel size is 0
    write_images(tmp_path / "stack.mrcs", psize=0.0)
    with pytest.raises(InputError, match="no pixel size: neither rlnImagePixelSize") as e:
        read_particles(path)
    assert e.value.field == "rlnImagePixelSize" and "voxel size 0" in str(e.value)


def test_relion30_header_pixel_size_mismatch_names_the_column_used(tmp_path):
    write_images(tmp_path / "stack.mrcs", psize=1.6)
    path = tmp_path / "relion30.star"
    path.write_text(star_text(relion30_columns()))
    with pytest.raises(InputError, match="says 1.25 Å but the MRC header says 1.6 Å") as e:
        check_stacks(read_particles(path))
    assert e.value.field == "rlnDetectorPixelSize"


def test_relion30_box_from_missing_stack_is_one_line(tmp_path):
    path = tmp_path / "relion30.star"
    path.write_text(star_text(relion30_columns()))
    with pytest.raises(InputError, match="stack file not found") as e:
        read_particles(path)
    assert e.value.field == "rlnImageName" and str(tmp_path / "stack.mrcs") in str(e.value)
    assert "rlnImageSize" in str(e.value) and "\n" not in str(e.value)


def test_relion30_reconstructs_like_the_31_file(small_dataset, tmp_path):
    """The simulated data set's 3.1 STAR rewritten as RELION 3.0 would write it (one table, origins in pixels,
    detector pixel size and magnification, optics columns per particle, no box): `mpi-em reconstruct` gives the same
    maps to float32 precision (the 3.0 file used to be refused: rlnImagePixelSize missing)."""
    s = read_particles(small_dataset / "particles.star")
    keep = np.arange(0, s.n, 3)  # 200 particles
    p = s.particles.iloc[keep].reset_index(drop=True)
    p["rlnImageName"] = [f"{i + 1}@{stack}" for i, stack in zip(s.index[keep], s.stack[keep])]  # absolute paths
    apix = float(s.pixel_size[0])
    cols = {
        "rlnImageName": p["rlnImageName"].tolist(),
        "rlnDefocusU": _reprs(s.defocus_u[keep]),
        "rlnDefocusV": _reprs(s.defocus_v[keep]),
        "rlnDefocusAngle": _reprs(s.defocus_angle[keep]),
        "rlnVoltage": _reprs(s.voltage[keep]),
        "rlnSphericalAberration": _reprs(s.cs[keep]),
        "rlnAmplitudeContrast": _reprs(s.amp_contrast[keep]),
        "rlnMagnification": ["10000"] * len(keep),
        "rlnDetectorPixelSize": [repr(apix)] * len(keep),               # µm x 1e4 / 1e4 = apix Å
        "rlnAngleRot": _reprs(s.rot[keep]),
        "rlnAngleTilt": _reprs(s.tilt[keep]),
        "rlnAnglePsi": _reprs(s.psi[keep]),
        "rlnOriginX": _reprs(s.origin_x[keep] / apix),
        "rlnOriginY": _reprs(s.origin_y[keep] / apix),
        "rlnRandomSubset": p["rlnRandomSubset"].tolist(),
    }
    old = tmp_path / "relion30_subset.star"
    old.write_text(star_text(cols))
    new = tmp_path / "relion31_subset.star"
    write_particles(new, (s.optics, p))
    a, b = read_particles(old), read_particles(new)
    np.testing.assert_allclose(a.origin_x, b.origin_x, rtol=0, atol=1e-12)
    outs = []
    for star in (old, new):
        out = tmp_path / star.stem
        r = mpi_em(["reconstruct", "--i", star, "--o", out, "--batch", 64], ranks=0)
        assert r.returncode == 0, r.stderr
        outs.append(mrcfile.read(out / "map.mrc"))
    np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=1e-6 * np.abs(outs[1]).max())


def test_box_from_stack_when_image_size_absent(tmp_path):
    """A 3.1 file without rlnImageSize (relion_project writes such files): the box is the stack's; a second stack
    of another box is refused by check_stacks naming where the box came from."""
    write_images(tmp_path / "a.mrcs", n=3, psize=1.25)
    write_images(tmp_path / "b.mrcs", n=3, box=BOX + 4, psize=1.25)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7],
                           "rlnAmplitudeContrast": [0.1], "rlnImagePixelSize": [1.25]})
    parts = {"rlnImageName": ["1@a.mrcs", "2@a.mrcs", "1@b.mrcs"], "rlnDefocusU": [1e4] * 3,
             "rlnDefocusV": [1e4] * 3, "rlnDefocusAngle": [0.0] * 3, "rlnOpticsGroup": [1] * 3}
    path = tmp_path / "p.star"
    write_particles(path, (optics, pd.DataFrame(parts)))
    s = read_particles(path)
    np.testing.assert_array_equal(s.box, BOX)
    with pytest.raises(InputError, match=r"the first stack .*a\.mrcs .* has images of 16 x 16 pixels but the "
                                         r"stack holds 20 x 20") as e:
        check_stacks(s)
    assert e.value.field == "rlnImageSize" and str(tmp_path / "b.mrcs") in str(e.value)


# ------------------------------------------------------------------ RELION 3.1+: several optics groups

def optics_groups(**per_group):
    rows = []
    for g in (1, 2):
        row = {"rlnOpticsGroup": g, "rlnOpticsGroupName": f"opticsGroup{g}", "rlnAmplitudeContrast": 0.1,
               "rlnSphericalAberration": 2.7, "rlnVoltage": 300.0, "rlnImagePixelSize": 1.25, "rlnImageSize": BOX,
               "rlnImageDimensionality": 2}
        row.update({k: v[g - 1] for k, v in per_group.items()})
        rows.append(row)
    return rows


def group_dataset(tmp_path, groups=(1, 2, 2, 1, 2, 1), extra=None, **per_group):
    write_images(tmp_path / "stack.mrcs", psize=1.25)
    n = len(groups)
    rng = np.random.default_rng(7)
    cols = {"rlnImageName": [f"{i + 1}@stack.mrcs" for i in range(n)],
            "rlnDefocusU": rng.uniform(1e4, 3e4, n), "rlnDefocusV": rng.uniform(1e4, 3e4, n),
            "rlnDefocusAngle": rng.uniform(-180, 180, n), "rlnOpticsGroup": list(groups),
            "rlnOriginXAngst": rng.uniform(-3, 3, n), "rlnOriginYAngst": rng.uniform(-3, 3, n)}
    cols.update(extra or {})
    path = tmp_path / "groups.star"
    write_particles(path, particles_table(optics_groups(**per_group), cols))
    return path


def test_optics_groups_ctf_parameters_per_particle(tmp_path):
    """Voltage, Cs, Q0 and phase shift per optics group reach each particle, its plan entry and its CTF."""
    groups = np.array([1, 2, 2, 1, 2, 1])
    path = group_dataset(tmp_path, groups, rlnVoltage=[300.0, 200.0], rlnSphericalAberration=[2.7, 1.4],
                         rlnAmplitudeContrast=[0.1, 0.07], rlnPhaseShift=[0.0, 60.0])
    s = read_particles(path)
    g2 = groups == 2
    np.testing.assert_array_equal(s.voltage, np.where(g2, 200.0, 300.0))
    np.testing.assert_array_equal(s.cs, np.where(g2, 1.4, 2.7))
    np.testing.assert_array_equal(s.amp_contrast, np.where(g2, 0.07, 0.1))
    np.testing.assert_array_equal(s.phase_shift, np.where(g2, 60.0, 0.0))
    np.testing.assert_array_equal(s.optics_group, groups)
    check_stacks(s)

    plans = make_plan(s, 2)
    for plan in plans:
        for f in ("voltage", "cs", "amp_contrast", "phase_shift", "optics_group", "ctf_scale"):
            np.testing.assert_array_equal(plan[f], getattr(s, f)[plan["row"]], err_msg=f)

    # The CTFs the jobs use (prepare_batch) are each particle's own group's.
    plan = plans[0]
    geom = SliceGeometry(BOX, xp=np)
    imgs = read_images(s.stack[0], plan["index"])
    _, c = prepare_batch(imgs, plan, slice(None), geom, BOX, 1.25)
    for j, row in enumerate(plan["row"]):
        g = groups[row]
        want = ctf_points(geom, 1.25, s.defocus_u[row], s.defocus_v[row], s.defocus_angle[row],
                          [300.0, 200.0][g - 1], [2.7, 1.4][g - 1], [0.1, 0.07][g - 1], [0.0, 60.0][g - 1])
        np.testing.assert_array_equal(np.asarray(c[j]), want[0])
    # and the two groups' CTFs do differ: particle 0 (group 1) against its CTF with group 2's parameters
    full = make_plan(s, 1)[0]
    _, c = prepare_batch(read_images(s.stack[0], full["index"]), full, slice(None), geom, BOX, 1.25)
    j = int(np.flatnonzero(full["row"] == 0)[0])
    other = ctf_points(geom, 1.25, s.defocus_u[0], s.defocus_v[0], s.defocus_angle[0], 200.0, 1.4, 0.07, 60.0)
    assert np.abs(np.asarray(c[j]) - other[0]).max() > 0.1


def test_optics_groups_pixel_or_box_differ_refused(tmp_path):
    path = group_dataset(tmp_path, rlnImagePixelSize=[1.25, 1.4])
    with pytest.raises(InputError) as e:
        read_particles(path)
    msg = str(e.value)
    assert "mismatched pixel sizes across optics groups (group 1: 1.25 Å, group 2: 1.4 Å)" in msg, msg
    assert e.value.field == "rlnImagePixelSize" and str(path) in msg and "\n" not in msg

    path = group_dataset(tmp_path, rlnImageSize=[BOX, 2 * BOX])
    with pytest.raises(InputError) as e:
        read_particles(path)
    msg = str(e.value)
    assert "mismatched image sizes across optics groups (group 1: 16 px, group 2: 32 px)" in msg, msg
    assert e.value.field == "rlnImageSize" and "\n" not in msg


def test_missing_optics_block_is_named(tmp_path):
    write_images(tmp_path / "stack.mrcs", psize=1.25)
    path = tmp_path / "no_optics.star"
    path.write_text(star_text({"rlnImageName": ["1@stack.mrcs", "2@stack.mrcs"], "rlnDefocusU": [1e4, 1e4],
                               "rlnDefocusV": [1e4, 1e4], "rlnDefocusAngle": [0, 0], "rlnOpticsGroup": [1, 1],
                               "rlnOriginXAngst": [0, 0]}, block="particles"))
    with pytest.raises(InputError, match="no data_optics block") as e:
        read_particles(path)
    assert e.value.field == "data_optics" and "rlnVoltage" in str(e.value) and str(path) in str(e.value)


# ------------------------------------------------------------------ rlnCtfScalefactor, premultiplied CTF

def test_ctf_scalefactor_multiplies_the_ctf(tmp_path):
    scale = np.array([1.0, 0.5, 2.0, 1.0, 0.25, 1.0])
    path = group_dataset(tmp_path, extra={"rlnCtfScalefactor": scale})
    s = read_particles(path)
    np.testing.assert_array_equal(s.ctf_scale, scale)
    plan = make_plan(s, 1)[0]
    np.testing.assert_array_equal(plan["ctf_scale"], scale[plan["row"]])
    geom = SliceGeometry(BOX, xp=np)
    imgs = read_images(s.stack[0], plan["index"])
    _, c = prepare_batch(imgs, plan, slice(None), geom, BOX, 1.25)
    _, c1 = prepare_batch(imgs, dict(plan, ctf_scale=np.ones(s.n)), slice(None), geom, BOX, 1.25)
    np.testing.assert_allclose(np.asarray(c), np.asarray(c1) * plan["ctf_scale"][:, None], rtol=1e-6, atol=0)
    rows = plan["row"]
    unscaled = ctf_points(geom, 1.25, s.defocus_u[rows], s.defocus_v[rows], s.defocus_angle[rows], s.voltage[rows],
                          s.cs[rows], s.amp_contrast[rows])
    np.testing.assert_allclose(np.asarray(c), unscaled * scale[rows, None], rtol=1e-6, atol=1e-7)

    # per optics group (RELION reads the particle table first, then the optics table)
    path = group_dataset(tmp_path, rlnCtfScalefactor=[1.0, 0.8])
    s = read_particles(path)
    np.testing.assert_array_equal(s.ctf_scale, np.where(s.optics_group == 2, 0.8, 1.0))


def test_ctf_premultiplied_refused(tmp_path):
    path = group_dataset(tmp_path, rlnCtfDataAreCtfPremultiplied=[0, 1])
    with pytest.raises(InputError) as e:
        read_particles(path)
    msg = str(e.value)
    assert e.value.field == "rlnCtfDataAreCtfPremultiplied" and "CTF-premultiplied" in msg and "group 2: 1" in msg
    assert str(path) in msg and "\n" not in msg
    path = group_dataset(tmp_path, rlnCtfDataAreCtfPremultiplied=[0, 0])
    assert read_particles(path).n == 6


# ------------------------------------------------------------------ MRC variants

def _patch(path, offset, data: bytes):
    b = bytearray(path.read_bytes())
    b[offset:offset + len(data)] = data
    path.write_bytes(bytes(b))


def test_mrc_without_map_id_read_with_warning(tmp_path, caplog):
    path = group_dataset(tmp_path)
    stack = tmp_path / "stack.mrcs"
    imgs = mrcfile.read(stack)
    _patch(stack, 208, b"\0\0\0\0\0\0\0\0")  # no 'MAP ' id, no machine stamp (old writers)
    with pytest.raises(ValueError):
        mrcfile.open(stack, header_only=True, permissive=False)
    np.testing.assert_array_equal(read_images(stack, [4, 0, 4]), imgs[[4, 0, 4]])
    assert stack_info(stack)[:3] == (6, BOX, BOX)
    s = read_particles(path)
    with caplog.at_level(logging.WARNING, logger="mpi_em"):
        check_stacks(s)
    assert len(caplog.records) == 1, caplog.text
    assert str(stack) in caplog.text and "Map ID" in caplog.text and "1.25 Å" in caplog.text

    # a header that no reader can make sense of is still the one-line header error
    (tmp_path / "junk.mrcs").write_bytes(os.urandom(4096))
    with pytest.raises(InputError) as e:
        read_images(tmp_path / "junk.mrcs", [0])
    assert e.value.field == "header" and "\n" not in str(e.value)
    # and a file without the id whose data is short too
    stack.write_bytes(stack.read_bytes()[:-100])
    with pytest.raises(InputError) as e:
        stack_info(stack)
    assert e.value.field == "header" and "Map ID" in str(e.value) and "\n" not in str(e.value)


def test_mrc_voxel_size_zero_warns_and_uses_the_star(tmp_path, caplog):
    path = group_dataset(tmp_path)
    write_images(tmp_path / "stack.mrcs", psize=0.0)
    s = read_particles(path)
    with caplog.at_level(logging.WARNING, logger="mpi_em"):
        check_stacks(s)
    assert len(caplog.records) == 1
    assert str(tmp_path / "stack.mrcs") in caplog.text and "voxel size is 0" in caplog.text
    np.testing.assert_array_equal(s.pixel_size, 1.25)


def test_float16_stack(tmp_path):
    path = group_dataset(tmp_path)
    stack = tmp_path / "stack.mrcs"
    ref = np.random.default_rng(11).standard_normal((6, BOX, BOX)) * 50
    half = ref.astype(np.float16)
    with mrcfile.new(stack, overwrite=True) as m:
        m.set_data(half)
        m.set_image_stack()
        m.voxel_size = 1.25
    with mrcfile.open(stack, header_only=True) as m:
        assert int(m.header.mode) == 12
    got = read_images(stack, [5, 1, 2])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, half[[5, 1, 2]].astype(np.float32))   # exact: float16 -> float32
    assert np.abs(got - ref[[5, 1, 2]]).max() <= 2.0 ** -11 * np.abs(ref).max() * 2
    check_stacks(read_particles(path))


# ------------------------------------------------------------------ files written by RELION itself

def _gaussian_map(path, box=32, apix=4.0):
    z, y, x = np.mgrid[:box, :box, :box] - box // 2
    vol = np.zeros((box,) * 3, np.float32)
    for (cx, cy, cz), sd in (((0, 0, 0), 3.0), ((5, -3, 2), 2.0), ((-4, 6, -5), 2.5)):
        vol += np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sd * sd)).astype(np.float32)
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(vol)
        m.voxel_size = apix


def _relion_project(tmp_path, ang, out):
    r = subprocess.run([RELION_PROJECT, "--i", "map.mrc", "--o", out, "--ang", ang, "--ctf"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return tmp_path / f"{out}.star"


ANG31 = """
data_optics

loop_
_rlnOpticsGroup #1
_rlnOpticsGroupName #2
_rlnVoltage #3
_rlnSphericalAberration #4
_rlnAmplitudeContrast #5
_rlnImagePixelSize #6
_rlnImageSize #7
_rlnImageDimensionality #8
1 g1 300 2.7 0.1 4.0 32 2
2 g2 200 2.0 0.07 4.0 32 2

data_particles

loop_
_rlnImageName #1
_rlnAngleRot #2
_rlnAngleTilt #3
_rlnAnglePsi #4
_rlnOriginXAngst #5
_rlnOriginYAngst #6
_rlnDefocusU #7
_rlnDefocusV #8
_rlnDefocusAngle #9
_rlnOpticsGroup #10
_rlnCtfScalefactor #11
_rlnPhaseShift #12
_rlnCtfBfactor #13
1@x.mrcs 10 20 30 4.0 -8.0 15000 14000 30 1 1.0 0 0
2@x.mrcs 10 20 30 4.0 -8.0 15000 14000 30 1 0.5 0 0
3@x.mrcs 50 60 70 -6.0 2.5 20000 19000 -40 2 1.0 20 50
4@x.mrcs 100 120 -130 0 0 25000 25500 5 2 1.0 0 0
"""


@needs_relion
def test_relion_project_two_optics_groups(tmp_path):
    """relion_project --ctf with two optics groups (voltage, Cs, Q0 differ), origins in Å, phase shift, B-factor and
    rlnCtfScalefactor: our reader gives back what RELION was given, and RELION's images confirm that the scale
    factor multiplies the CTF (particles 1 and 2 differ only in it: 1 and 0.5)."""
    _gaussian_map(tmp_path / "map.mrc")
    (tmp_path / "ang.star").write_text(ANG31)
    s = read_particles(_relion_project(tmp_path, "ang.star", "proj"))
    check_stacks(s)
    np.testing.assert_array_equal(s.pixel_size, 4.0)
    np.testing.assert_array_equal(s.box, 32)
    np.testing.assert_array_equal(s.optics_group, [1, 1, 2, 2])
    np.testing.assert_array_equal(s.voltage, [300, 300, 200, 200])
    np.testing.assert_array_equal(s.cs, [2.7, 2.7, 2.0, 2.0])
    np.testing.assert_array_equal(s.amp_contrast, [0.1, 0.1, 0.07, 0.07])
    np.testing.assert_array_equal(s.rot, [10, 10, 50, 100])
    np.testing.assert_array_equal(s.tilt, [20, 20, 60, 120])
    np.testing.assert_array_equal(s.psi, [30, 30, 70, -130])
    np.testing.assert_array_equal(s.origin_x, [4.0, 4.0, -6.0, 0.0])   # as written, Å
    np.testing.assert_array_equal(s.origin_y, [-8.0, -8.0, 2.5, 0.0])
    np.testing.assert_array_equal(s.defocus_u, [15000, 15000, 20000, 25000])
    np.testing.assert_array_equal(s.phase_shift, [0, 0, 20, 0])
    np.testing.assert_array_equal(s.bfactor, [0, 0, 50, 0])
    np.testing.assert_array_equal(s.ctf_scale, [1.0, 0.5, 1.0, 1.0])
    imgs = read_images(s.stack[0], s.index)
    assert imgs.shape == (4, 32, 32) and np.abs(imgs[0]).max() > 0
    np.testing.assert_allclose(imgs[1], 0.5 * imgs[0], rtol=0, atol=1e-6 * np.abs(imgs[0]).max())
    plan = make_plan(s, 1)[0]
    _, c = prepare_batch(read_images(s.stack[0], plan["index"]), plan, slice(None), SliceGeometry(32, xp=np), 32, 4.0)
    j0, j1 = (int(np.flatnonzero(plan["row"] == r)[0]) for r in (0, 1))
    np.testing.assert_allclose(np.asarray(c[j1]), 0.5 * np.asarray(c[j0]), rtol=1e-6)


@needs_relion
def test_relion30_file_read_as_relion_converts_it(tmp_path):
    """A RELION 3.0 file (one table, origins in pixels, detector pixel size and magnification, no box) given to
    relion_project: RELION 3.1 converts it (its output is a 3.1 file); our reading of the 3.0 file equals our
    reading of RELION's conversion, field by field."""
    _gaussian_map(tmp_path / "map.mrc")
    cols = relion30_columns(n=4, stack="proj30.mrcs")
    cols["rlnMagnification"] = [25000.0] * 4                             # 10 µm x 1e4 / 25000 = 4 Å
    cols["rlnDetectorPixelSize"] = [10.0] * 4
    for k in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"):
        cols[k] = [cols[k][0]] * 4                                       # RELION makes one optics group of them
    (tmp_path / "ang30.star").write_text(star_text(cols))
    converted = read_particles(_relion_project(tmp_path, "ang30.star", "proj30"))
    ours = read_particles(tmp_path / "ang30.star")
    assert converted.optics is not None and ours.optics is None
    check_stacks(ours)
    for f in ("pixel_size", "box", "voltage", "cs", "amp_contrast", "rot", "tilt", "psi", "defocus_u",
              "defocus_v", "defocus_angle", "ctf_scale"):
        np.testing.assert_allclose(getattr(ours, f), getattr(converted, f), rtol=1e-6, atol=0, err_msg=f)
    # origins: RELION writes rlnOriginXAngst = rlnOriginX x pixel size (6 significant digits)
    np.testing.assert_allclose(ours.origin_x, converted.origin_x, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours.origin_y, converted.origin_y, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours.origin_x, np.asarray(cols["rlnOriginX"]) * 4.0, rtol=1e-12)


def test_origins_written_in_angstrom_drop_the_relion30_pixel_origins(tmp_path):
    """Writing refined origins (Å) for a 3.0 input: the stale rlnOriginX/Y (pixels) go, so that neither our reader
    nor RELION's 3.0 conversion (which writes rlnOriginXAngst = rlnOriginX x pixel size) sees the old values."""
    write_images(tmp_path / "stack.mrcs", psize=1.25)
    (tmp_path / "in.star").write_text(star_text(relion30_columns()))
    s = read_particles(tmp_path / "in.star")
    new_x, new_y = s.origin_x + 1.0, s.origin_y - 2.0
    out = tmp_path / "out.star"
    write_particles(out, s, updates={"rlnOriginXAngst": new_x, "rlnOriginYAngst": new_y})
    t = read_particles(out)
    assert "rlnOriginX" not in t.particles.columns and "rlnOriginY" not in t.particles.columns
    np.testing.assert_array_equal(t.origin_x, new_x)
    np.testing.assert_array_equal(t.origin_y, new_y)
    assert "rlnOriginX" in s.particles.columns  # the input table is not modified
    if RELION_PROJECT is None:
        return
    # RELION reads our output as the 3.0 file it is and keeps our origins
    _gaussian_map(tmp_path / "map.mrc", box=BOX, apix=1.25)
    converted = read_particles(_relion_project(tmp_path, "out.star", "proj"))
    np.testing.assert_allclose(converted.origin_x, new_x, rtol=0, atol=1e-5)
    np.testing.assert_allclose(converted.origin_y, new_y, rtol=0, atol=1e-5)
