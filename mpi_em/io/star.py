"""RELION particle STAR files: read into per-particle arrays, write back.

Reading: RELION 3.1+ files with ``data_optics`` + ``data_particles`` blocks, or
RELION 3.0 single-block files whose particle table carries the optics columns
(voltage, Cs, Q0 per particle; origins rlnOriginX/Y in pixels; pixel size from
rlnDetectorPixelSize [µm] x 1e4 / rlnMagnification; the box from the stack
header where rlnImageSize is absent). Origins are stored as read, in Å.
Writing: ``starfile.write`` with ``float_format=None`` so pandas writes every
float with ``repr`` (shortest string that round-trips exactly). starfile's
own default, ``'%.6f'``, would silently lose precision (1e-7 -> 0.000000).

Modules: :mod:`.star_read` (reading), :mod:`.star_write` (writing), :mod:`.star_checks` (column validation).
"""
from __future__ import annotations

from .star_read import OPTICS_REQUIRED, PARTICLE_REQUIRED, PIXEL_SIZE_COLUMNS, ParticleStar, read_particles
from .star_write import particles_table, rebase_image_names, write_particles

__all__ = ["OPTICS_REQUIRED", "PARTICLE_REQUIRED", "PIXEL_SIZE_COLUMNS", "ParticleStar", "particles_table",
           "read_particles", "rebase_image_names", "write_particles"]
