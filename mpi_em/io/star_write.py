"""Writing RELION particle STAR files: ``starfile.write`` with ``float_format=None`` so pandas writes every float
with ``repr`` (shortest string that round-trips exactly). starfile's own default, ``'%.6f'``, would silently lose
precision (1e-7 -> 0.000000). Image names are rebased for the output folder."""
from __future__ import annotations

import os

import numpy as np

from .atomic import atomic_path
from .star_read import ParticleStar


def rebase_image_names(star: ParticleStar, out_dir) -> pd.DataFrame:
    """A copy of ``star``'s particle table for a STAR file written in ``out_dir``: image names whose stack was
    found relative to the input STAR's folder are rewritten relative to ``out_dir`` (same file, from the new
    folder); absolute names and names that resolved from the working directory (RELION's project-relative
    convention) are kept. The input table is not modified. One decision per stack file, not per particle: each
    stack token resolved to one path in :func:`read_particles` (``star.stack``)."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    particles = star.particles.copy()
    parts = particles["rlnImageName"].astype(str).str.partition("@")
    tokens = parts[2].to_numpy(dtype=str)
    uniq, first = np.unique(tokens, return_index=True)
    new = {}
    for rel, path in zip(uniq, star.stack[first]):
        kept = os.path.isabs(rel.strip()) or os.path.normpath(os.path.abspath(rel.strip())) == path
        new[rel] = rel if kept else os.path.relpath(path, out_dir)
    particles["rlnImageName"] = parts[0] + "@" + parts[2].map(new)
    return particles


def particles_table(optics_rows: list[dict], particle_columns: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Build (optics_df, particles_df) from a list of optics-group dicts and a
    dict of equal-length particle columns (lists / numpy arrays)."""
    import pandas as pd
    optics = pd.DataFrame(list(optics_rows))
    lengths = {k: len(v) for k, v in particle_columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"particle columns have different lengths: {lengths}")
    particles = pd.DataFrame({k: np.asarray(v) for k, v in particle_columns.items()})
    return optics, particles


def write_particles(path, star, updates: dict | None = None) -> None:
    """Write optics + particles blocks atomically.

    ``star`` is a ParticleStar or an (optics_df, particles_df) tuple (optics_df
    may be None: a single ``data_particles`` block). ``updates`` maps column
    names to length-N arrays that are added or replace existing columns.
    Floats are written with repr precision, so a read->write->read round trip
    preserves every value exactly.
    """
    import starfile
    path = os.fspath(path)
    if isinstance(star, ParticleStar):
        optics, particles = star.optics, star.particles
    else:
        optics, particles = star
    particles = particles.copy()
    # Origins updated in Å supersede RELION 3.0's pixel origins: a stale rlnOriginX/Y left beside them would be
    # read by RELION in their place (its 3.0 -> 3.1 conversion, StarConverter::translateOffsets in
    # src/star_converter.cpp, writes rlnOriginXAngst = rlnOriginX x pixel size over any existing value).
    for axis in ("X", "Y", "Z"):
        if f"rlnOrigin{axis}Angst" in (updates or {}) and f"rlnOrigin{axis}" in particles.columns:
            particles = particles.drop(columns=[f"rlnOrigin{axis}"])
    for col, values in (updates or {}).items():
        values = np.asarray(values)
        if values.ndim != 1 or len(values) != len(particles):
            raise ValueError(f"update column {col} has shape {values.shape}, expected ({len(particles)},)")
        particles[col] = values
    blocks = {}
    if optics is not None:
        blocks["optics"] = optics
    blocks["particles"] = particles
    with atomic_path(path) as tmp:
        starfile.write(blocks, tmp, float_format=None)
