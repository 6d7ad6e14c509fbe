"""Reading RELION particle STAR files into per-particle arrays (:class:`ParticleStar`).

RELION 3.1+ files with ``data_optics`` + ``data_particles`` blocks, or RELION 3.0 single-block files whose
particle table carries the optics columns (voltage, Cs, Q0 per particle; origins rlnOriginX/Y in pixels; pixel
size from rlnDetectorPixelSize [µm] x 1e4 / rlnMagnification; the box from the stack header where rlnImageSize is
absent). Origins are stored as read, in Å.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .star_checks import _integer, _numeric, _per_group, _positive

log = logging.getLogger("mpi_em")

# Columns that must be in the particle table.
PARTICLE_REQUIRED = ("rlnImageName", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")
# Columns looked up per optics group (optics table first, else the particle table).
OPTICS_REQUIRED = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
PIXEL_SIZE_COLUMNS = ("rlnImagePixelSize", "rlnPixelSize")


@dataclass
class ParticleStar:
    """A particle STAR file: the original tables plus per-particle numpy arrays."""

    path: str
    optics: pd.DataFrame | None
    particles: pd.DataFrame
    stack: np.ndarray          # str, absolute path of each particle's .mrcs
    index: np.ndarray          # int64, 0-based slice in the stack
    defocus_u: np.ndarray      # Å
    defocus_v: np.ndarray      # Å
    defocus_angle: np.ndarray  # deg
    voltage: np.ndarray        # kV
    cs: np.ndarray             # mm
    amp_contrast: np.ndarray
    phase_shift: np.ndarray    # deg
    bfactor: np.ndarray        # Å^2
    pixel_size: np.ndarray     # Å
    box: np.ndarray            # int64, pixels
    rot: np.ndarray            # deg
    tilt: np.ndarray           # deg
    psi: np.ndarray            # deg
    origin_x: np.ndarray       # Å
    origin_y: np.ndarray       # Å
    class_number: np.ndarray   # int64
    random_subset: np.ndarray  # int64
    optics_group: np.ndarray   # int64
    ctf_scale: np.ndarray      # rlnCtfScalefactor (1 where absent): multiplies the CTF, as RELION's CTF::getCTF
    pixel_size_field: str = "rlnImagePixelSize"  # where the pixel size was read (named in later errors)
    box_source: str = "rlnImageSize"             # where the box size was read

    @property
    def n(self) -> int:
        return int(len(self.index))


def _as_frame(block) -> pd.DataFrame | None:
    import pandas as pd
    if isinstance(block, pd.DataFrame):
        return block
    if isinstance(block, dict) and block:  # a one-row table written as a simple block
        return pd.DataFrame({k: [v] for k, v in block.items()})
    return None


def _load_blocks(path):
    import starfile
    if not os.path.exists(path):
        raise InputError(path, "STAR file not found")
    if os.path.isdir(path):
        raise InputError(path, "is a folder, not a STAR file")
    if not os.access(path, os.R_OK):
        raise InputError(path, "STAR file is not readable (permission denied)")
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        if b"\x00" in head:
            raise InputError(path, "not a STAR file (binary content)")
        head.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(path, "not a STAR file (not UTF-8 text)") from None
    except OSError as e:
        raise InputError(path, f"cannot read STAR file: {e.strerror or e}") from e
    try:
        blocks = starfile.read(path, always_dict=True, parse_as_string=["rlnImageName"])
    except Exception as e:  # starfile/pandas parse errors
        raise InputError(path, f"not a valid STAR file: {type(e).__name__}: {e}") from e
    if not blocks:
        raise InputError(path, "not a STAR file (no data_ blocks found)")
    return blocks


def _pick_tables(path, blocks):
    if "particles" in blocks:
        particles = _as_frame(blocks["particles"])
        if particles is None:
            raise InputError(path, "data_particles is empty or not a table", field="data_particles")
        optics = _as_frame(blocks.get("optics"))
        return optics, particles
    # Old style: one table holding everything.
    frames = [(k, _as_frame(v)) for k, v in blocks.items()]
    frames = [(k, f) for k, f in frames if f is not None and "rlnImageName" in f.columns]
    if len(frames) == 1:
        return None, frames[0][1]
    if not frames:
        raise InputError(path, "no data_particles block and no table with rlnImageName", field="data_particles")
    raise InputError(path, "several tables with rlnImageName and none named data_particles", field="data_particles")


def _parse_image_names(path, names: pd.Series):
    s = names.astype(str).to_numpy(dtype=object)
    idx = np.empty(len(s), dtype=np.int64)
    stacks = np.empty(len(s), dtype=object)
    for i, name in enumerate(s):
        num, at, stack = name.partition("@")
        num = num.strip()
        stack = stack.strip()
        if not at or not stack or not num.lstrip("+-").isdigit():
            raise InputError(path, f"malformed image name {name!r} in row {i + 1} of data_particles "
                                   "(expected INDEX@STACK.mrcs)", field="rlnImageName")
        k = int(num)
        if k < 1:
            raise InputError(path, f"image index {k} in row {i + 1} of data_particles is below 1 "
                                   "(indices are 1-based)", field="rlnImageName")
        idx[i] = k - 1
        stacks[i] = stack
    return idx, stacks


def _resolve_stacks(star_path, stacks: np.ndarray) -> np.ndarray:
    import pandas as pd
    star_dir = os.path.dirname(os.path.abspath(star_path))
    resolved = {}
    for rel in pd.unique(stacks):
        if os.path.isabs(rel):
            p = rel
        elif os.path.exists(rel):
            p = os.path.abspath(rel)
        else:
            p = os.path.join(star_dir, rel)
        resolved[rel] = os.path.normpath(p)
    return np.array([resolved[s] for s in stacks], dtype=str)


def read_particles(path) -> ParticleStar:
    """Read a RELION particle STAR file. Raises InputError naming file and field."""
    path = os.fspath(path)
    blocks = _load_blocks(path)
    optics, particles = _pick_tables(path, blocks)
    particles = particles.reset_index(drop=True)
    n = len(particles)
    if n == 0:
        raise InputError(path, "no particles in the file", field="data_particles")

    for col in PARTICLE_REQUIRED:
        if col not in particles.columns:
            raise InputError(path, "required column missing from data_particles", field=col)

    # ---- optics: per-group values, mapped onto particles
    if optics is not None:
        optics = optics.reset_index(drop=True)
        if len(optics) == 0:
            raise InputError(path, "data_optics has no rows", field="data_optics")
        if "rlnOpticsGroup" not in optics.columns:
            raise InputError(path, "required column missing from data_optics", field="rlnOpticsGroup")
        if "rlnOpticsGroup" not in particles.columns:
            raise InputError(path, "required column missing from data_particles "
                                   "(the file has a data_optics block)", field="rlnOpticsGroup")
        groups = _integer(path, optics, "rlnOpticsGroup", "optics")
        if len(set(groups.tolist())) != len(groups):
            raise InputError(path, "duplicate optics group numbers in data_optics", field="rlnOpticsGroup")
        pgroup = _integer(path, particles, "rlnOpticsGroup", "particles")
        lookup = {g: i for i, g in enumerate(groups.tolist())}
        rows = np.empty(n, dtype=np.int64)
        for i, g in enumerate(pgroup.tolist()):
            if g not in lookup:
                raise InputError(path, f"row {i + 1} of data_particles has optics group {g}, "
                                       f"which is not in data_optics (groups: {sorted(lookup)})",
                                 field="rlnOpticsGroup")
            rows[i] = lookup[g]
    else:
        pgroup = (_integer(path, particles, "rlnOpticsGroup", "particles")
                  if "rlnOpticsGroup" in particles.columns else np.ones(n, dtype=np.int64))
        rows = None

    def optics_value(cols, required=True, default=None):
        """Per-particle values of the first of ``cols`` found (optics table first)."""
        for col in cols:
            if optics is not None and col in optics.columns:
                return _numeric(path, optics, col, "optics")[rows], col
            if col in particles.columns:
                return _numeric(path, particles, col, "particles"), col
        if required:
            where = "data_optics or data_particles" if optics is not None else \
                "data_particles (the file has no data_optics block)"
            raise InputError(path, f"required column missing from {where}", field=cols[0])
        return np.full(n, default, dtype=np.float64), None

    if optics is None and "rlnOpticsGroup" in particles.columns:
        missing = [c for c in OPTICS_REQUIRED if c not in particles.columns]
        if missing:  # a RELION 3.1+ particle table whose optics block is gone
            raise InputError(path, f"no data_optics block: data_particles has rlnOpticsGroup (RELION 3.1+ format) "
                                   f"but neither block gives {', '.join(missing)}", field="data_optics")

    voltage, _ = optics_value(("rlnVoltage",))
    cs, _ = optics_value(("rlnSphericalAberration",))
    amp, _ = optics_value(("rlnAmplitudeContrast",))
    index, stacks = _parse_image_names(path, particles["rlnImageName"])
    stack_paths = _resolve_stacks(path, stacks)
    # A RELION 3.1+ file (data_optics) must give the pixel size, as RELION's ObservationModel requires; a 3.0 file
    # (one table) may give it as detector pixel size and magnification. The box may be absent from both (RELION's
    # ObservationModel: hasBoxSizes; relion_project writes none when it converts a 3.0 file): then it is the first
    # stack's, and check_stacks checks that every stack has it.
    pixel_size, pixel_field = _pixel_size(path, optics_value, stack_paths, optics is None)
    box_f, box_col = optics_value(("rlnImageSize",), required=False, default=np.nan)
    box_source = "rlnImageSize"
    if box_col is None:
        box_f = np.full(n, float(_first_stack_info(path, stack_paths, "rlnImageSize")[2]))
        box_source = f"the first stack {stack_paths[0]}"
    if np.any(box_f != np.round(box_f)) or np.any(box_f < 1):
        raise InputError(path, "image size must be a positive integer", field="rlnImageSize")
    box = box_f.astype(np.int64)

    # All particles must share one pixel size and one box size (voltage, Cs, Q0 may differ: per-particle CTFs).
    if not np.allclose(pixel_size, pixel_size[0], rtol=1e-6, atol=0):
        detail = _per_group(pgroup, pixel_size, optics is not None, " Å")
        raise InputError(path, f"mismatched pixel sizes across {detail}; one pixel size and one box size for all "
                               "particles is needed (rescale the groups to one, or process them separately)",
                         field=pixel_field)
    if np.any(box != box[0]):
        detail = _per_group(pgroup, box, optics is not None, " px")
        raise InputError(path, f"mismatched image sizes across {detail}; one pixel size and one box size for all "
                               "particles is needed (re-extract to one box, or process the groups separately)",
                         field="rlnImageSize")

    premult, _ = optics_value(("rlnCtfDataAreCtfPremultiplied",), required=False, default=0.0)
    if np.any(premult != 0):
        detail = _per_group(pgroup, premult, optics is not None, "")
        raise InputError(path, f"the images are CTF-premultiplied ({detail}), which is not supported: "
                               "re-extract the particles without CTF premultiplication",
                         field="rlnCtfDataAreCtfPremultiplied")

    def col_or(col, default):
        if col in particles.columns:
            return _numeric(path, particles, col, "particles")
        return np.full(n, default, dtype=np.float64)

    if "rlnOriginXAngst" in particles.columns or "rlnOriginX" not in particles.columns:
        origin_x = col_or("rlnOriginXAngst", 0.0)
        origin_y = col_or("rlnOriginYAngst", 0.0)
    else:  # pre-3.1 origins in pixels (RELION 3.1's conversion of 3.0 files multiplies them by the pixel size)
        origin_x = col_or("rlnOriginX", 0.0) * pixel_size
        origin_y = col_or("rlnOriginY", 0.0) * pixel_size

    phase_shift, _ = optics_value(("rlnPhaseShift",), required=False, default=0.0)
    # RELION's CTF::readValue looks in the particle table first, then in the optics table (default 1)
    if "rlnCtfScalefactor" in particles.columns:
        ctf_scale = _numeric(path, particles, "rlnCtfScalefactor", "particles")
    else:
        ctf_scale, _ = optics_value(("rlnCtfScalefactor",), required=False, default=1.0)

    return ParticleStar(
        path=os.path.abspath(path),
        optics=optics,
        particles=particles,
        stack=stack_paths,
        index=index,
        defocus_u=_numeric(path, particles, "rlnDefocusU", "particles"),
        defocus_v=_numeric(path, particles, "rlnDefocusV", "particles"),
        defocus_angle=_numeric(path, particles, "rlnDefocusAngle", "particles"),
        voltage=voltage,
        cs=cs,
        amp_contrast=amp,
        phase_shift=phase_shift,
        bfactor=col_or("rlnCtfBfactor", 0.0),
        pixel_size=pixel_size,
        box=box,
        rot=col_or("rlnAngleRot", 0.0),
        tilt=col_or("rlnAngleTilt", 0.0),
        psi=col_or("rlnAnglePsi", 0.0),
        origin_x=origin_x,
        origin_y=origin_y,
        class_number=(_integer(path, particles, "rlnClassNumber", "particles")
                      if "rlnClassNumber" in particles.columns else np.ones(n, dtype=np.int64)),
        random_subset=(_integer(path, particles, "rlnRandomSubset", "particles")
                       if "rlnRandomSubset" in particles.columns else np.zeros(n, dtype=np.int64)),
        optics_group=pgroup.astype(np.int64),
        ctf_scale=ctf_scale,
        pixel_size_field=pixel_field,
        box_source=box_source,
    )


def _first_stack_info(path, stack_paths, field):
    """stack_info of the first particle's stack, for a value the STAR file lacks (``field``)."""
    from .mrc import stack_info
    if not os.path.isfile(stack_paths[0]):
        raise InputError(stack_paths[0], f"stack file not found (referenced by row 1 of {path}, which has no "
                                         f"{field}: the stack header gives it)", field="rlnImageName")
    return stack_info(stack_paths[0])


def _pixel_size(path, optics_value, stack_paths, old_style: bool):
    """Per-particle pixel size (Å) and the column it came from: rlnImagePixelSize (RELION 3.1+) or rlnPixelSize;
    else RELION 3.0's rlnDetectorPixelSize (µm) x 1e4 / rlnMagnification (as RELION's own readers of 3.0 files,
    e.g. src/apps/project.cpp: angpix = 10000. * dstep / mag); else the first stack's header voxel size, with a
    warning; else an error naming the columns."""
    for col in PIXEL_SIZE_COLUMNS:
        vals, found = optics_value((col,), required=False, default=np.nan)
        if found:
            _positive(path, vals, col)
            return vals, col
    dstep, has_dstep = optics_value(("rlnDetectorPixelSize",), required=False, default=np.nan)
    mag, has_mag = optics_value(("rlnMagnification",), required=False, default=np.nan)
    has_dstep, has_mag = has_dstep is not None, has_mag is not None
    if has_dstep and has_mag:
        _positive(path, dstep, "rlnDetectorPixelSize")
        _positive(path, mag, "rlnMagnification")
        return dstep * 1e4 / mag, "rlnDetectorPixelSize"
    if has_dstep != has_mag:
        have, lack = ("rlnDetectorPixelSize", "rlnMagnification")[:: 1 if has_dstep else -1]
        raise InputError(path, f"{have} is given but {lack} is not (the RELION 3.0 pixel size needs both)",
                         field=lack)
    if not old_style:
        raise InputError(path, "required column missing from data_optics or data_particles",
                         field=PIXEL_SIZE_COLUMNS[0])
    vs = _first_stack_info(path, stack_paths, "pixel size")[3]
    if vs > 0:
        log.warning("%s: no pixel size (rlnImagePixelSize, or rlnDetectorPixelSize and rlnMagnification); "
                    "using the voxel size of the stack header of %s: %g Å", path, stack_paths[0], vs)
        return np.full(len(stack_paths), vs), "rlnImagePixelSize"
    raise InputError(path, "no pixel size: neither rlnImagePixelSize (RELION 3.1+) nor rlnDetectorPixelSize and "
                           f"rlnMagnification (RELION 3.0), and the stack header of {stack_paths[0]} has voxel size 0",
                     field="rlnImagePixelSize")
