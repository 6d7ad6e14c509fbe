"""initial-model's symmetry, as RELION applies it to an ab-initio map: the C1 result is put onto the point
group's standard axes (:func:`mpi_em.symaxis.find_symmetry_frame`, the search of ``relion_align_symmetry``),
symmetrised there (:func:`mpi_em.symaxis.apply_symmetry_frame`), and every particle's pose moved with its class's
map (:func:`mpi_em.symaxis.poses_in_frame`), so that ``run_data.star`` still describes the images of the map."""
from __future__ import annotations

import logging

import numpy as np

from ..symaxis import SymmetryFrame, apply_symmetry_frame, find_symmetry_frame, poses_in_frame

log = logging.getLogger("mpi_em")


def to_point_group(model, particles: dict, group: str, pixel_size: float) -> tuple[np.ndarray, list]:
    """``model`` (K, N, N, N) C1 maps -> (the maps on ``group``'s axes, symmetrised; the frames found), and
    ``particles`` (gathered: rot, tilt, psi in degrees, origin_x/y in Å, class_number 1..K) updated in place."""
    out = np.empty_like(model)
    frames: list[SymmetryFrame] = []
    cls = np.asarray(particles["class_number"])
    for k in range(model.shape[0]):
        frame = find_symmetry_frame(model[k], group, pixel_size)
        out[k] = np.asarray(apply_symmetry_frame(model[k], frame, group))
        sel = cls == k + 1
        if sel.any():
            r, t, p, ox, oy = poses_in_frame(particles["rot"][sel], particles["tilt"][sel], particles["psi"][sel],
                                             particles["origin_x"][sel], particles["origin_y"][sel], frame,
                                             pixel_size=pixel_size)
            for name, v in (("rot", r), ("tilt", t), ("psi", p), ("origin_x", ox), ("origin_y", oy)):
                particles[name][sel] = v
        log.info("class %d onto %s's axes: symmetry score %.3f (unaligned orientations %.3f), centre moved by "
                 "%.1f px", k + 1, group, frame.score, frame.c1_score, float(np.linalg.norm(frame.shift)))
        frames.append(frame)
    return out, frames
