"""initial-model's files: the per-iteration maps and slice montages, the final maps, ``run_data.star``,
``run_model.star`` and the class-size plot."""
from __future__ import annotations

import os

import numpy as np

from ..io import write_map, write_particles


def central_slices(vol) -> np.ndarray:
    """(3, N, N): the central xy, xz and yz sections of a map."""
    c = vol.shape[0] // 2
    return np.stack([vol[c], vol[:, c], vol[:, :, c]])


def slices_png(path, model, labels):
    from ..plots import montage_png

    tiles, names = [], []
    for k, m in enumerate(model):
        for s, axis in zip(central_slices(m), ("z", "y", "x")):
            tiles.append(s)
            names.append(f"{labels[k]} {axis}=0")
    montage_png(path, np.asarray(tiles), labels=names, ncols=3)


def write_iteration(out, it, model, apix, class_prior, res_A):
    tag = f"run_it{it:03d}"
    for k in range(model.shape[0]):
        write_map(os.path.join(out, f"{tag}_class{k + 1:03d}.mrc"), model[k], apix)
    slices_png(os.path.join(out, f"{tag}_slices.png"), model,
                [f"class {k + 1} ({100 * p:.0f}%), {res_A:.0f} Å" for k, p in enumerate(class_prior)])


def write_start(out, s: int, vol, apix):
    """Start ``s``'s (0-based) map at the end of its mini-batch iterations, the map the starts are compared with:
    run_startNNN.mrc."""
    write_map(os.path.join(out, f"run_start{s + 1:03d}.mrc"), vol, apix)


def start_paths(out, n: int) -> list:
    """--continue: the files of the first ``n`` starts' maps, which the checkpoint refers to; InputError naming the
    first one missing."""
    from ..errors import InputError

    paths = [os.path.join(out, f"run_start{s + 1:03d}.mrc") for s in range(n)]
    for s, path in enumerate(paths):
        if not os.path.exists(path):
            raise InputError(path, f"the checkpoint needs the map of start {s + 1} of this job, and it is missing",
                             field="run_startNNN.mrc")
    return paths


def read_starts(out, n: int, box: int) -> list:
    """--continue: the maps of the first ``n`` starts (run_startNNN.mrc, float32 as they were kept)."""
    from ..errors import InputError
    from ..io import read_map

    maps = []
    for path in start_paths(out, n):
        vol = read_map(path)[0]
        if vol.shape != (box,) * 3:
            raise InputError(path, f"map shape {vol.shape}, where this job's box is {box}", field="nx")
        maps.append(vol)
    return maps


def write_final(out, star, particles, model, apix, counts, class_prior, history, starts=None):
    """The final maps, run_data.star, run_model.star (its model_classes table; with several starts also
    model_starts: each start's map, seed, summed log-likelihood of its pass over all particles, and which was
    kept, rlnSelected 1) and the class-size plot."""
    import pandas as pd
    import starfile

    from ..io import atomic_path
    from ..plots import class_sizes_png

    K = model.shape[0]
    for k in range(K):
        write_map(os.path.join(out, f"run_class{k + 1:03d}.mrc"), model[k], apix)
    slices_png(os.path.join(out, "run_slices.png"), model,
                [f"class {k + 1}: {int(c)}" for k, c in enumerate(counts)])
    up = {"rlnAngleRot": particles["rot"], "rlnAngleTilt": particles["tilt"], "rlnAnglePsi": particles["psi"],
          "rlnOriginXAngst": particles["origin_x"], "rlnOriginYAngst": particles["origin_y"],
          "rlnClassNumber": particles["class_number"], "rlnMaxValueProbDistribution": particles["pmax"],
          "rlnLogLikeliContribution": particles["loglike"], "rlnNrOfSignificantSamples": particles["nsig"]}
    write_particles(os.path.join(out, "run_data.star"), star, updates=up)
    classes = pd.DataFrame({"rlnReferenceImage": [f"run_class{k + 1:03d}.mrc" for k in range(K)],
                            "rlnClassDistribution": class_prior, "rlnNrParticles": counts.astype(np.int64)})
    tables = {"model_classes": classes}
    if starts is not None:
        tables["model_starts"] = pd.DataFrame({
            "rlnReferenceImage": [f"run_start{s + 1:03d}.mrc" for s in range(len(starts["seeds"]))],
            "rlnRandomSeed": starts["seeds"], "rlnLogLikelihood": starts["loglike"],
            "rlnSelected": [int(s == starts["chosen"]) for s in range(len(starts["seeds"]))]})
    with atomic_path(os.path.join(out, "run_model.star")) as tmp:
        starfile.write(tables, tmp, float_format=None)
    if len(history):
        class_sizes_png(os.path.join(out, "run_class_sizes.png"), history, title="initial-model: class sizes")
