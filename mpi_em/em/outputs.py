"""What the EM jobs write: each iteration's maps, particles STAR, model STAR, plots and checkpoint
(``run_itNNN_*``, rank 0, in the background writer), the final files (``run_*``) and the per-rank timings."""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil

import numpy as np

from ..distributed import root_step
from ..errors import InputError
from ..fsc import shell_frequencies
from ..io import atomic_path, write_map, write_particles, write_stack
from ..io.star_tables import write_model_star
from .classes import class_resolutions, data_vs_prior
from .schedule import final_iteration
from .state import PER_PARTICLE, EMState, Mode

log = logging.getLogger("mpi_em")


def gather_particles(comm, plan) -> dict | None:
    """Every rank's per-particle fields -> rank 0, in the STAR file's row order (None elsewhere)."""
    part = {k: plan[k] for k in ("row", "half") + PER_PARTICLE}
    parts = comm.gather(part, root=0)
    if comm.rank != 0:
        return None
    n = sum(len(p["row"]) for p in parts)
    out = {}
    for k in ("half",) + PER_PARTICLE:
        arr = np.empty(n, dtype=parts[0][k].dtype)
        for p in parts:
            arr[p["row"]] = p[k]
        out[k] = arr
    return out


def star_updates(particles: dict, mode: Mode) -> dict:
    """The particles STAR's columns this job sets."""
    up = {"rlnAnglePsi": particles["psi"], "rlnOriginXAngst": particles["origin_x"],
          "rlnOriginYAngst": particles["origin_y"], "rlnClassNumber": particles["class_number"],
          "rlnMaxValueProbDistribution": particles["pmax"], "rlnLogLikeliContribution": particles["loglike"],
          "rlnNrOfSignificantSamples": particles["nsig"]}
    if mode.dim == 3:
        up["rlnAngleRot"], up["rlnAngleTilt"] = particles["rot"], particles["tilt"]
    if mode.gold:
        up["rlnRandomSubset"] = particles["half"]
    return up


def write_iteration(out: str, it: int, mode: Mode, star, particles: dict, state: EMState, info: dict,
                    meta: dict, figures: bool = True) -> None:
    """Rank 0: an iteration's maps, particles STAR, model STAR, figures (PNG; not with ``figures`` False: the job
    draws them in a writer of their own, :func:`write_figures`), checkpoint, pointer (each written atomically)."""
    box, apix, K = meta["box"], meta["pixel_size"], meta["K"]
    tag = f"run_it{it:03d}"
    maps = state.maps
    files = map_files(tag, mode, maps.shape[0])
    # header statistics a GPU rank computed on its device, where they are those of the maps written here (not after
    # a re-seeding replaced the maps)
    stats = info.get("map_stats")
    stats = stats[1] if stats is not None and stats[0] is maps else [None] * maps.shape[0]
    if mode.dim == 2:
        write_stack(os.path.join(out, files[0]), maps, apix)
    else:
        for name, vol, st in zip(files, maps, stats):
            write_map(os.path.join(out, name), vol, apix, stats=st)
    if mode.gold and info.get("combined") is not None:  # both halves' sums, reconstructed with the gold-standard FSC
        write_map(os.path.join(out, f"{tag}_class001.mrc"), info["combined"], apix, stats=info.get("combined_stats"))
    if info.get("auto_mask") is not None:  # --auto-mask: the mask this iteration used (a postprocess input)
        write_map(os.path.join(out, f"{tag}_mask.mrc"), info["auto_mask"], apix)
    write_particles(os.path.join(out, f"{tag}_data.star"), star, updates=star_updates(particles, mode))
    n_sh = box // 2 + 1
    freqs = shell_frequencies(box, apix)
    general = {"rlnCurrentIteration": it, "rlnCurrentResolution": state.resolution[-1] if state.resolution else 0.0,
               "rlnPixelSize": apix, "rlnNrClasses": K, "rlnHealpixOrder": state.order,
               # the size the iteration used (RELION's: its model STAR is written before the next size is set)
               "rlnCurrentImageSize": int(2 * info.get("r_used", state.r_cur)),
               "rlnSigmaOffsetsAngst": state.offset_sigma * apix,
               "rlnLogLikelihood": info.get("loglike", 0.0)}
    classes = {"rlnReferenceImage": [f"{k + 1:06d}@{tag}_classes.mrcs" if mode.dim == 2 else
                                     f"{tag}_class{k + 1:03d}.mrc" for k in range(K)],
               "rlnClassDistribution": state.class_prior,
               "rlnEstimatedResolution": class_resolutions(info, K, box, apix, mode.gold, state.resolution)}
    gold_fsc = info["fsc"] if mode.gold and "fsc" in info else None
    tau2 = np.atleast_2d(info.get("tau2", np.zeros((1, n_sh))))
    ssnr = None if mode.gold else data_vs_prior(info)
    write_model_star(os.path.join(out, f"{tag}_model.star"), general, classes, freqs, state.sigma2, tau2,
                     fsc=gold_fsc, ssnr=ssnr)
    if figures:
        write_figures(out, it, mode, state, info, meta)
    # checkpoint (everything needed to resume; the maps by reference to the files above) then the pointer
    state.save(out, it, mode, particles, K, meta.get("input"), map_files=files)


def write_figures(out: str, it: int, mode: Mode, state: EMState, info: dict, meta: dict) -> None:
    """Rank 0: an iteration's figures (PNG), as :func:`write_iteration` draws them."""
    gold_fsc = info["fsc"] if mode.gold and "fsc" in info else None
    _plots(out, it, f"run_it{it:03d}", mode, state, shell_frequencies(meta["box"], meta["pixel_size"]), gold_fsc)


def map_files(tag: str, mode: Mode, n_maps: int) -> list[str]:
    """The files an iteration's maps (``EMState.maps``) are written to, in their order: class2d one stack of the K
    classes; refine3d the two unfiltered half maps; class3d one map per class."""
    if mode.dim == 2:
        return [f"{tag}_classes.mrcs"]
    if mode.gold:
        return [f"{tag}_half{h + 1}_class001_unfil.mrc" for h in range(n_maps)]
    return [f"{tag}_class{k + 1:03d}.mrc" for k in range(n_maps)]


def _plots(out, it, tag, mode: Mode, state: EMState, freqs, gold_fsc) -> None:
    from ..plots import class_sizes_png, fsc_png, montage_png

    if gold_fsc is not None:
        fsc_png(os.path.join(out, f"{tag}_fsc.png"), freqs, {"half1 vs half2": gold_fsc},
                title=f"iteration {it}: {state.resolution[-1]:.2f} Å at FSC 0.143")
    if not mode.gold and state.class_history:
        class_sizes_png(os.path.join(out, "run_class_sizes.png"), np.asarray(state.class_history),
                        title=f"{mode.name}: class sizes, iteration {it}")
    if mode.dim == 2:
        order = np.argsort(-state.class_prior)
        montage_png(os.path.join(out, f"{tag}_classes.png"), state.maps[order],
                    labels=[f"{k + 1}: {100 * state.class_prior[k]:.1f}%" for k in order])


def write_final(out: str, it: int, gold: bool, resolution: list) -> None:
    """The final files (run_*): the files of the iteration :func:`final_iteration` chooses (``resolution``: one per
    iteration, refine3d), as hard links where the file system has them (no file of a job is ever written in place:
    each write goes to a new file renamed over the old), else as byte copies."""
    def files(k):  # iteration k's files by name (run_itNNN_<name>), its checkpoint excepted
        prefix = os.path.join(out, f"run_it{k:03d}_")
        return {f[len(prefix):]: f for f in glob.glob(glob.escape(prefix) + "*") if not f.endswith("_checkpoint.h5")}

    k = final_iteration(resolution, gold, it)
    sources = files(k)
    missing = sorted(set(files(it)) - set(sources)) if k != it else []
    if missing:  # removed by the user while the run went on, or written before a version that wrote them
        log.warning("iteration %d (the best gold-standard resolution) lacks %s in %s: the final files are those of "
                    "the last iteration, %d", k, ", ".join(missing), out, it)
        k = it
        sources = files(k)
    if not sources:
        raise InputError(os.path.join(out, f"run_it{k:03d}_*"), "the files from which the final ones are copied "
                         "are missing")
    for name, src in sorted(sources.items()):
        with atomic_path(os.path.join(out, "run_" + name)) as tmp:
            try:
                os.link(src, tmp)
            except OSError:  # no hard links here (some network and FAT file systems)
                shutil.copyfile(src, tmp)
    if gold:
        log.info("final outputs (run_*): iteration %d, gold-standard resolution %.2f Å%s", k, resolution[k - 1],
                 "" if k == it else f" (the last iteration, {it}: {resolution[-1]:.2f} Å)")


def record_timings(comm, out, it, t_iter, parts: dict, timer, n_local, since_start) -> None:
    """Per-phase seconds, GEMM flops and bytes of every rank for this iteration -> rank 0 appends them to
    ``run_timings.json`` (atomically), read by the scaling benchmarks. ``seconds_iteration`` is the iteration's
    compute; ``seconds_since_start`` (rank 0's clock at the same point) also counts what lies between iterations
    (waiting for the previous iteration's files), so its differences are the wall clock per iteration. ``parts``
    (seconds of "references", "estep", "mstep", "update": the references' transforms, the E-step, the M-step, the
    model update with the re-seeding) -> each rank's ``seconds_<part>``."""
    mine = dict(timer.as_dict(), n_particles=n_local, **{f"seconds_{k}": float(v) for k, v in parts.items()})
    every = comm.gather(mine, root=0)

    def write():  # rank 0, agreed on by every rank (a full disk ends the job on every rank, nobody waits)
        path = os.path.join(out, "run_timings.json")
        rows = json.load(open(path)) if os.path.exists(path) else []
        rows = [r for r in rows if r["iteration"] < it]
        rows.append({"iteration": it, "ranks": comm.size, "seconds_iteration": t_iter,
                     "seconds_since_start": since_start, "per_rank": every})
        with atomic_path(path) as tmp:
            with open(tmp, "w") as f:
                json.dump(rows, f, indent=1)

    root_step(comm, write)
