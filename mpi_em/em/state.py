"""The EM jobs' typed state: the three modes (:class:`Mode`) and the state carried from one iteration to the next
(:class:`EMState`), which saves itself into the iteration's checkpoint and loads itself back, older checkpoints
included (:meth:`EMState.load`: the one place where old checkpoints are brought up to date)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import zlib
from dataclasses import dataclass, field

import numpy as np

from ..fourier import default_r_max
from ..io.checkpoint import read_checkpoint, write_checkpoint
from .classes import first_shell_2d

log = logging.getLogger("mpi_em")

# checkpoints record the origin sign they were written with (older ones have none: the opposite sign)
ORIGIN_RULE = "relion"
#: per-particle fields carried through the iterations (and the checkpoint) besides the half set
PER_PARTICLE = ("rot", "tilt", "psi", "origin_x", "origin_y", "class_number", "pmax", "loglike", "nsig")
#: options a run started before they existed ran without (their values then)
OPTION_DEFAULTS_OF_OLD_RUNS = {"folds": 1, "refine_offsets": False, "solvent_mask": None, "incr_size": 3,
                               "fsc_jump": False, "local_radius": 1.5, "local_sigma": 0.0,
                               "settle_poses": False, "zero_mask": False, "direction_prior": False}


@dataclass(frozen=True)
class Mode:
    """One EM job: its dimension, whether it is a gold-standard refinement (two independent half sets), and the
    default tau^2 regularisation T."""

    name: str
    dim: int
    gold: bool
    fudge: float

    @property
    def refine(self) -> bool:
        """refine3d: one reference per half set, auto-sampling and convergence (no classes)."""
        return self.name == "refine3d"


MODES = {m.name: m for m in (Mode("refine3d", 3, True, 1.0), Mode("class3d", 3, False, 4.0),
                             Mode("class2d", 2, False, 2.0))}


@dataclass
class EMState:
    """What an EM run carries from one iteration to the next (the same on every rank)."""

    iter: int = 0                       # last finished iteration
    order: int = 0                      # HEALPix order of the angular sampling (3D)
    local: bool = False                 # local searches around the previous poses
    r_cur: float = 4.0                  # current image size (radius, px)
    sigma2: np.ndarray | None = None    # noise spectrum per shell
    offset_sigma: float = 1.5           # px, the offsets' prior width
    class_prior: np.ndarray | None = None
    direction_prior: np.ndarray | None = None  # (K, directions) class3d --direction-prior: RELION's pdf_direction
    maps: np.ndarray | None = None      # the references (half maps / class maps)
    references: np.ndarray | None = None  # refine3d with folds: each fold's reference (its half without it)
    resolution: list = field(default_factory=list)     # Å per iteration (refine3d: gold standard)
    ang_change: list = field(default_factory=list)     # mean pose change per iteration, degrees
    class_history: list = field(default_factory=list)  # class priors per iteration
    best_res: float = 1e9
    no_improve: int = 0
    final: bool = False                 # the next iteration is the last one
    done: bool = False                  # no further iteration
    accuracy: float = 0.0               # degrees, the posteriors' angular spread
    accuracy_global: float = 0.0        # the last one from a search wider than the spread
    perturb: float = 0.0                # the grids' random perturbation, fraction of a step
    offset_step: float = 1.0            # px
    offset_range: float = 3.0           # px
    accuracy_trans: float = 0.0         # px per axis
    offset_change: float = 0.0          # px, mean over particles
    smallest_ang_change: float = 1e9    # degrees, the smallest mean pose change so far (refine3d)
    smallest_offset_change: float = 1e9  # px, the smallest mean offset change so far (refine3d)
    args: dict = field(default_factory=dict)  # the run's options (saved in the checkpoint's pointer)

    #: the scalars saved as JSON in the checkpoint (the rest are arrays)
    SCALARS = ("iter", "order", "local", "r_cur", "offset_sigma", "best_res", "no_improve", "final", "done",
               "accuracy", "accuracy_global", "perturb", "offset_step", "offset_range", "accuracy_trans",
               "offset_change", "smallest_ang_change", "smallest_offset_change")

    @classmethod
    def initial(cls, args, mode: Mode, box: int, apix: float, K: int, ref=None) -> EMState:
        """A new run's state: the references from ``ref`` (3D; 2D ones are made in the first pass)."""
        if mode.dim == 3:
            maps = np.repeat(ref[None], 2 if mode.gold else K, axis=0)
            order = args.healpix_order
            start = box * apix / args.ini_high  # the start's shell
            if mode.gold:
                # refine3d: the start's shell rounded up + 2 (RELION's + --incr-size made iteration 1, two halves
                # from one start, the run's best gold-standard figure: benchmarks/results/initial-model/
                # refine-first-size-cpu-2026-12-05/)
                first = int(np.ceil(start)) + 2
            else:
                # class3d: RELION's (MlOptimiser::updateCurrentResolution at iteration 0: the shell
                # ROUND(box x apix / --ini-high); updateImageSizeAndResolutionPointers: plus --incr-size)
                first = int(np.floor(start + 0.5)) + int(getattr(args, "incr_size", 10))
            r_cur = min(default_r_max(box), max(4, first))
        else:
            # RELION's first size of a reference-free 2D classification (the references are made in the first pass)
            maps, order = None, 0
            r_cur = min(default_r_max(box), first_shell_2d(box) + int(getattr(args, "incr_size", 3)))
        # local searches from the start: class3d --local; refine3d started at an order at or past
        # --local-from-order (around the input poses, as a continued RELION auto-refine)
        local = bool(getattr(args, "local", False)) or (
            mode.gold and int(order) >= int(getattr(args, "local_from_order", 1 << 30)))
        return cls(order=int(order), local=local, r_cur=float(r_cur),
                   offset_sigma=float(args.offset_range / 2.0), class_prior=np.full(K, 1.0 / K), maps=maps,
                   offset_step=float(args.offset_step), offset_range=float(args.offset_range))

    def snapshot(self) -> EMState:
        """The state as it is now, for the background writer: the loop replaces arrays (maps, sigma2, class_prior)
        with new ones every iteration but appends to the lists, so they are copied."""
        return dataclasses.replace(self, resolution=list(self.resolution), ang_change=list(self.ang_change),
                                   class_history=list(self.class_history))

    # ------------------------------------------------------------------------------------ checkpoint
    def save(self, out: str, it: int, mode: Mode, particles: dict, K: int, input_record=None,
             map_files: list[str] | None = None) -> None:
        """Rank 0: this state and the particles' into ``run_itNNN_checkpoint.h5``, then the pointer. ``map_files``:
        the files in ``out`` this iteration's maps were written to, in order (float32, exactly ``maps``): the
        checkpoint then records their names and the maps' CRC-32 instead of a second copy of the maps (at box 360,
        K = 4, 0.75 GB less to write per iteration); other maps are kept in it."""
        arrays = {f"particles/{k}": v for k, v in particles.items()}
        attrs = {"mode": mode.name}
        maps = np.asarray(self.maps)
        if map_files and maps.dtype == np.float32:
            attrs["maps_files"] = json.dumps({"files": list(map_files), "shape": list(maps.shape),
                                              "crc32": maps_crc32(maps)})
        else:
            arrays["maps"] = maps
        if self.references is not None:
            arrays["references"] = self.references
        arrays["sigma2"] = self.sigma2
        arrays["class_prior"] = self.class_prior
        if self.direction_prior is not None:
            arrays["direction_prior"] = self.direction_prior
        arrays["resolution"] = np.asarray(self.resolution, dtype=np.float64)
        arrays["ang_change"] = np.asarray(self.ang_change, dtype=np.float64)
        arrays["class_history"] = np.asarray(self.class_history, dtype=np.float64).reshape(-1, K)
        scal = {k: getattr(self, k) for k in self.SCALARS}
        scal["origin_rule"] = ORIGIN_RULE
        attrs["state"] = json.dumps(scal)
        write_checkpoint(out, it, mode.name, arrays, attrs, {"args": self.args, "input": input_record})

    @classmethod
    def load(cls, folder: str, mode: Mode) -> tuple[dict, EMState, dict]:
        """(pointer, state, particles) of the last finished iteration in ``folder``; checkpoints of earlier
        versions are brought up to date here, and only here."""
        ptr, arrays, attrs = read_checkpoint(folder, mode.name)
        scal = json.loads(attrs["state"])
        particles = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("particles/")}
        # runs started before an option existed ran without it
        ptr["args"] = {**OPTION_DEFAULTS_OF_OLD_RUNS, **ptr["args"]}
        # written before the translational sampling was refined during the run: the options' grid
        for k in ("offset_step", "offset_range"):
            scal.setdefault(k, float(ptr["args"][k]))
        if scal.pop("origin_rule", None) != ORIGIN_RULE:
            # written before origins followed RELION's sign (the image is its projection moved by -origin): those
            # runs stored the image's shift itself, so the same particles' RELION origins are its negation
            particles["origin_x"], particles["origin_y"] = -particles["origin_x"], -particles["origin_y"]
            log.warning("%s: checkpoint written with the old origin sign; its origins were converted to RELION's "
                        "(rlnOriginXAngst = -shift of the projection in the image); the STAR files of its earlier "
                        "iterations keep the old sign", os.path.join(folder, "checkpoint.json"))
        known = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in scal.items() if k in known},
                    maps=arrays["maps"] if "maps" in arrays else _read_maps(folder, ptr, attrs["maps_files"]),
                    references=arrays.get("references"), sigma2=arrays["sigma2"],
                    class_prior=arrays["class_prior"], direction_prior=arrays.get("direction_prior"),
                    resolution=list(arrays["resolution"]),
                    ang_change=list(arrays["ang_change"]),
                    class_history=np.asarray(arrays.get("class_history", np.zeros((0, 1)))).tolist())
        return ptr, state, particles


def maps_crc32(maps: np.ndarray) -> int:
    """CRC-32 of a C-contiguous float32 array's bytes (~4 GB/s: 0.2 s for four box-360 maps)."""
    return zlib.crc32(memoryview(np.ascontiguousarray(maps, dtype=np.float32)).cast("B"))


def _read_maps(folder: str, ptr: dict, record: str) -> np.ndarray:
    """The maps a checkpoint refers to (:meth:`EMState.save`'s ``map_files``), read back from their files and
    checked against the recorded shape and CRC-32: a missing or changed file is an error naming it."""
    from ..errors import InputError
    from ..io import read_images, read_map

    rec = json.loads(record)
    shape, files = tuple(rec["shape"]), rec["files"]
    paths = [os.path.join(folder, f) for f in files]
    for p in paths:
        if not os.path.exists(p):
            raise InputError(p, f"missing: the checkpoint {ptr['checkpoint']} (iteration {ptr['iteration']}) "
                                f"holds its maps by reference to this file; --continue needs it as written")
    if len(paths) == 1 and len(shape) == 3:  # class2d: one stack of the K classes
        maps = read_images(paths[0], np.arange(shape[0]))
    else:
        maps = np.stack([read_map(p)[0] for p in paths])
    if maps.shape != shape or maps_crc32(maps) != rec["crc32"]:
        raise InputError(paths[0] if len(paths) == 1 else folder,
                         f"the maps in {', '.join(files)} are not those the checkpoint {ptr['checkpoint']} "
                         f"recorded (shape {maps.shape} against {shape}, or CRC-32): changed after iteration "
                         f"{ptr['iteration']} was written; --continue needs them as written")
    return maps
