"""The memory model itself: sizes, the jobs' inputs, the per-phase terms and their peak (see :mod:`mpi_em.memory`)."""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from ..distvolume import POINT_CHUNK
from ..em import search as _search
from ..fourier.projector import padded_reach
from ..fourier.transforms import RECONSTRUCT_CHUNKS
from ..errors import MpiEmError

#: NumPy projection of the references: bytes alive per projected point at the projector's peak, output included,
#: with complex128 references. 3D (``fourier.CentredVolumes.project``: coordinates, floors, fractions and their
#: complements in float64, indices, the corner-by-corner buffers, the output): tracemalloc 173.0-174.3 at box 32-64
#: for 16-576 orientations x 2 classes (NumPy 2.4); 2D (``fourier2d.project2d``): 164.7 at box 64
PROJECT_BYTES_PER_POINT = {3: 174, 2: 165}
#: the same with single-precision 3D references (``References(single=True)``: float32 coordinates, complex64
#: buffers): 97.0-97.2
PROJECT_BYTES_PER_POINT_SINGLE = 98
#: NumPy back-projection per point and corner (the stencil's indices and weights, the weighted values;
#: ``np.add.at`` adds them in place): 3D (``fourier.backproject``, corner by corner, int32 indices) tracemalloc
#: 27.8-28.3 at box 32-64 (37.8-38.3 with the whole 8-corner stencil, 42.1 and a bincount over the whole
#: accumulator stack before that); 2D (``fourier2d.backproject2d``, int64 indices) 50.3
INSERT_BYTES_PER_CORNER = {3: 29, 2: 51}
#: ``fourier.reconstruct`` (one rank): bytes per voxel of the padded half volume (its working copy of F in the
#: accumulators' precision, W read by chunks, chunks of ~1/16 of the volume, the box^3 map); tracemalloc with
#: double accumulators (complex128 copy, float64 map): 21.3 at box 32-64 (26-27 while W was copied whole, 97
#: before the division and inverse FFT went by chunks of planes, in place); with single ones (complex64 copy,
#: float32 map): 11.6-12.3
RECONSTRUCT_SERIAL_BYTES_PER_VOXEL = 22
RECONSTRUCT_SERIAL_BYTES_PER_VOXEL_SINGLE = 13
#: bytes per voxel of the accumulators F + W (complex128 + float64, or complex64 + float32: ``--accumulate``)
ACCUMULATOR_BYTES_PER_VOXEL = {"double": 24, "single": 12}
#: ``em.model._shell_sums`` per voxel of a chunk: the float64 temporaries (56), and with single-precision
#: accumulators their chunk's complex128 / float64 copies first (24 more); the shell indices go by the same chunks
#: (shell_statistics: 1.10 GB at box 200 and 320 with single accumulators, tracemalloc; before, the whole volume's
#: radii and indices at once: 24 bytes per padded voxel, 3.16 GB at box 320, 13e9 bytes at box 512, the M-step's
#: peak measured on the GPU)
SHELL_BYTES_PER_VOXEL = {"double": 56, "single": 80}
#: ``distvolume.distributed_reconstruct`` (one volume at a time): per owned voxel of one volume, the working
#: copies and the transpose (30) and what the rest adds (20); tracemalloc at box 32 on 2-3 ranks: 46-50 in all,
#: for two volumes as for four (tests/parallel/test_distvolume.py; 67-68 for one volume when all volumes were
#: copied at once)
RECONSTRUCT_DIST_BYTES_PER_VOXEL = 30
#: the same for complex64 / float32 owned planes (single-precision accumulators: copies, transpose and FFTs in
#: single precision): 28.0-28.1 in all at box 32-48 on 2 ranks
RECONSTRUCT_DIST_BYTES_PER_VOXEL_SINGLE = 9
RECONSTRUCT_DIST_FIXED = 20
#: the CPU fine pass of 3D jobs (the centred projector's stencil and output, the likelihood's operands and the
#: weighted translations), bytes alive per fine point (batch x fine candidates x in-ball points) above what the
#: batch held before it; tracemalloc at box 32-64 (refine3d, class3d K = 2): 161.5-163.6 with complex128
#: references, 89.1 with complex64 ('single'); the projector alone is PROJECT_BYTES_PER_POINT
FINE_BYTES_PER_POINT_CPU = {"double": 164, "single": 90}
#: ``fourier.volume_fft`` of one reference (the box's rows transformed, placed, then in-place FFTs by chunks) on
#: top of its output; tracemalloc: 18.2-20.2 per voxel including the 16-byte output at pad 2-3 (50.4 before it
#: stopped making the padded real volume); at pad 1 the rows are the volume: 44
REFERENCE_FFT_BYTES_PER_VOXEL = 5
REFERENCE_FFT_BYTES_PER_VOXEL_PAD1 = 30
#: the coarse pass's likelihood elements per GEMM chunk and the shared grid's points (orientations x m) projected
#: at a time per class, by device: the E-step's own settings (``em.search``, keyed there by "on a CPU rank")
COARSE_ELEMENTS = {"cpu": _search.COARSE_ELEMENTS[True], "gpu": _search.COARSE_ELEMENTS[False]}
PROJECT_POINTS = {"cpu": _search.PROJECT_POINTS[True], "gpu": _search.PROJECT_POINTS[False]}
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

TERMS = ("references", "masks", "accumulators", "cached_images", "batch_workspace", "fft_plans", "reconstruction",
         "device_runtime", "pool_slack")
#: a GPU rank's own device memory before any array: its CUDA context, the libraries' handles and work areas, the
#: kernels' code: 0.60 GiB measured on one H200 (nvidia-smi's peak less CuPy's pool at its largest, refine3d box
#: 512, three runs: 0.59-0.60 GiB; benchmarks/results/memory/large-box-fixes-h200-2026-12-02/)
DEVICE_RUNTIME_BYTES = 644 * 10 ** 6
#: a GPU rank's memory pool holds more than its live arrays (blocks rounded up, freed blocks not yet given back):
#: 0.51% of the arrays at box 512 with every step synchronised (the driver's pool reserved 23.42e9 bytes for arrays
#: the model put at 22 221 MiB; benchmarks/results/refine3d-convergence/box512-relion-size-rules-h200-2026-12-03/),
#: counted twice over
POOL_SLACK = 0.01


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
    local_poses: int = 19          # rotations of a local search (radius 1.5 steps; 123 at 3: --local-radius)
    translations: int = 9          # the most coarse translations
    n_select: int = 4
    class_select: int = 10
    r: float | None = None         # largest in-ball radius of the E-step (None: box/2 - 1)
    owned_accumulators: bool = False  # 3D: the E-step inserts into owned kz planes only (routed per batch)
    inserted_poses: int | None = None  # fine poses inserted per particle (significant: rlnNrOfSignificantSamples);
    #                                    None: every fine candidate (the upper bound, before a run)
    grid_chunk: int = 0            # > 0: the global grid projected this many orientations per class at a time
    #                                (per batch, not kept: em.search._chunked_parts); 0: kept for the iteration
    zero_mask: bool = False        # --zero-mask: the masked images searched beside the unmasked ones inserted
    accumulate: str = "double"     # the accumulators' precision (--accumulate): 'double' (complex128 F, float64
    #                                W) or 'single' (complex64, float32; 3D references complex64 too)
    running_sums: bool = False     # initial-model: the E-step accumulates into the whole padded layout, beside the
    #                                mini-batches' running sums of the same size; the M-step reconstructs a copy

    @property
    def dim(self) -> int:
        return 2 if self.mode == "class2d" else 3

    @property
    def n_volumes(self) -> int:
        return 2 * self.folds if self.mode == "refine3d" else self.K

    @property
    def reference_volumes(self) -> int:
        """The references one rank makes and projects: refine3d's ranks hold only their reference sets'
        (:func:`mpi_em.distributed.set_blocks`: one set per rank where the ranks divide evenly among the
        2 x folds sets, sets / ranks where the sets divide evenly among the ranks, else a contiguous range of at
        most ceil(sets / ranks) + 1); classification needs them all."""
        V = self.n_volumes
        if self.mode != "refine3d" or self.ranks <= 1:
            return V
        if self.ranks % V == 0 and (self.n_particles == 0 or self.n_particles >= 2 * self.ranks):
            return 1
        if V % self.ranks == 0:
            return V // self.ranks
        return min(V, -(-V // self.ranks) + 1)


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
    accumulate: str = "double"     # --accumulate: 'double' or 'single' (complex64 / float32 accumulators)

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
        from .limits import suggestions

        return suggestions(self.inputs, limit)

    def summary(self) -> str:
        parts = ", ".join(f"{k.replace('_', ' ')} {fmt(v)}" for k, v in self.terms.items() if v)
        acc = f"{self.inputs.accumulate}-precision accumulators, " if isinstance(self.inputs, EMInputs) else ""
        return (f"{fmt(self.total)} per rank at the peak ({acc}{self.peak_phase}: {parts}); RELION's estimate for a "
                f"GPU rank at box {self.inputs.box}: {fmt(self.relion_bytes)}")

    def as_dict(self) -> dict:
        return {"inputs": dict(asdict(self.inputs), mode=self.inputs.mode), "peak_bytes": self.total,
                "peak_phase": self.peak_phase, "terms_bytes": self.terms,
                "phases_bytes": {p: {k: int(v) for k, v in t.items()} for p, t in self.phases.items()},
                "relion_gpu_rank_bytes": self.relion_bytes}


def estimate(inp) -> MemoryEstimate:
    """The model for an :class:`EMInputs` or a :class:`ReconstructInputs`."""
    if isinstance(inp, ReconstructInputs):
        phases = _reconstruct_phases(inp)
    elif inp.mode not in ("refine3d", "class3d", "class2d"):
        raise ValueError(f"unknown job {inp.mode!r}")
    else:
        phases = _em_phases(inp)
        # the references' mask (sphere x solvent mask, float32), made for each iteration's references and dropped
        # with them (em.steps.references): held while they are transformed, not through the E-step and M-step
        phases["references"]["masks"] = 4 * inp.box ** inp.dim
    if inp.device != "cpu":
        for terms in phases.values():
            terms["pool_slack"] = int(POOL_SLACK * sum(terms.values()))
            terms["device_runtime"] = DEVICE_RUNTIME_BYTES
    return MemoryEstimate(inp, phases)


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

    single = inp.accumulate == "single"
    # the CPU projector's working set per point (single-precision 3D references: float32 coordinates)
    project_b = PROJECT_BYTES_PER_POINT_SINGLE if single and inp.dim == 3 else PROJECT_BYTES_PER_POINT[inp.dim]
    accb = ACCUMULATOR_BYTES_PER_VOXEL[inp.accumulate]
    Vr = inp.reference_volumes
    refs = (8 if single and inp.dim == 3 else 16) * Vr * vox
    acc = accb * V * (own if routed else vox)
    # the E-step's full local sums kept in the cube its image size reaches where that is a small part of the
    # volume (em.model.CroppedAccumulators), handed over to the full layout after the references are given back
    from ..fourier.projector import crop_layout_side

    side = crop_layout_side(box // 2 - 1 if inp.r is None else float(inp.r), pad, npad) \
        if inp.dim == 3 and not routed and not inp.running_sums else None
    vox_e = vox if side is None else side * side * (side // 2 + 1)
    acc_e = acc if side is None else accb * V * vox_e
    if inp.running_sums:  # initial-model: the mini-batch's sums beside the running ones, then the sums' copy
        acc_e = acc = 2 * acc
    cached = n_local * img if inp.cache_images else 0
    # GPU: cuFFT plans and their work areas; the job gives them back (with CuPy's pool) between the phases
    # (memory.release_device_memory), so the E-step keeps only the image transform's
    fft_img = 0 if cpu else 8 * n * box * (box // 2 + 1)
    # the references' transforms go by chunks (fourier.volume_fft: ~1/16 of a volume per plan) in 3D
    fft_vol = 0 if cpu else (16 * vox // 16 if inp.dim == 3 else 16 * V * vox)

    # ---- batch workspace (the E-step's largest sub-phase)
    base = 12 * n * m + (0 if inp.cache_images else (1 + PREFETCH) * n * img)
    if inp.zero_mask:  # the unmasked images beside the masked ones, and moved by their best coarse translation
        base += 16 * n * m
    sets = 1  # reference sets whose grid projections are held at once (em.search._coarse_pass: one at a time)
    proj_cache = 0
    coarse = 0
    if inp.coarse_poses:
        KC = K * inp.coarse_poses
        proj_cache = sets * 12 * KC * m
        # the grid's operands (12 bytes per point) written a chunk of orientations at a time
        # (em.search.grid_operands): the chunk's projections (complex64 from single-precision 3D references, else
        # complex128) and the real temporary of |P|^2 (half of that), or on CPU ranks the projector's working set,
        # after the last set's operands are given back
        proj_b = 8 if single and inp.dim == 3 else 16

        def making(orientations: int) -> int:
            step = min(orientations, max(1, PROJECT_POINTS[inp.device] // m))
            return 12 * K * orientations * m + K * step * m * max(project_b if cpu else 0, proj_b * 3 // 2)

        make = making(inp.coarse_poses)
        rows = min(n, max(1, COARSE_ELEMENTS[inp.device] // (T * KC)))
        cross = 4 * rows * T * KC
        likelihood = cross * (4 if cpu else 2) + 16 * rows * T * m
        coarse = 8 * n * T * m + max(make, proj_cache + likelihood)
        if 0 < inp.grid_chunk < inp.coarse_poses:  # nothing kept; per chunk: its operands as made, its GEMM
            kc = K * inp.grid_chunk
            chunk = making(inp.grid_chunk) + 4 * rows * T * kc
            proj_cache = 0
            coarse = 8 * n * T * m + max(cross + 4 * rows * KC + chunk, likelihood)
    else:
        KL = K * inp.local_poses
        proj = n * KL * m
        coarse = max(project_b * proj if cpu else 0, 48 * proj)
    Sf = _fine_candidates(inp)
    fine_pts = n * Sf * m
    # fine pass: the projections come out complex128 (16 per point), the likelihood's conjugate copy and its
    # complex64 product (32); the insertion keeps them beside Xw, data, weights and the kept rows (32)
    fine = max((FINE_BYTES_PER_POINT_CPU[inp.accumulate] if cpu and inp.dim == 3 else
                project_b if cpu else 0) * fine_pts, 48 * fine_pts)
    if routed:  # points routed to the planes' owners (one symmetry copy at a time)
        recv = fine_pts * (2 if inp.ranks > 1 else 1)
        insert = 48 * fine_pts + ROUTED_BYTES_PER_RECORD * recv + ROUTED_STENCIL_BYTES * min(recv, POINT_CHUNK)
    else:
        ins_pts = fine_pts if inp.inserted_poses is None else n * min(Sf, inp.inserted_poses) * m
        insert = 48 * fine_pts + ((INSERT_BYTES_PER_CORNER[inp.dim] * corners + 24) * ins_pts if cpu else 0)
    held = proj_cache  # the pose grid's projections stay in the search spec until the E-step ends
    # --zero-mask: the images' masking (em.engine.masked_points) before the search: the mask's radii, fall-off and
    # weights and the masked images, four (n, N, N) float32 planes, then their transform
    masking = 20 * n * box * box if inp.zero_mask else 0
    batch = base + max(coarse, proj_cache + fine, proj_cache + insert, proj_cache + masking)

    # ---- M-step (em/model.py): the owned planes after the reduce-scatter (none with routed accumulators,
    # which are the owned planes, nor on one rank, where the accumulators are used as they are); refine3d with
    # folds: each half's sum of its folds, then the leave-one-fold-out volumes; each reconstruction's
    # transients; the maps (float64, listed then stacked)
    # one rank with cropped accumulators: the M-step works on the cube, each volume put into the pad x box layout
    # for its reconstruction only (distvolume.reconstruct._serial_reconstruct)
    cube = side is not None and inp.ranks == 1
    if inp.dim == 3:
        folded = inp.folds > 1 and inp.mode == "refine3d"
        own_m = vox_e if cube else own
        sums = 2 * accb * own_m if folded else 0

        def transient(nv):
            if inp.ranks == 1:  # one volume at a time, its working copy in the accumulators' precision
                return (RECONSTRUCT_SERIAL_BYTES_PER_VOXEL_SINGLE if single else RECONSTRUCT_SERIAL_BYTES_PER_VOXEL) \
                    * vox + (accb * vox if cube else 0)
            per = RECONSTRUCT_DIST_BYTES_PER_VOXEL_SINGLE if single else RECONSTRUCT_DIST_BYTES_PER_VOXEL
            return (per + RECONSTRUCT_DIST_FIXED) * own  # one volume at a time, in the accumulators' precision

        owned = 0 if routed or inp.ranks == 1 else accb * V * own
        # model._shell_sums (at most 2^24 voxels per chunk) over the volumes reconstructed: with folds, each
        # half's sum of its folds
        shell_stats = SHELL_BYTES_PER_VOXEL[inp.accumulate] * min((2 if folded else V) * own_m, 1 << 24)
        # gold: fourier_fsc's down-sampled sums of the two halves (complex128 + float64 on the unpadded grid), a
        # chunk of indices and weights (em.model.DOWNSAMPLE_CHUNK voxels), the shells' products
        from ..em.model import DOWNSAMPLE_CHUNK

        half_box = box * box * (box // 2 + 1)
        fsc_down = (2 * 24 + 24) * half_box + 16 * min(DOWNSAMPLE_CHUNK, own_m) if inp.mode == "refine3d" else 0
        halves = owned + sums + max(transient(2 if folded else V), shell_stats, fsc_down)
        lofo = owned + sums + accb * V * own_m + transient(V) if folded else 0
        # the maps, listed then stacked: float64, or float32 from single-precision accumulators
        recon = max(halves, lofo) + 2 * (4 if single else 8) * V * box ** 3
        fft_m = 0 if cpu else (16 * vox // 16 if inp.ranks == 1 else 16 * own)  # chunked / distributed FFTs
    else:
        recon = (RECONSTRUCT_SERIAL_BYTES_PER_VOXEL_SINGLE if single else RECONSTRUCT_SERIAL_BYTES_PER_VOXEL) * V * vox
        fft_m = fft_vol
    # ---- references: the E-step gives back its references and the pose grid's projections when it ends
    # (em.engine.end_e_step), so the M-step holds neither and the next references are made alone: each volume's
    # transform (rows, shift, in-place FFTs) written into its place of the stack, beside the masked maps (3D;
    # 2D: listed, then stacked)
    ref_fft = REFERENCE_FFT_BYTES_PER_VOXEL if pad > 1 else REFERENCE_FFT_BYTES_PER_VOXEL_PAD1
    make_refs = (1 if inp.dim == 3 else 2) * refs + ref_fft * vox + 8 * Vr * box ** inp.dim
    # CPU ranks project from the centred layout (fourier.CentredVolumes: a margin of one voxel, filled one volume
    # at a time beside the FFT-layout stack, which is then dropped): the E-step holds that layout instead
    # only within the E-step's padded reach (the jobs pass it; ``inp.r`` None: the whole grid's)
    refs_e = refs
    if cpu and inp.dim == 3:
        h = npad // 2 if inp.r is None else int(min(npad // 2, np.ceil(padded_reach(inp.r, pad))))
        refs_e = (8 if single else 16) * Vr * (2 * h + 2) ** 2 * (min(npad // 2 + 1, h + 1) + 1)
        make_refs += refs_e + refs // max(Vr, 1)
    return {
        "references": {"references": make_refs, "cached_images": cached, "fft_plans": fft_vol},
        "E-step": {"references": refs_e, "accumulators": acc_e, "cached_images": cached, "batch_workspace": batch,
                   "fft_plans": fft_img},
        **({"hand-over": {"accumulators": acc + acc_e, "cached_images": cached}}
           if side is not None and not cube else {}),
        "M-step": {"accumulators": acc_e if cube else acc, "cached_images": cached, "fft_plans": fft_m,
                   "reconstruction": recon},
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
    # cuFFT work areas: one rank's reconstruction transforms its volume in RECONSTRUCT_CHUNKS chunks
    # (fourier._ifft_cropped; the whole volume's 16 vox counted before: the box-512 job measured 48.7 GiB against a
    # model of 59.5 GiB, 8.3 GiB of it that term), several ranks their owned planes whole
    fft = 0 if cpu else 16 * (vox // RECONSTRUCT_CHUNKS if inp.ranks == 1 else own) + 8 * n * box * (box // 2 + 1)
    base = (1 + PREFETCH) * n * img + 24 * n * m
    maps = 3 * 4 * box ** 3 + 2 * 8 * box ** 3
    single = inp.accumulate == "single"
    accb = ACCUMULATOR_BYTES_PER_VOXEL[inp.accumulate]
    if inp.ranks == 1:  # distributed_reconstruct's one-rank path: fourier.reconstruct in the accumulators' precision
        transient = (RECONSTRUCT_SERIAL_BYTES_PER_VOXEL_SINGLE if single else RECONSTRUCT_SERIAL_BYTES_PER_VOXEL) \
            * vox + accb * vox
    else:
        per = RECONSTRUCT_DIST_BYTES_PER_VOXEL_SINGLE if single else RECONSTRUCT_DIST_BYTES_PER_VOXEL
        transient = (per + RECONSTRUCT_DIST_FIXED) * own
    owned = 2 * accb * (own if inp.ranks > 1 else vox)
    # rank 0's FSC of the half maps (GPU: on the device in single precision: the maps, their transforms, the
    # product; cuFFT's work area)
    fsc = {} if cpu else {"FSC": {"reconstruction": 8 * box ** 3 + 16 * box * box * (box // 2 + 1) + 8 * box ** 3,
                                  "fft_plans": 8 * box * box * (box // 2 + 1)}}
    if inp.stream:
        batch = base + STREAM_BYTES_PER_POINT * n * m
        return {
            "insertion": {"accumulators": owned, "batch_workspace": batch, "fft_plans": fft},
            "reconstruction": {"accumulators": owned, "reconstruction": transient + maps, "fft_plans": fft},
            **fsc,
        }
    acc = 2 * accb * vox
    batch = base + ((INSERT_BYTES_PER_CORNER[3] * 8 + 24) * n * m if cpu else 0)
    sym = 2 * accb * vox if inp.sym_copies > 1 else 0  # symmetrise's full output copies
    return {
        "insertion": {"accumulators": acc, "batch_workspace": max(batch, sym), "fft_plans": fft},
        "reduction": {"accumulators": acc, "reconstruction": owned, "fft_plans": fft},
        "reconstruction": {"reconstruction": owned + transient + maps, "fft_plans": fft},
        **fsc,
    }


def em_inputs(args, mode: str, meta: dict, ranks: int, device: str, cache_images: bool) -> EMInputs:
    """The model's inputs of an EM job from its options (jobs/em.py): the largest global pose grid the options
    allow (refine3d: orders up to the first local one; class2d: the in-plane angles) and the most coarse
    translations (refine3d with --refine-offsets: up to 49, see :func:`mpi_em.sampling.next_translations`)."""
    from ..em.references import local_grid
    from ..sampling import translation_grid

    T = int(translation_grid(args.offset_range, 2.0 * args.offset_step).shape[0])
    L = int(local_grid(3, float(getattr(args, "local_radius", 1.5))).shape[0])
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
                    cache_images=bool(cache_images), coarse_poses=C, local_poses=L, translations=T,
                    n_select=int(args.n_select),
                    class_select=int(getattr(args, "class_select", 10)),
                    owned_accumulators=getattr(args, "owned_accumulators", "auto") == "on" and mode != "class2d",
                    grid_chunk=int(getattr(args, "grid_chunk", 0) or 0),
                    zero_mask=bool(getattr(args, "zero_mask", False)),
                    accumulate="single" if getattr(args, "accumulate", "double") == "single" else "double")


def _grid_size(order: int, sym: str) -> int:
    from ..sampling import orientation_grid

    return int(orientation_grid(order, sym)[0].shape[0])


def reconstruct_inputs(args, meta: dict, ranks: int, device: str, vplan: dict, r_max: float) -> ReconstructInputs:
    """The model's inputs of ``mpi-em reconstruct`` (jobs/reconstruct.py) after its volume plan."""
    from ..symmetry import symmetry_matrices

    return ReconstructInputs(box=int(meta["box"]), pad=int(args.pad), batch=int(vplan["batch"]), ranks=int(ranks),
                             device="cpu" if device == "cpu" else "gpu", n_particles=int(meta["n"]),
                             stream=vplan["mode"] == "stream", r=float(r_max),
                             sym_copies=int(symmetry_matrices(args.sym).shape[0]))
