"""Memory model of a rank: what each job holds, in bytes, known before the first iteration.

Derived from how the jobs allocate (figures per rank; ``vox`` = Np^2 (Np/2 + 1) voxels of one padded half
volume, Np = pad x box; ``m`` = the in-ball points of an image, |k| <= r; ``n`` = particles per batch):

- **references** (EM jobs): one complex128 Fourier volume per reference (:class:`mpi_em.em.references.References`,
  ``volume_fft`` of the float32 maps divided by the float64 gridding factor): 16 vox bytes each, 2 x folds
  (refine3d) or K (class3d); class2d: K planes of Np (Np/2 + 1). Every rank holds all of them during the
  E-step, which gives them back when it ends (:func:`mpi_em.em.engine.end_e_step`).
- **accumulators**: F complex128 + W float64 per volume, 24 vox bytes, 2 x folds (refine3d), K (class*), 2
  (reconstruct); the EM jobs' E-step inserts into full local partial sums on every rank
  (:func:`mpi_em.em.model.e_step_accumulators`), which stay allocated through the M-step, or, with owned
  accumulators (``--owned-accumulators``), into the rank's kz planes only: 24 vox / P bytes per volume.
- **cached images** (``--cache-images``): 4 box^2 bytes per particle of the rank.
- **batch workspace**: images read ahead (3 batches, float32), in-ball FFTs and CTFs (12 n m), the coarse pass
  (global grid: shifted images 8 n T m, the projections of the grid kept per reference set 12 K C m as
  float32 GEMM operands, 16 K C m more while a set is made, likelihood chunks of at most 2^24 (CPU) or 2^31
  (GPU) float32 elements and their marginal's temporaries; local searches: 48 n K L m), the fine pass (16 n S m
  over the S = 8 x selected poses, 48 n S m) and the insertion (48 n S m), and on CPU ranks the NumPy stencils of the
  trilinear projector and back-projector (``PROJECT_BYTES_PER_CORNER``, ``INSERT_BYTES_PER_CORNER`` per
  point and corner, measured with tracemalloc) and the back-projector's ``bincount`` over the whole
  accumulator stack (8 V vox). GPU ranks use the fused kernels: no stencil arrays. Owned accumulators: the
  routed points (``ROUTED_BYTES_PER_RECORD`` per point and owner) and one chunk of stencils.
- **FFT plans**: CPU ranks: NumPy's pocketfft caches only twiddle factors (O(Np)), counted as 0. GPU ranks:
  cuFFT plans are kept by CuPy's plan cache with work areas up to the transform's size; the jobs clear the
  cache between phases (:func:`release_device_memory`), so the E-step keeps the batched image transform's and
  the reference and reconstruction phases their chunked volume transforms' (~1/16 of a volume).
- **reconstruction** (M-step): the owned kz planes after the reduce-scatter (24 V vox / P; none at P = 1, where
  the accumulators are used as they are, nor with owned accumulators), the fold sums and leave-one-fold-out
  volumes of refine3d, the shell statistics (2^24 voxels at a time) and the transients of the reconstruction:
  serial (P = 1) ``RECONSTRUCT_SERIAL_BYTES_PER_VOXEL`` per voxel of one volume at a time, distributed
  ``RECONSTRUCT_DIST_BYTES_PER_VOXEL`` x V + ``RECONSTRUCT_DIST_FIXED`` per owned voxel (all volumes at once).

The peak is the largest of the job's phases (EM: references, E-step, M-step; reconstruct: insertion, reduction,
reconstruction), each the sum of what is alive in it. The E-step terms are evaluated at the largest image size
the job can reach (r = box/2 - 1) and the largest pose grid its options allow: an upper bound for a run (early
iterations at low resolution use far less).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from .distvolume import POINT_CHUNK
from .errors import MpiEmError

#: NumPy trilinear projection (``fourier.project`` of complex128 references): bytes alive per in-ball point
#: and stencil corner (coordinates, indices, weights, gathered values); tracemalloc: 44.2-44.8 at box 32-64
PROJECT_BYTES_PER_CORNER = 46
#: NumPy back-projection (``fourier.backproject``): per point and corner, besides the bincount over the whole
#: accumulator stack; tracemalloc: 41.1-41.4 at box 32-64
INSERT_BYTES_PER_CORNER = 42
#: ``fourier.reconstruct`` (one rank): bytes per voxel of the padded half volume (its complex128 working copy,
#: the float64 copy of W until the division, chunks of ~1/16 of the volume); tracemalloc: 25.6-27.0 at box
#: 32-64 (97 before the division and inverse FFT went by chunks of planes, in place)
RECONSTRUCT_SERIAL_BYTES_PER_VOXEL = 28
#: ``distvolume.distributed_reconstruct``: per owned voxel, per volume and fixed; tracemalloc: 48.4-48.8 per
#: volume, 67-68 for one volume
RECONSTRUCT_DIST_BYTES_PER_VOXEL = 49
RECONSTRUCT_DIST_FIXED = 20
#: ``fourier.volume_fft`` of one reference (the box's rows transformed, placed, then in-place FFTs by chunks) on
#: top of its output; tracemalloc: 18.2-20.2 per voxel including the 16-byte output at pad 2-3 (50.4 before it
#: stopped making the padded real volume); at pad 1 the rows are the volume: 44
REFERENCE_FFT_BYTES_PER_VOXEL = 5
REFERENCE_FFT_BYTES_PER_VOXEL_PAD1 = 30
#: the coarse pass's likelihood elements per GEMM chunk (``em.engine.COARSE_ELEMENTS``)
COARSE_ELEMENTS = {"cpu": 2 ** 24, "gpu": 2 ** 31}
#: images read ahead by ``particles.iter_batches`` (depth 2) besides the batch in use
PREFETCH = 2
#: per point of an image in the streaming insertion of reconstruct --max-volume-memory (jobs/reconstruct.py)
STREAM_BYTES_PER_POINT = 8 * 192
#: the EM jobs' routed insertion into owned planes (``--owned-accumulators``,
#: :meth:`mpi_em.distvolume.PlaneOwnerAccumulator.backproject_points`): a point travels as one 56-byte record to
#: each owner of the two kz planes its stencil touches (two ranks when P > 1), and the receiver builds the
#: stencils in chunks of ``POINT_CHUNK`` points, ~540 bytes per point of a chunk (tracemalloc at box 48: 410-540)
ROUTED_BYTES_PER_RECORD = 56
ROUTED_STENCIL_BYTES = 540

TERMS = ("references", "accumulators", "cached_images", "batch_workspace", "fft_plans", "reconstruction")


# ------------------------------------------------------------------------------------------ sizes
def half_volume(box: int, pad: int) -> int:
    """Voxels of one padded Fourier half volume (Np, Np, Np//2+1)."""
    npad = pad * box
    return npad * npad * (npad // 2 + 1)


def owned_voxels(box: int, pad: int, ranks: int) -> int:
    """Voxels of the largest rank's owned kz planes (planes z = r mod P)."""
    npad = pad * box
    return -(-npad // ranks) * npad * (npad // 2 + 1)


def ball_points(box: int, r: float | None = None) -> int:
    """In-ball points |k| <= r of an image's rfft2 grid (:class:`mpi_em.fourier.SliceGeometry`'s m)."""
    r = box // 2 - 1 if r is None else float(r)
    ky = np.fft.fftfreq(box, 1.0 / box)[:, None]
    kx = np.arange(box // 2 + 1)[None, :]
    return int(((ky * ky + kx * kx) <= r * r).sum())


def relion_gpu_bytes(box: int) -> int:
    """RELION's own estimate for a GPU rank (``src/error.h``): about 1.1e-8 x (2N)^3 GB."""
    return int(1.1e-8 * (2 * box) ** 3 * 1e9)


def fmt(n: float) -> str:
    """Bytes in binary units, 3 significant figures."""
    n = float(n)
    for unit, s in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= s:
            return f"{n / s:.3g} {unit}"
    return f"{int(n)} B"


# ------------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class EMInputs:
    """What an EM job's memory depends on (``mode``: refine3d, class3d or class2d)."""

    mode: str
    box: int
    pad: int = 2
    K: int = 1
    folds: int = 1
    batch: int = 64
    ranks: int = 1
    device: str = "cpu"            # "cpu" or "gpu"
    n_particles: int = 0           # the whole data set (a rank holds ceil(n / P))
    cache_images: bool = False
    coarse_poses: int = 0          # orientations of the largest global grid per class (0: local searches only)
    local_poses: int = 19          # rotations of a local search (radius 1.5 steps)
    translations: int = 9          # the most coarse translations
    n_select: int = 4
    class_select: int = 10
    r: float | None = None         # largest in-ball radius of the E-step (None: box/2 - 1)
    owned_accumulators: bool = False  # 3D: the E-step inserts into owned kz planes only (routed per batch)

    @property
    def dim(self) -> int:
        return 2 if self.mode == "class2d" else 3

    @property
    def n_volumes(self) -> int:
        return 2 * self.folds if self.mode == "refine3d" else self.K


@dataclass(frozen=True)
class ReconstructInputs:
    """What ``mpi-em reconstruct`` needs: ``stream`` = --max-volume-memory's owned-planes mode."""

    box: int
    pad: int = 2
    batch: int = 256
    ranks: int = 1
    device: str = "cpu"
    n_particles: int = 0
    stream: bool = False
    r: float | None = None
    sym_copies: int = 1

    mode = "reconstruct"


# ------------------------------------------------------------------------------------------ estimate
@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank: ``terms`` at the peak phase (named as :data:`TERMS`), every phase's terms, RELION's
    figure for a GPU rank of the same box."""

    inputs: EMInputs | ReconstructInputs
    phases: dict = field(default_factory=dict)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda p: sum(self.phases[p].values()))

    @property
    def terms(self) -> dict:
        t = self.phases[self.peak_phase]
        return {k: int(t.get(k, 0)) for k in TERMS}

    @property
    def total(self) -> int:
        return int(sum(self.terms.values()))

    @property
    def relion_bytes(self) -> int:
        return relion_gpu_bytes(self.inputs.box)

    def fits(self, limit: int | None) -> bool:
        return limit is None or self.total <= limit

    def suggestions(self, limit: int) -> list[str]:
        """Changes of the job's options that would fit ``limit`` bytes per rank (each alone), best first."""
        return suggestions(self.inputs, limit)

    def summary(self) -> str:
        parts = ", ".join(f"{k.replace('_', ' ')} {fmt(v)}" for k, v in self.terms.items() if v)
        return (f"{fmt(self.total)} per rank at the peak ({self.peak_phase}: {parts}); RELION's estimate for a "
                f"GPU rank at box {self.inputs.box}: {fmt(self.relion_bytes)}")

    def as_dict(self) -> dict:
        return {"inputs": dict(asdict(self.inputs), mode=self.inputs.mode), "peak_bytes": self.total,
                "peak_phase": self.peak_phase, "terms_bytes": self.terms,
                "phases_bytes": {p: {k: int(v) for k, v in t.items()} for p, t in self.phases.items()},
                "relion_gpu_rank_bytes": self.relion_bytes}


def estimate(inp) -> MemoryEstimate:
    """The model for an :class:`EMInputs` or a :class:`ReconstructInputs`."""
    if isinstance(inp, ReconstructInputs):
        return MemoryEstimate(inp, _reconstruct_phases(inp))
    if inp.mode not in ("refine3d", "class3d", "class2d"):
        raise ValueError(f"unknown job {inp.mode!r}")
    return MemoryEstimate(inp, _em_phases(inp))


def _images_per_rank(n: int, ranks: int) -> int:
    return -(-int(n) // max(1, ranks))


def _fine_candidates(inp: EMInputs) -> int:
    """Fine-pass poses per particle: S selected coarse poses x the oversampling (8 in 3D, 2 in 2D)."""
    C = inp.coarse_poses if inp.coarse_poses else inp.local_poses
    s = min(inp.n_select, C)
    if inp.K > 1:
        s += min(inp.K, inp.class_select) - 1
    return s * (8 if inp.dim == 3 else 2)


def _em_phases(inp: EMInputs) -> dict:
    cpu = inp.device == "cpu"
    box, pad, K, V = inp.box, inp.pad, inp.K, inp.n_volumes
    npad = pad * box
    vox = half_volume(box, pad) if inp.dim == 3 else npad * (npad // 2 + 1)
    own = owned_voxels(box, pad, inp.ranks) if inp.dim == 3 and inp.ranks > 1 else vox
    routed = inp.owned_accumulators and inp.dim == 3
    corners = 8 if inp.dim == 3 else 4
    n_local = _images_per_rank(inp.n_particles, inp.ranks)
    n = max(1, min(inp.batch, n_local)) if n_local else inp.batch
    m = ball_points(box, inp.r)
    T = inp.translations
    img = 4 * box * box

    refs = 16 * V * vox
    acc = 24 * V * (own if routed else vox)
    cached = n_local * img if inp.cache_images else 0
    # GPU: cuFFT plans and their work areas; the job gives them back (with CuPy's pool) between the phases
    # (memory.release_device_memory), so the E-step keeps only the image transform's
    fft_img = 0 if cpu else 8 * n * box * (box // 2 + 1)
    # the references' transforms go by chunks (fourier.volume_fft: ~1/16 of a volume per plan) in 3D
    fft_vol = 0 if cpu else (16 * vox // 16 if inp.dim == 3 else 16 * V * vox)

    # ---- batch workspace (the E-step's largest sub-phase)
    base = 12 * n * m + (0 if inp.cache_images else (1 + PREFETCH) * n * img)
    sets = 1  # reference sets whose grid projections are held at once (em.engine._coarse_pass: one at a time)
    proj_cache = 0
    coarse = 0
    if inp.coarse_poses:
        KC = K * inp.coarse_poses
        proj_cache = sets * 12 * KC * m
        make = 16 * KC * m
        if cpu:  # projected in chunks of 2^24 / (8 m) orientations per class
            step = max(1, COARSE_ELEMENTS["cpu"] // (8 * m))
            make += PROJECT_BYTES_PER_CORNER * corners * m * K * min(inp.coarse_poses, step)
        rows = min(n, max(1, COARSE_ELEMENTS[inp.device] // (T * KC)))
        cross = 4 * rows * T * KC
        likelihood = cross * (4 if cpu else 2) + 16 * rows * T * m
        coarse = 8 * n * T * m + max(proj_cache - 12 * KC * m + make, proj_cache + likelihood)
    else:
        KL = K * inp.local_poses
        proj = n * KL * m
        coarse = max(PROJECT_BYTES_PER_CORNER * corners * proj if cpu else 0, 48 * proj)
    Sf = _fine_candidates(inp)
    fine_pts = n * Sf * m
    # fine pass: the projections come out complex128 (16 per point), the likelihood's conjugate copy and its
    # complex64 product (32); the insertion keeps them beside Xw, data, weights and the kept rows (32)
    fine = max((PROJECT_BYTES_PER_CORNER * corners if cpu else 0) * fine_pts, 48 * fine_pts)
    if routed:  # points routed to the planes' owners (one symmetry copy at a time); CPU: the scatter-add's
        # bincount over the owned planes of every volume
        recv = fine_pts * (2 if inp.ranks > 1 else 1)
        insert = 48 * fine_pts + ROUTED_BYTES_PER_RECORD * recv + ROUTED_STENCIL_BYTES * min(recv, POINT_CHUNK) \
            + (8 * V * own if cpu else 0)
    else:
        insert = 48 * fine_pts + ((INSERT_BYTES_PER_CORNER * corners + 24) * fine_pts + 8 * V * vox if cpu else 0)
    held = proj_cache  # the pose grid's projections stay in the search spec until the E-step ends
    batch = base + max(coarse, proj_cache + fine, proj_cache + insert)

    # ---- M-step (em/model.py): the owned planes after the reduce-scatter (none with routed accumulators,
    # which are the owned planes, nor on one rank, where the accumulators are used as they are); refine3d with
    # folds: each half's sum of its folds, then the leave-one-fold-out volumes; each reconstruction's
    # transients; the maps (float64, listed then stacked)
    if inp.dim == 3:
        folded = inp.folds > 1 and inp.mode == "refine3d"
        sums = 2 * 24 * own if folded else 0

        def transient(nv):
            if inp.ranks == 1:  # one volume at a time
                return RECONSTRUCT_SERIAL_BYTES_PER_VOXEL * vox
            return (RECONSTRUCT_DIST_BYTES_PER_VOXEL * nv + RECONSTRUCT_DIST_FIXED) * own

        owned = 0 if routed or inp.ranks == 1 else 24 * V * own
        shell_stats = 56 * min(V * own, 1 << 24)  # model._shell_sums: at most 2^24 voxels per chunk
        halves = owned + sums + max(transient(2 if folded else V), shell_stats)
        lofo = owned + sums + 24 * V * own + transient(V) if folded else 0
        recon = max(halves, lofo) + 2 * 8 * V * box ** 3
        fft_m = 0 if cpu else (16 * vox // 16 if inp.ranks == 1 else 16 * own)  # chunked / distributed FFTs
    else:
        recon = RECONSTRUCT_SERIAL_BYTES_PER_VOXEL * V * vox
        fft_m = fft_vol
    # ---- references: the E-step gives back its references and the pose grid's projections when it ends
    # (em.engine.end_e_step), so the M-step holds neither and the next references are made alone: each volume's
    # transform (rows, shift, in-place FFTs) written into its place of the stack, beside the masked maps (3D;
    # 2D: listed, then stacked)
    ref_fft = REFERENCE_FFT_BYTES_PER_VOXEL if pad > 1 else REFERENCE_FFT_BYTES_PER_VOXEL_PAD1
    make_refs = (1 if inp.dim == 3 else 2) * refs + ref_fft * vox + 8 * V * box ** inp.dim
    return {
        "references": {"references": make_refs, "cached_images": cached, "fft_plans": fft_vol},
        "E-step": {"references": refs, "accumulators": acc, "cached_images": cached, "batch_workspace": batch,
                   "fft_plans": fft_img},
        "M-step": {"accumulators": acc, "cached_images": cached, "fft_plans": fft_m, "reconstruction": recon},
    }


def _reconstruct_phases(inp: ReconstructInputs) -> dict:
    cpu = inp.device == "cpu"
    box, pad = inp.box, inp.pad
    vox = half_volume(box, pad)
    own = owned_voxels(box, pad, inp.ranks)
    m = ball_points(box, inp.r)
    n_local = _images_per_rank(inp.n_particles, inp.ranks)
    n = max(1, min(inp.batch, n_local)) if n_local else inp.batch
    img = 4 * box * box
    fft = 0 if cpu else 16 * (vox if inp.ranks == 1 else own) + 8 * n * box * (box // 2 + 1)
    base = (1 + PREFETCH) * n * img + 24 * n * m
    maps = 3 * 4 * box ** 3 + 2 * 8 * box ** 3
    if inp.ranks == 1:  # distributed_reconstruct's one-rank path: complex128/float64 copies, then reconstruct
        transient = (RECONSTRUCT_SERIAL_BYTES_PER_VOXEL + 24) * vox
    else:
        transient = (RECONSTRUCT_DIST_BYTES_PER_VOXEL + RECONSTRUCT_DIST_FIXED) * own
    owned = 2 * 24 * (own if inp.ranks > 1 else vox)
    if inp.stream:
        batch = base + STREAM_BYTES_PER_POINT * n * m
        return {
            "insertion": {"accumulators": owned, "batch_workspace": batch, "fft_plans": fft},
            "reconstruction": {"accumulators": owned, "reconstruction": transient + maps, "fft_plans": fft},
        }
    acc = 2 * 24 * vox
    batch = base + ((INSERT_BYTES_PER_CORNER * 8 + 24) * n * m + 8 * 2 * vox if cpu else 0)
    sym = 2 * 24 * vox if inp.sym_copies > 1 else 0  # symmetrise's full output copies
    return {
        "insertion": {"accumulators": acc, "batch_workspace": max(batch, sym), "fft_plans": fft},
        "reduction": {"accumulators": acc, "reconstruction": owned, "fft_plans": fft},
        "reconstruction": {"reconstruction": owned + transient + maps, "fft_plans": fft},
    }


def em_inputs(args, mode: str, meta: dict, ranks: int, device: str, cache_images: bool) -> EMInputs:
    """The model's inputs of an EM job from its options (jobs/em.py): the largest global pose grid the options
    allow (refine3d: orders up to the first local one; class2d: the in-plane angles) and the most coarse
    translations (refine3d with --refine-offsets: up to 49, see :func:`mpi_em.sampling.next_translations`)."""
    from .sampling import translation_grid

    T = int(translation_grid(args.offset_range, 2.0 * args.offset_step).shape[0])
    if mode == "class2d":
        C = int(np.arange(0.0, 360.0, args.psi_step).size)
    elif mode == "class3d":
        C = 0 if args.local else _grid_size(args.healpix_order, args.sym)
    else:
        top = min(args.max_order, args.local_from_order - 1)
        C = _grid_size(top, args.sym) if top >= args.healpix_order else 0
        if getattr(args, "refine_offsets", False):
            T = max(T, 49)
    return EMInputs(mode=mode, box=int(meta["box"]), pad=int(args.pad), K=int(meta["K"]),
                    folds=int(meta.get("folds", 1)), batch=int(args.batch), ranks=int(ranks),
                    device="cpu" if device == "cpu" else "gpu", n_particles=int(meta["n"]),
                    cache_images=bool(cache_images), coarse_poses=C, translations=T, n_select=int(args.n_select),
                    class_select=int(getattr(args, "class_select", 10)),
                    owned_accumulators=getattr(args, "owned_accumulators", "auto") == "on" and mode != "class2d")


def _grid_size(order: int, sym: str) -> int:
    from .sampling import orientation_grid

    return int(orientation_grid(order, sym)[0].shape[0])


def reconstruct_inputs(args, meta: dict, ranks: int, device: str, vplan: dict, r_max: float) -> ReconstructInputs:
    """The model's inputs of ``mpi-em reconstruct`` (jobs/reconstruct.py) after its volume plan."""
    from .symmetry import symmetry_matrices

    return ReconstructInputs(box=int(meta["box"]), pad=int(args.pad), batch=int(vplan["batch"]), ranks=int(ranks),
                             device="cpu" if device == "cpu" else "gpu", n_particles=int(meta["n"]),
                             stream=vplan["mode"] == "stream", r=float(r_max),
                             sym_copies=int(symmetry_matrices(args.sym).shape[0]))


# ------------------------------------------------------------------------------------------ what would fit
def suggestions(inp, limit: int, max_ranks: int = 4096) -> list[str]:
    """Each change of one option that brings the peak under ``limit`` (more ranks: the fewest that fit)."""
    out = []
    fits = lambda x: estimate(x).total <= limit  # noqa: E731
    if isinstance(inp, ReconstructInputs) and not inp.stream and \
            _largest(lambda b: fits(replace(inp, stream=True, batch=b)), 1, inp.batch):
        out.append(f"--max-volume-memory {_size_arg(limit)} (owned planes only)")  # it picks the batch
    if isinstance(inp, EMInputs) and inp.dim == 3 and inp.ranks > 1 and not inp.owned_accumulators:
        b = _largest(lambda b: fits(replace(inp, owned_accumulators=True, batch=b)), 1, inp.batch)
        if b:
            out.append("--owned-accumulators on" + (f" --batch {b}" if b < inp.batch else "") +
                       " (owned kz planes only)")
    P = inp.ranks + 1
    while P <= max_ranks and not fits(replace(inp, ranks=P)):
        P = P + 1 if P < 16 else P * 2
    if P <= max_ranks:
        out.append(f"{P} ranks")
    if inp.batch > 1:
        b = _largest(lambda b: fits(replace(inp, batch=b)), 1, inp.batch - 1)
        if b:
            out.append(f"--batch {b}")
    if getattr(inp, "cache_images", False) and fits(replace(inp, cache_images=False)):
        out.append("--cache-images off")
    if getattr(inp, "folds", 1) > 1:
        f = _largest(lambda f: fits(replace(inp, folds=f)), 1, inp.folds - 1)
        if f:
            out.append(f"--folds {f}")
    if inp.pad > 1 and fits(replace(inp, pad=1)):
        out.append("--pad 1")
    return out


def _largest(ok, lo: int, hi: int) -> int | None:
    """The largest x in [lo, hi] with ok(x) (ok monotone: true up to some x), or None."""
    if not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def _size_arg(n: int) -> str:
    for unit, s in (("G", 2 ** 30), ("M", 2 ** 20), ("K", 2 ** 10)):
        if n >= s:
            return f"{n // s}{unit}"
    return str(n)


# ------------------------------------------------------------------------------------------ between phases
def release_device_memory(xp) -> None:
    """GPU ranks: give back what CuPy's memory pool holds unused and the cached cuFFT plans with their work
    areas (a padded 3D transform's is as large as its volume), so that a phase does not carry the last one's
    into its peak and ranks sharing a GPU get what one of them no longer uses. Nothing on CPU ranks."""
    if xp is np:
        return
    xp.fft.config.get_plan_cache().clear()
    xp.get_default_memory_pool().free_all_blocks()


# ------------------------------------------------------------------------------------------ the limit
def available_bytes(device: str, ranks_here: int = 1) -> int | None:
    """Memory this rank may use: GPU ranks, the device's free memory plus what CuPy's pool holds unused, shared
    by the ranks on the same device; CPU ranks, MemAvailable (/proc/meminfo) divided among the node's ranks.
    None where it cannot be read."""
    ranks_here = max(1, int(ranks_here))
    if device != "cpu":
        import cupy  # type: ignore

        free, _ = cupy.cuda.runtime.memGetInfo()
        return int((free + cupy.get_default_memory_pool().free_bytes()) // ranks_here)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // ranks_here
    except OSError:
        pass
    return None


def parse_size(text, option: str = "--max-memory") -> int | None:
    """'512M', '2G', '1.5GiB', '1000000' -> bytes (binary units); None/'' -> None."""
    if text is None or str(text).strip() == "":
        return None
    t = str(text).strip().upper().replace("IB", "").rstrip("B")
    mult = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
    try:
        v = float(t[:-1]) * mult[t[-1]] if t and t[-1] in mult else float(t)
    except ValueError:
        v = -1
    if not v > 0 or not math.isfinite(v):
        from .errors import InputError

        raise InputError(option, f"cannot read {text!r} as a size (e.g. 512M, 24G)")
    return int(v)


def add_argument(p) -> None:
    """``--max-memory`` of the four jobs."""
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="bytes each rank may use (e.g. 24G, 512M); default: the rank's share of its GPU's free "
                        "memory (CPU ranks: of the node's available memory). The job's memory model (logged and "
                        "in run.json) is checked against it before anything large is allocated: refine3d and class3d "
                        "first take owned accumulators (--owned-accumulators auto) and then the largest --batch "
                        "that fits; a job that still would not fit stops at once with one line saying what would "
                        "(more ranks, --owned-accumulators on, a smaller --batch, --cache-images off, fewer "
                        "--folds, --pad 1). The model is an upper bound (the largest "
                        "image size and pose grid the options allow): a larger SIZE than the device has runs "
                        "the job anyway, at the risk of running out later")
    if p.prog.split()[-1] in ("refine3d", "class3d"):
        p.add_argument("--owned-accumulators", choices=("auto", "on", "off"), default="auto",
                       help="'on': each rank accumulates only the Fourier kz planes it owns (1/P of the volumes; "
                            "every batch's insertion is sent to the planes' owners, and the M-step starts from "
                            "them without a reduce-scatter); 'off': full accumulators on every rank, reduce-"
                            "scattered after the E-step; 'auto' (default): owned planes where the memory model "
                            "says the full accumulators do not fit on more than one rank. The maps are the same "
                            "to float rounding (with a point group: to interpolation accuracy, each symmetry copy "
                            "being inserted instead of the sums symmetrised)")


class MemoryLimitError(MpiEmError):
    """The job would not fit: exit status 2, one line."""

    exit_code = 2


def check(comm, inp, max_memory=None, log=None, out_dir=None, adapt: str | None = None) -> MemoryEstimate:
    """Collective, before the job allocates: every rank evaluates the model for itself against its limit
    (``--max-memory`` if given, else :func:`available_bytes`); rank 0 logs the estimate and records it in
    ``out_dir``/run.json (key ``memory``); if any rank would not fit, every rank raises (through
    :func:`mpi_em.distributed.agree`) one line naming the rank, the figures and what would fit (exit 2).

    ``adapt`` (EM jobs: the ``--owned-accumulators`` choice, 'auto', 'on' or 'off'): where the options as
    given do not fit, the job is first lightened by design, the same way on every rank: owned accumulators
    (3D on more than one rank, with 'auto'), then the largest E-step batch up to ``--batch`` that fits; the
    estimate returned (and logged) is the one the job runs with (``.inputs``)."""
    from .distributed import agree

    limit, source = _limit(comm, inp, max_memory)
    if adapt is not None and isinstance(inp, EMInputs):
        inp = _adapt(comm, inp, limit, log, adapt)
    est = estimate(inp)
    short = (est.total - limit) if limit is not None else -1
    every = comm.allgather(short)
    worst = int(np.argmax(every))
    err = None
    if every[worst] > 0 and comm.rank == worst:
        would = est.suggestions(limit)
        err = MemoryLimitError(
            f"memory: {inp.mode} needs {fmt(est.total)} per rank ({_terms_text(est)}), {fmt(limit)} available "
            f"({source}): " + ("would fit with " + " or ".join(would) if would else
                               "neither more ranks, a smaller --batch, --cache-images off, fewer --folds nor "
                               "--pad 1 alone would fit"))
    if comm.rank == 0:
        if log is not None:
            log.info("memory model: %s; limit %s (%s)", est.summary(), fmt(limit) if limit else "unknown", source)
        if out_dir:
            record(out_dir, dict(est.as_dict(), limit_bytes=limit, limit_source=source))
    agree(comm, err)
    return est


def _adapt(comm, inp: EMInputs, limit, log, owned_option: str = "auto") -> EMInputs:
    """Owned accumulators, then a smaller batch, where the job as given does not fit ``limit`` on some rank."""
    from mpi4py import MPI

    def fits(x):  # collective: on every rank
        return bool(comm.allreduce(limit is None or estimate(x).total <= limit, op=MPI.LAND))

    if fits(inp):
        return inp
    auto_owned = owned_option == "auto"
    if auto_owned and inp.dim == 3 and inp.ranks > 1 and not inp.owned_accumulators:
        owned = replace(inp, owned_accumulators=True)
        if fits(owned) or fits(replace(owned, batch=1)):
            if comm.rank == 0 and log is not None:
                log.info("memory: the full accumulators (%s per rank) do not fit: each rank accumulates only its "
                         "kz planes (%s; --owned-accumulators)", fmt(estimate(inp).total), fmt(estimate(owned).total))
            inp = owned
    if inp.batch > 1 and not fits(inp):
        b = _largest(lambda b: fits(replace(inp, batch=b)), 1, inp.batch - 1)
        if b:
            if comm.rank == 0 and log is not None:
                log.info("memory: E-step batch %d instead of --batch %d (the largest whose workspace fits)", b,
                         inp.batch)
            inp = replace(inp, batch=b)
    return inp


def _limit(comm, inp, max_memory):
    """(bytes this rank may use or None, where the figure comes from)."""
    from .distributed import node_local_rank

    user = parse_size(max_memory)
    if user is not None:
        limit, source = user, "--max-memory"
    else:
        _, here = node_local_rank(comm)
        if inp.device != "cpu":
            import cupy  # type: ignore

            here = -(-here // max(1, cupy.cuda.runtime.getDeviceCount()))  # ranks sharing this rank's GPU
        limit, source = available_bytes(inp.device, here), ("free GPU memory" if inp.device != "cpu"
                                                            else "available memory")
    return limit, source


def _terms_text(est: MemoryEstimate) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {fmt(v)}" for k, v in est.terms.items() if v)


def record(out_dir: str, memory: dict) -> None:
    """Merge ``memory`` into ``out_dir``/run.json (written under a temporary name, then renamed)."""
    import json

    from .io import atomic_path

    path = os.path.join(out_dir, "run.json")
    try:
        data = json.load(open(path)) if os.path.exists(path) else {}
    except (OSError, ValueError):
        data = {}
    data["memory"] = memory
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
