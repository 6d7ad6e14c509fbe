"""M-step: reduce the accumulators over ranks and reconstruct the references, update sigma^2, tau^2, priors.

3D volumes go through the stride-distributed volume (:mod:`mpi_em.distvolume`): partial sums are
reduce-scattered to the owners of their kz planes, shell statistics are summed with small all-reduces, and the
regularised division + inverse FFT run distributed; every rank receives the finished maps. 2D class averages
are small: all-reduced and reconstructed on every rank.

The E-step's accumulators (:func:`e_step_accumulators`) are either full local partial sums on every rank, or,
with ``--owned-accumulators`` (or where the memory model says the full ones do not fit), only the kz planes the
rank owns (:class:`OwnedAccumulators`): each batch's insertion is routed to the planes' owners, and the M-step
starts from the owned planes without a reduce-scatter. Memory per rank for the accumulators falls as 1/P.
"""
from __future__ import annotations

import weakref

import numpy as np

from ..backend import to_host, xp_of
from ..distributed import RankFailed, allreduce_sum
from ..distvolume import PlaneOwnerAccumulator, distributed_reconstruct, owned_planes, reduce_scatter_planes
from ..fourier import padded_reach, radius_3d, shell_index
from ..fourier2d import radius_plane, reconstruct2d
from ..fsc import fsc_fourier
from ..masks import raised_cosine
from ..timing import NULL_TIMER


# ------------------------------------------------------------------------------ the E-step's accumulators
#: voxels per chunk of the shell statistics (:func:`_shell_sums`)
SHELL_CHUNK = 1 << 24
_OPEN = weakref.WeakSet()  # owned accumulators of this rank whose routed rounds have not all been played


class OwnedAccumulators:
    """The E-step's accumulators as the kz planes this rank owns (:class:`mpi_em.distvolume.PlaneOwnerAccumulator`,
    F complex128 and W float64 of (V, n_owned, Np, Np//2+1)): each inserted point goes to the owners of the planes
    its stencil touches, once per symmetry operator (rotation A @ L: the summed accumulators cannot be symmetrised
    plane by plane; equal to the full accumulators' symmetrise to interpolation accuracy, exactly in C1).

    Insertion is collective: every rank plays the same rounds (:meth:`rounds`), one per batch of the rank with the
    most batches, plus a closing one; a rank out of batches plays empty rounds, a rank whose batch fails joins
    the round the others are in with its error (:func:`routed_step`), so every rank stops together.
    """

    def __init__(self, comm, V: int, vol_shape, xp, sym_mats=None, dtype=np.complex128):
        self.comm = comm
        self.acc = PlaneOwnerAccumulator(comm, vol_shape, n_vol=V, xp=xp, dtype=dtype)
        self.mats = [None] if sym_mats is None else [xp.asarray(L, dtype=xp.float64) for L in sym_mats]

    @property
    def nbytes(self) -> int:
        return self.acc.nbytes

    def insert(self, vol_index, mats, data, weights, geom) -> None:
        """Collective: :meth:`PlaneOwnerAccumulator.backproject_points` once per symmetry operator."""
        for L in self.mats:
            self.acc.backproject_points(vol_index, mats if L is None else mats @ L, data, weights, geom)

    def rounds(self, batches, n_local: int, batch: int):
        """The batches of this rank (an iterator of ``n_local`` particles in batches of ``batch``), each yielded in
        its collective round; the rounds this rank has no batch for are played empty here."""
        from mpi4py import MPI

        n_all = self.comm.allreduce(-(-int(n_local) // max(1, int(batch))), op=MPI.MAX)
        _OPEN.add(self)
        for _ in range(n_all):
            item = next(batches, None)
            if item is None:
                for _ in self.mats:
                    self.acc.add_empty()
                continue
            yield item
        self.acc.add_empty()  # closing round: a rank failing after its last insertion meets the others here
        _OPEN.discard(self)


#: the accumulators' (F, W) dtypes per ``--accumulate`` precision
ACCUMULATOR_DTYPES = {"double": (np.complex128, np.float64), "single": (np.complex64, np.float32)}
def crop_side(geom) -> int | None:
    """The side of the E-step's cropped accumulators for ``geom`` (3D), or None where that cube would hold more
    than :data:`mpi_em.fourier.projector.CROP_AT_MOST` of the full volume's voxels."""
    from ..fourier.projector import crop_layout_side

    return crop_layout_side(geom.r_max, geom.pad, geom.npad)


class CroppedAccumulators:
    """The E-step's full local partial sums kept only in the cube that this iteration's image size reaches
    (:func:`mpi_em.fourier.projector.cropped_size`: side ~2 pad r_max + 6 instead of pad x box; at r_max = box / 4,
    pad 2, about 1/8 of the voxels): the same insertion kernels, in a layout of the smaller side; :meth:`full`
    hands over the (F, W) stacks of the full layout, equal voxel for voxel to inserting there directly."""

    def __init__(self, V: int, geom, side: int, xp, cdt, rdt):
        from ..fourier.projector import with_layout_size

        self.geom = with_layout_size(geom, side)
        self.side, self.npad = side, geom.npad
        shape = (V,) + self.geom.vol_shape
        self.F, self.W = xp.zeros(shape, dtype=cdt), xp.zeros(shape, dtype=rdt)

    @property
    def nbytes(self) -> int:
        return int(self.F.nbytes + self.W.nbytes)

    def insert(self, vol_index, mats, data, weights, geom) -> None:
        from .references import insert

        insert(self.F, self.W, 3, mats, vol_index, data, weights, self.geom)

    def full(self):
        """(F, W) of shape (V, Np, Np, Np//2+1) (:func:`mpi_em.fourier.projector.to_full_layout`), the cropped
        stacks released."""
        from ..fourier.projector import to_full_layout

        F, W = to_full_layout(self.F, self.npad), to_full_layout(self.W, self.npad)
        self.F = self.W = None
        return F, W


def e_step_accumulators(comm, V: int, vol_shape, xp, owned: bool = False, sym_mats=None, precision: str = "double",
                        geom=None):
    """(F, W) for the E-step: full local partial sums (V,) + vol_shape, complex128 and float64 (``precision``
    'single': complex64 and float32, :data:`ACCUMULATOR_DTYPES`); or, ``owned`` (3D only; collective),
    (:class:`OwnedAccumulators`, None); or, given the iteration's ``geom`` (3D) where its reach is a small part of
    the volume (:func:`crop_side`), (:class:`CroppedAccumulators`, None)."""
    cdt, rdt = ACCUMULATOR_DTYPES[precision]
    if owned and len(vol_shape) == 3:  # collective: the rounds start together, or every rank stops here
        from ..distributed import agree

        acc, err = None, None
        try:
            acc = OwnedAccumulators(comm, V, vol_shape, xp, sym_mats, dtype=cdt)
        except Exception as e:  # noqa: BLE001 - reported to every rank
            err = e
        agree(comm, err)
        return acc, None
    side = crop_side(geom) if geom is not None and len(vol_shape) == 3 else None
    if side is not None:
        return CroppedAccumulators(V, geom, side, xp, cdt, rdt), None
    shape = (V,) + tuple(vol_shape)
    return xp.zeros(shape, dtype=cdt), xp.zeros(shape, dtype=rdt)


def batch_rounds(F_acc, batches, n_local: int, batch: int):
    """The E-step's batch iterator: as it is for full accumulators, in collective rounds for owned ones."""
    return F_acc.rounds(batches, n_local, batch) if isinstance(F_acc, OwnedAccumulators) else batches


def routed_step(fn):
    """``fn`` (an E-step) for :func:`mpi_em.distributed.collective_step`: an error on this rank while owned
    accumulators' rounds are open is sent in the round the other ranks are in, so that every rank raises
    :class:`RankFailed` there instead of waiting for this one."""
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RankFailed:  # raised by a round: every rank has it
            _OPEN.clear()
            raise
        except Exception as e:  # noqa: BLE001 - sent to every rank
            for acc in list(_OPEN):
                _OPEN.discard(acc)
                acc.acc.fail(e)
            raise
    return run


def _shell_index_planes(npad: int, pad: int, planes, xp, n_shells: int, rows=None, nx: int | None = None):
    """Image-pixel shell of every voxel of the kz ``planes`` (n_shells = the "outside" bin): radius_3d's
    expression on those planes only (and only on the ky ``rows`` and the first ``nx`` kx columns, where given)."""
    k = xp.fft.fftfreq(npad, d=1.0 / npad)
    kz = k[xp.asarray(planes)].reshape(-1, 1, 1)
    ky = (k if rows is None else k[xp.asarray(rows)]).reshape(1, -1, 1)
    kx = xp.arange(npad // 2 + 1 if nx is None else nx, dtype=xp.float64).reshape(1, 1, -1)
    return shell_index(xp.sqrt(kz * kz + ky * ky + kx * kx) / pad, n_shells)


def _shell_sums(F, W, sh, n_shells: int, power: bool = True) -> np.ndarray:
    """Per volume of F, W (V, ...) and shell index ``sh`` (flat, n_shells = "outside" bin): sums of W, voxel
    counts, |F/W|^2 over voxels with W > 0, and counts of W > 0 -> host (4, V, n_shells + 1); without ``power``
    the last two are left 0 and F is not read (the priors that do not use it); the voxel counts, alike for every
    volume, are counted once per chunk. At most
    :data:`SHELL_CHUNK` voxels at a time: small volumes together (one bincount per quantity and chunk), large
    ones in pieces (temporaries of ~56 bytes per voxel of a chunk, not of the volume)."""
    xp = xp_of(F)
    V = F.shape[0]
    nb = n_shells + 1
    Ff = F.reshape(V, -1)
    Wf = W.reshape(V, -1)
    nvox = Wf.shape[1]
    out = np.zeros((4, V, nb))
    vols = max(1, SHELL_CHUNK // max(nvox, 1))
    span = min(nvox, SHELL_CHUNK) if nvox else 1
    for v0 in range(0, V, vols):
        v1 = min(V, v0 + vols)
        for a in range(0, nvox, span):
            s = sh[a:a + span]
            idx = (s[None, :] + nb * xp.arange(v1 - v0)[:, None]).reshape(-1)
            w = Wf[v0:v1, a:a + span]
            if w.dtype != xp.float64:  # single-precision accumulators: the statistics in double (chunk copies)
                w = w.astype(xp.float64)
            quantities = (w,)
            if power:
                f = Ff[v0:v1, a:a + span]
                if f.dtype != xp.complex128:
                    f = f.astype(xp.complex128)
                pos = w > 0
                ratio = xp.where(pos, (f.real ** 2 + f.imag ** 2) / xp.where(pos, w, 1.0) ** 2, 0.0)
                quantities += (ratio, pos)
            for q, vals in zip((0, 2, 3), quantities):
                out[q, v0:v1] += to_host(xp.bincount(idx, weights=vals.reshape(-1).astype(xp.float64),
                                                     minlength=(v1 - v0) * nb)).reshape(v1 - v0, nb)
            out[1, v0:v1] += to_host(xp.bincount(s, minlength=nb))[None, :nb]  # voxels per shell: alike for all
    return out


def _shell_means(out, n_shells: int):
    """(mean W, mean |F/W|^2 over W > 0) per volume and shell from :func:`_shell_sums` (the second 0 where it was
    not summed)."""
    mean_w = np.where(out[1] > 0, out[0] / np.maximum(out[1], 1), 0.0)[:, :n_shells]
    power = np.where(out[3] > 0, out[2] / np.maximum(out[3], 1), 0.0)[:, :n_shells]
    return mean_w, power


#: the voxels per shell of a layout's planes (geometry only), by (npad, pad, n_shells, the planes): the divisor of
#: the mean W, whose sums :func:`shell_statistics` takes inside the insertion's reach only
_SHELL_COUNTS: dict = {}


def _shell_counts(npad: int, pad: int, planes, n_shells: int) -> np.ndarray:
    """Voxels of each image-pixel shell (and the "outside" bin) over the kz ``planes`` of the npad layout, on the
    host; computed once per layout and planes (by chunks of planes, as :func:`shell_statistics` reads them)."""
    p = np.asarray(planes, dtype=np.int64)
    key = (int(npad), int(pad), int(n_shells), p.tobytes())
    if key not in _SHELL_COUNTS:
        step = max(1, SHELL_CHUNK // (npad * (npad // 2 + 1)))
        cnt = np.zeros(n_shells + 1)
        for p0 in range(0, len(p), step):
            cnt += np.bincount(_shell_index_planes(npad, pad, p[p0:p0 + step], np, n_shells).reshape(-1),
                               minlength=n_shells + 1)
        if len(_SHELL_COUNTS) > 64:
            _SHELL_COUNTS.clear()
        _SHELL_COUNTS[key] = cnt
    return _SHELL_COUNTS[key]


def _reach_block(npad: int, planes, reach: float):
    """Inside the layout's kz ``planes``: the positions of the planes, the ky rows and the kx columns whose
    frequencies lie within ``reach`` (padded voxels) on each axis, or None where the reach covers the layout."""
    if reach is None or reach >= npad // 2:
        return None
    k = np.fft.fftfreq(npad, d=1.0 / npad)
    p = np.asarray(planes, dtype=np.int64)
    return (np.flatnonzero(np.abs(k[p]) <= reach), np.flatnonzero(np.abs(k) <= reach),
            int(min(npad // 2, np.floor(reach))) + 1)


def shell_statistics(comm, F_own, W_own, planes, npad: int, pad: int, n_shells: int, power: bool = True,
                     reach: float | None = None):
    """Per volume and image-pixel shell: mean W, and mean |F/W|^2 over voxels with W > 0 (summed over ranks; None
    without ``power``: only the prior of :func:`_reconstruct_owned` without a gold standard or reference power
    uses it). ``reach`` (padded voxels, :func:`mpi_em.fourier.padded_reach`): the accumulators hold nothing past it
    on any axis, so the sums are taken over the block of planes, rows and columns inside it, and each shell's mean
    W is divided by its voxels over the whole layout (the same figures: only zeros are left out of the sums)."""
    xp = xp_of(F_own)
    block = _reach_block(npad, planes, reach)
    if block is not None:
        pz, ry, nx = block
        pzx, ryx = xp.asarray(pz), xp.asarray(ry)
        Fb = F_own[:, pzx][:, :, ryx, :nx] if power else None
        Wb = W_own[:, pzx][:, :, ryx, :nx]
        sh = _shell_index_planes(npad, pad, np.asarray(planes, dtype=np.int64)[pz], xp, n_shells, ry, nx).reshape(-1)
        out = _shell_sums(Fb if power else Wb, Wb, sh, n_shells, power)
        out[1] = _shell_counts(npad, pad, planes, n_shells)[None, :]
        allreduce_sum(comm, out)
        mean_w, mean_power = _shell_means(out, n_shells)
        return mean_w, (mean_power if power else None)
    out = np.zeros((4, F_own.shape[0], n_shells + 1))
    # by chunks of planes: the shell indices (and the radii they come from) of SHELL_CHUNK voxels at a time, not
    # of the whole volume (at box 512: 13 GB of float64 radii and int64 indices beside the accumulators)
    step = max(1, SHELL_CHUNK // (npad * (npad // 2 + 1)))
    for p0 in range(0, len(planes), step):
        sh = _shell_index_planes(npad, pad, planes[p0:p0 + step], xp, n_shells).reshape(-1)
        out += _shell_sums(F_own[:, p0:p0 + step], W_own[:, p0:p0 + step], sh, n_shells, power)
        del sh
    allreduce_sum(comm, out)
    mean_w, mean_power = _shell_means(out, n_shells)
    return mean_w, (mean_power if power else None)


#: voxels of the padded accumulators down-sampled at once (fourier_fsc): 2^26 (512 MiB of indices)
DOWNSAMPLE_CHUNK = 1 << 26


def downsampled_sums(F_own, W_own, planes, npad: int, pad: int, box: int | None = None):
    """RELION's BackProjector::getDownsampledAverage, before the division: the padded accumulators' voxels summed
    into the voxel of the unpadded grid nearest to k / pad (ROUND = floor(x + 0.5)), for the owned kz
    ``planes`` of F_own, W_own (V, len(planes), Np, Np//2+1) -> this rank's partial sums, (V, N, N, N//2+1)
    complex and real (N = Np / pad), to be summed over ranks. ``npad`` is the layout's side: pad x box, or the
    side of the cube the E-step accumulated into (one rank; then ``box`` is given)."""
    xp = xp_of(F_own)
    V = F_own.shape[0]
    box = npad // pad if box is None else box
    nxh, nxh_d = npad // 2 + 1, box // 2 + 1
    k = xp.fft.fftfreq(npad, 1.0 / npad)
    down = lambda v: xp.floor(v / pad + 0.5).astype(xp.int64)  # noqa: E731
    kz = down(k[xp.asarray(planes)]) % box
    ky = down(k) % box
    kx = xp.minimum(down(xp.arange(nxh, dtype=xp.float64)), nxh_d - 1)
    size = box * box * nxh_d
    dF = xp.zeros((V, size), dtype=xp.complex128)
    dW = xp.zeros((V, size), dtype=xp.float64)
    # by chunks of planes (at most DOWNSAMPLE_CHUNK voxels: their indices and float64 weights), not the whole
    # volume's at once (at box 512, single precision: 8.6 GB of temporaries beside 12 GiB of accumulators)
    step = max(1, DOWNSAMPLE_CHUNK // (npad * nxh))
    for p0 in range(0, len(planes), step):
        idx = ((kz[p0:p0 + step, None, None] * box + ky[None, :, None]) * nxh_d + kx[None, None, :]).reshape(-1)
        for v in range(V):
            f = F_own[v, p0:p0 + step].reshape(-1)
            dF[v] += xp.bincount(idx, weights=f.real, minlength=size)
            dF[v] += 1j * xp.bincount(idx, weights=f.imag, minlength=size)
            dW[v] += xp.bincount(idx, weights=W_own[v, p0:p0 + step].reshape(-1), minlength=size)
        del idx
    return dF.reshape(V, box, box, nxh_d), dW.reshape(V, box, box, nxh_d)


def fourier_fsc(comm, F_own, W_own, planes, npad: int, pad: int, r_max: float, box: int | None = None):
    """Gold-standard FSC of volumes 0 and 1 as RELION computes it (calculateDownSampledFourierShellCorrelation):
    from the down-sampled averages F / W in Fourier space, without the two inverse transforms of the padded
    halves (distributed FFTs at P >= 2) that a real-space FSC of unregularised maps needs. Unmasked, as RELION's
    refinement. Shells beyond ``r_max`` (no data) are 0."""
    xp = xp_of(F_own)
    dF, dW = downsampled_sums(F_own[:2], W_own[:2], planes, npad, pad, box)
    allreduce_sum(comm, dF)
    allreduce_sum(comm, dW)
    dW[dW <= 0] = xp.inf  # F / W where W > 0, else 0: in place, no third volume-sized array
    dF /= dW
    del dW
    curve = fsc_fourier(dF[0], dF[1])
    curve[int(np.floor(r_max)) + 1:] = 0.0
    return curve


def tau2_from_fsc(curve, mean_w, fudge: float):
    """RELION's gold-standard prior: SSNR = FSC / (1 - FSC), tau^2 = fudge * SSNR / mean W (per shell)."""
    c = np.clip(np.asarray(curve, dtype=np.float64), 0.0, 0.999)
    ssnr = c / (1.0 - c)
    return np.where(mean_w > 0, fudge * ssnr / np.where(mean_w > 0, mean_w, 1.0), 0.0)


def reduce_and_reconstruct_3d(comm, F_acc, W_acc, box: int, pad: int, r_max: float, fudge: float,
                              gold: bool, compress: bool = False, combined: bool = False,
                              timer=NULL_TIMER, folds: int = 1, fsc_mask=None, tau2_ref=None):
    """Sum accumulators over ranks (stride-distributed) and reconstruct every volume; maps on every rank.

    gold: the volumes are the 2 x ``folds`` parts of the two half sets, (half1 fold 1..F, half2 fold 1..F); the
    half maps are reconstructed from each half's sum with tau^2 from their FSC. With folds > 1 also each fold's
    leave-one-fold-out reference, its half without it (same tau^2), in info["references"] (2 x folds maps).
    Otherwise (classification): with ``tau2_ref`` (V, n_shells), RELION's prior pad^3 x fudge x the power of the
    references the E-step used (:func:`reference_power`; ``oversampling_correction`` = pad^3 in RELION's
    ``BackProjector::reconstruct``); without it fudge x each volume's own mean |F/W|^2, which holds the maps'
    noise (every shell with data looks like signal).
    ``fsc_mask`` (gold, a (N, N, N) solvent mask on the host): tau^2 from the solvent-corrected FSC of the
    unregularised half maps instead (:func:`solvent_corrected_fsc`).
    Returns (maps (V, N, N, N) float32 on F_acc's module, info dict with fsc, tau2, mean_w).
    ``F_acc`` may be :class:`OwnedAccumulators` (``W_acc`` None): the owned planes are already summed; on one
    rank the full accumulators are the owned planes (used as they are, not copied).
    """
    from ..memory import release_device_memory

    npad = pad * box
    release_device_memory(F_acc.acc.xp if W_acc is None else xp_of(F_acc))  # the E-step's blocks and plans
    with timer("reduce"):
        F_own, W_own, sent, raw = _owned_sums(comm, F_acc, W_acc, compress, padded_reach(r_max, pad))
    xp = xp_of(F_own)
    timer.add_bytes("reduce_sent", sent)
    timer.add_bytes("reduce_raw", raw)
    # one rank: the accumulators as they are, in the pad x box layout or the cube the E-step accumulated into
    layout = F_own.shape[-3] if comm.size == 1 else npad
    planes = owned_planes(layout, comm.rank, comm.size)
    with timer("reconstruct"):
        out = _reconstruct_owned(comm, F_own, W_own, planes, box, pad, r_max, fudge, gold, combined, xp, folds,
                                 fsc_mask, layout, tau2_ref)
    release_device_memory(xp)
    return out


def _owned_sums(comm, F_acc, W_acc, compress, rp):
    """The summed owned planes (F, W) and the bytes sent / the local buffers' bytes."""
    if W_acc is None:  # owned accumulators: summed by the routed insertion
        acc = F_acc.acc
        acc.free()
        return acc.F, acc.W, acc.n_sent * acc._rec.itemsize, acc.nbytes
    if comm.size == 1:  # one rank owns every plane: no copy
        return F_acc, W_acc, 0, int(F_acc.nbytes + W_acc.nbytes)
    stats_F, stats_W = {}, {}
    # nothing outside the reach needs sending, by construction
    F_own = reduce_scatter_planes(comm, F_acc, compress=compress, r_max_padded=rp, check=False, stats=stats_F)
    W_own = reduce_scatter_planes(comm, W_acc, compress=compress, r_max_padded=rp, check=False, stats=stats_W)
    return (F_own, W_own, stats_F["bytes_sent"] + stats_W["bytes_sent"],
            stats_F["bytes_raw"] + stats_W["bytes_raw"])


def solvent_corrected_fsc(half1, half2, mask, r_max: float) -> np.ndarray:
    """RELION's --solvent_correct_fsc inside the refinement: the FSC of the masked unregularised half maps,
    corrected by phase randomisation beyond the first shell where their unmasked FSC falls below 0.8 (Chen et
    al. 2013; :func:`mpi_em.postprocess.fsc_curves`, the mask always used as RELION's refinement does). Shells
    beyond ``r_max`` (no data) are 0; the unmasked FSC where it never falls below 0.8."""
    from ..postprocess import fsc_curves

    try:
        curve = fsc_curves(to_host(half1), to_host(half2), mask, force_mask=True).fsc_true
    except ValueError:  # nothing to randomise: the unmasked FSC stays above 0.8 up to Nyquist
        curve = fsc_curves(to_host(half1), to_host(half2)).fsc_true
    curve = np.nan_to_num(curve, nan=0.0, posinf=0.0, neginf=0.0)
    curve[int(np.floor(r_max)) + 1:] = 0.0
    return curve


def _reconstruct_owned(comm, F_own, W_own, planes, box, pad, r_max, fudge, gold, combined, xp, folds=1,
                       fsc_mask=None, layout=None, tau2_ref=None):
    # every map with RELION's soft mask outside the box's sphere (softMaskOutsideMap in its
    # BackProjector::windowToOridimRealSpace): the corners hold only interpolation aliasing and noise, which the
    # gridding correction amplifies, in the references and the outputs alike
    # (benchmarks/results/relion-side-by-side/h200-box256-refine3d-options-2026-12-03/README.md)
    npad = pad * box if layout is None else layout  # the layout's side (statistics); the maps are pad x box
    n_shells = box // 2 + 1
    parts = None
    if gold and folds > 1:
        # the folds' sums, and each half's sum of its folds
        parts = (F_own.reshape((2, folds) + F_own.shape[1:]), W_own.reshape((2, folds) + W_own.shape[1:]))
        F_own, W_own = parts[0].sum(axis=1), parts[1].sum(axis=1)
    # |F/W|^2 per shell only for the prior that uses it (neither refine3d's nor classification's)
    mean_w, power = shell_statistics(comm, F_own, W_own, planes, npad, pad, n_shells,
                                     power=not gold and tau2_ref is None, reach=padded_reach(r_max, pad))
    info = {"mean_w": mean_w, "power": power}
    if gold:
        curve = fourier_fsc(comm, F_own, W_own, planes, npad, pad, r_max, box)  # unmasked, as RELION's
        if fsc_mask is not None:  # every rank gets both unregularised half maps and computes the same curve
            info["fsc_unmasked"] = curve
            unreg = distributed_reconstruct(comm, F_own, W_own, box, pad, r_max, mask_outside=True)
            curve = solvent_corrected_fsc(unreg[0], unreg[1], fsc_mask, r_max)
            del unreg
        info["fsc_unregularised"] = curve
        tau2 = np.stack([tau2_from_fsc(curve, mean_w[v], fudge) for v in range(F_own.shape[0])])
    elif tau2_ref is not None:  # RELION's classification prior (see reduce_and_reconstruct_3d)
        tau2 = pad ** 3 * fudge * np.asarray(tau2_ref, dtype=np.float64).reshape(F_own.shape[0], n_shells)
    else:
        tau2 = fudge * power
    maps = distributed_reconstruct(comm, F_own, W_own, box, pad, r_max, tau2=tau2, tau2_fudge=1.0,
                                  mask_outside=True)
    info["tau2"] = tau2
    if parts is not None:
        # leave one fold out: each fold's particles are aligned against their half without their own
        # contribution, which otherwise pulls them to their previous poses (benchmarks/results/issue4-monotonic/)
        F_lo = (F_own[:, None] - parts[0]).reshape((2 * folds,) + F_own.shape[1:])
        W_lo = (W_own[:, None] - parts[1]).reshape((2 * folds,) + W_own.shape[1:])
        del parts
        info["references"] = distributed_reconstruct(comm, F_lo, W_lo, box, pad, r_max,
                                                     tau2=np.repeat(tau2, folds, axis=0),
                                                     tau2_fudge=1.0, mask_outside=True
                                                     ).astype(xp.float32, copy=False)
        del F_lo, W_lo
    if gold and combined:
        # the final map: both halves summed, prior from the FSC of the full set, 2 FSC / (1 + FSC)
        c = np.clip(curve, 0.0, 0.999)
        full_curve = 2 * c / (1 + c)
        # summed in place into the first volume (the accumulators are not read after the M-step): a new sum
        # would hold one more volume's accumulators (6 GiB at box 512 in single precision) beside them
        for v in range(1, F_own.shape[0]):
            F_own[0] += F_own[v]
            W_own[0] += W_own[v]
        Fs, Ws = F_own[:1], W_own[:1]
        tau2_full = tau2_from_fsc(full_curve, mean_w.sum(axis=0), fudge)
        info["combined"] = distributed_reconstruct(comm, Fs, Ws, box, pad, r_max, tau2=tau2_full,
                                                   tau2_fudge=1.0, mask_outside=True)[0].astype(xp.float32, copy=False)
    return maps.astype(xp.float32, copy=False), info


def reduce_and_reconstruct_2d(comm, F_acc, W_acc, box: int, pad: int, r_max: float, fudge: float, tau2_ref,
                              timer=NULL_TIMER):
    """2D class averages: all-reduce the (K, Np, Np//2+1) accumulators and reconstruct on every rank.

    ``tau2_ref`` (K, n_shells): the signal prior, per class and shell the power spectrum (per real component) of
    the references this iteration aligned against (:func:`reference_power`), RELION's classification tau2
    (``MlModel::setFourierTransformMaps``)."""
    with timer("reduce"):
        allreduce_sum(comm, F_acc)
        allreduce_sum(comm, W_acc)
    timer.add_bytes("reduce_sent", F_acc.nbytes + W_acc.nbytes)
    with timer("reconstruct"):
        return _reconstruct_2d(F_acc, W_acc, box, pad, r_max, fudge, tau2_ref)


def _reconstruct_2d(F_acc, W_acc, box, pad, r_max, fudge, tau2_ref):
    """The class averages F / (W + 1 / tau2) and info {"tau2": tau2 per class and shell (the prior's variance as
    used, in the padded plane's units of W), "mean_w"}: tau2 x mean W is RELION's data-vs-prior SSNR, from which
    the resolution and the current size follow.

    The prior is pad^2 x fudge x ``tau2_ref``, the power of the references the E-step used (RELION's convention): RELION's ``BackProjector::reconstruct`` adds 1 / (oversampling_correction x tau2_fudge x tau2) to the
    weights, oversampling_correction = pad^2 for 2D references, because the padded plane's pixels dilute each
    image's weight pad^2-fold; without it the prior was 4x too strong at pad 2 and the data-vs-prior a quarter of
    the averages' spectral SNR (``tests/test_em_maps.py::test_2d_data_vs_prior_is_the_spectral_snr_of_the_average``).
    Until 2026-12-04 tau2 was fudge x the mean |F/W|^2 of the unregularised averages, which holds their noise, 2 / W
    per voxel: tau2 x mean W >= 2 x fudge in every shell with data whatever the signal, the averages were barely
    regularised and the reported resolution was the current size's edge (benchmarks/results/class2d-reseed/
    cpu-box256-2026-12-04/)."""
    xp = xp_of(F_acc)
    npad = pad * box
    n_shells = box // 2 + 1
    sh = shell_index(radius_plane(npad, xp) / pad, n_shells).reshape(-1)
    mean_w, _ = _shell_means(_shell_sums(F_acc, W_acc, sh, n_shells, power=False), n_shells)
    tau2 = pad ** 2 * fudge * np.asarray(tau2_ref, dtype=np.float64).reshape(F_acc.shape[0], n_shells)
    maps = reconstruct2d(F_acc, W_acc, box, pad, r_max, tau2=xp.asarray(tau2), tau2_fudge=1.0, mask_outside=True)
    return maps.astype(xp.float32), {"tau2": tau2, "mean_w": mean_w}


#: Fourier points of all references :func:`reference_power` bins at a time (its temporaries: ~40 bytes a point)
POWER_SLAB_VOXELS = 1 << 22
#: per-shell bins a GPU spreads each shell's sum over (point index mod lanes): float64 atomics on ~N/2 shells
#: alone serialise on their few addresses
POWER_GPU_LANES = 64


def _power_lanes(xp) -> int:
    return POWER_GPU_LANES if xp is not np else 1


def reference_power(F, box: int, pad: int, r_max: float) -> np.ndarray:
    """The signal prior of a classification: per reference of ``F`` -- 2D planes (V, Np, Np//2+1) or 3D volumes
    (V, Np, Np, Np//2+1), the Fourier transforms the E-step projects (:func:`mpi_em.fourier2d.plane_fft`,
    :func:`mpi_em.fourier.volume_fft` of the masked maps) -- and per image-pixel shell, the mean of |F|^2 / 2 over
    the points of the shell inside the reconstruction ball of ``r_max`` (0 beyond it) -> host (V, n_shells), in
    the units of the accumulators' F / W. RELION's tau2 of a classification (``MlModel::setFourierTransformMaps``,
    ``Projector::computeFourierTransformMap``'s power spectrum within the current size, per real component:
    "factor two because of two-dimensionality of the complex plane"); the reconstruction multiplies it by pad^dim
    (RELION's oversampling correction). Only the points of the cube the ball reaches are read (|k| <= pad x
    (r_max + 1/2): a few percent of a 3D reference below a quarter of Nyquist), binned for all references at once
    a slab of the first Fourier axis at a time (:data:`POWER_SLAB_VOXELS`), the sums kept on the references'
    device (on a GPU spread over :data:`POWER_GPU_LANES` bins per shell)."""
    from ..fourier import reconstruction_ball

    xp = xp_of(F)
    V, npad, nxh = F.shape[0], F.shape[1], F.shape[-1]
    dim = F.ndim - 1
    n_shells = box // 2 + 1
    kmax = min(int(np.floor(pad * (r_max + 0.5))), npad // 2)
    k_all = np.fft.fftfreq(npad, d=1.0 / npad)
    rows = np.flatnonzero(np.abs(k_all) <= kmax)              # the ball's indices on a full (fftfreq) axis
    nx = min(kmax + 1, nxh)
    full = len(rows) == npad                                     # the ball reaches the grid's Nyquist: no copies
    rows_d, k_rows = xp.asarray(rows), xp.asarray(k_all[rows])   # on the references' device, once
    mid = rows_d if dim == 3 and not full else None
    kx = xp.arange(nx, dtype=xp.float64)
    rest2 = (k_rows.reshape(-1, 1) ** 2 + kx.reshape(1, -1) ** 2) if dim == 3 else kx ** 2
    lanes = _power_lanes(xp)
    nb = (n_shells + 1) * lanes                                  # per reference: shells, the "outside" bin, x lanes
    step = max(1, POWER_SLAB_VOXELS // max(1, V * int(rest2.size)))
    sums = xp.zeros(V * nb)
    counts = xp.zeros(nb)
    for i0 in range(0, len(rows), step):
        kz = k_rows[i0:i0 + step].reshape((-1,) + (1,) * (dim - 1))
        r = xp.sqrt(kz * kz + rest2) / pad
        key = xp.where(reconstruction_ball(r, r_max, box), shell_index(r, n_shells), n_shells).reshape(-1) * lanes
        del r
        if lanes > 1:
            key += xp.arange(key.size) % lanes
        counts += xp.bincount(key, minlength=nb)
        f = F[:, i0:i0 + step] if full else F[:, rows_d[i0:i0 + step]]
        f = (f if mid is None else f[:, :, mid])[..., :nx].reshape(V, -1)
        p = 0.5 * (f.real.astype(xp.float64) ** 2 + f.imag.astype(xp.float64) ** 2)
        del f
        keys = (key[None, :] + (xp.arange(V) * nb)[:, None]).reshape(-1)
        sums += xp.bincount(keys, weights=p.reshape(-1), minlength=V * nb)
        del p, keys, key
    sums = to_host(sums).reshape(V, n_shells + 1, lanes).sum(axis=2)
    counts = to_host(counts).reshape(n_shells + 1, lanes).sum(axis=1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)[:, :n_shells]


def lowpass(maps, box: int, pixel_size: float, resolution_A: float, width_shells: float = 2.0):
    """Raised-cosine low-pass of real maps (..., N, N[, N]) at ``resolution_A``, returned in the maps' dtype
    (float32 maps transformed in single precision; on the CPU a 3D low-pass whose band is under a quarter of the box
    is transformed in double precision, pruned to the band: :func:`_lowpass_3d_pruned`)."""
    xp = xp_of(maps)
    ndim = 3 if maps.ndim >= 3 and maps.shape[-3] == box else 2
    axes = tuple(range(-ndim, 0))
    rc = box * pixel_size / resolution_A
    m = int(np.floor(rc + width_shells))  # the filter is 0 past |k| = rc + width: only |k_i| <= m can pass
    if ndim == 3 and xp is np and 4 * m + 2 < box:
        return _lowpass_3d_pruned(maps, box, rc, width_shells, m)
    F = xp.fft.rfftn(maps, axes=axes)
    if ndim == 3:
        r = radius_3d(box, xp)
    else:
        from ..fourier import radius_2d

        r = radius_2d(box, xp)
    F *= raised_cosine(xp, r, rc, width_shells, maps.real.dtype)
    return xp.fft.irfftn(F, s=(box,) * ndim, axes=axes).astype(maps.dtype)


#: rows per call of the pruned low-pass's 1D transforms (their double-precision temporaries stay ~50-70 MB)
_FFT_ROWS = 8192


def _rows(a, fn, keep, n_full: int | None = None, dtype=None, **kw):
    """``fn`` (a NumPy 1D FFT) along the last axis of ``a`` taken as rows, ``_FFT_ROWS`` at a time, in double
    precision (NumPy's single-precision transforms ran 4-7x slower, and a 3D array's last axis 5-10x slower than the
    same rows as a 2D array); of each row's result the entries ``keep`` (slice or indices). ``n_full``: each row
    first scattered into a zero row of that length at ``keep`` (an inverse transform of a pruned spectrum)."""
    flat = a.reshape(-1, a.shape[-1])
    out = None
    for s in range(0, flat.shape[0], _FFT_ROWS):
        blk = flat[s:s + _FFT_ROWS]
        blk = blk.astype(np.complex128 if np.iscomplexobj(blk) else np.float64, copy=False)
        if n_full is not None:
            full = np.zeros((len(blk), n_full), dtype=blk.dtype)
            full[:, keep] = blk
            blk, keep_out = full, slice(None)
        else:
            keep_out = keep
        r = fn(blk, axis=-1, **kw)[:, keep_out]
        if out is None:
            out = np.empty((flat.shape[0], r.shape[1]), dtype=dtype or r.dtype)
        out[s:s + len(r)] = r
    return out.reshape(a.shape[:-1] + (out.shape[1],))


def _lowpass_3d_pruned(maps: np.ndarray, box: int, rc: float, width: float, m: int) -> np.ndarray:
    """:func:`lowpass` of 3D maps on the CPU, the transforms pruned to the frequencies the filter passes (|k_i| <=
    m on each axis): x transformed whole, y and z only where x (then y) can pass, the inverse the same way back,
    each pass over rows of the axis it transforms (:func:`_rows`, double precision; the result in the maps'
    dtype). The same one-dimensional transforms as ``rfftn`` / ``irfftn`` on the coefficients that are not
    multiplied by 0, so the same maps to float rounding."""
    n = box
    keep = _band(n, m)                                               # frequencies -m..m of an fft axis, fft order
    F = _rows(maps, np.fft.rfft, slice(0, m + 1))                    # (.., z, y, kx)
    F = _rows(np.swapaxes(F, -1, -2), np.fft.fft, keep)              # (.., z, kx, ky)
    F = _rows(np.moveaxis(F, -3, -1), np.fft.fft, keep)              # (.., kx, ky, kz)
    k = np.fft.fftfreq(n, d=1.0 / n)[keep]
    r = np.sqrt(np.arange(m + 1.0)[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    F *= raised_cosine(np, r, rc, width, np.float64)
    return _band_to_real_3d(F, n, m, maps.dtype)


def _band(n: int, m: int) -> np.ndarray:
    """Indices of the frequencies -m..m of an n-point FFT axis, in FFT order (0..m, then -m..-1)."""
    return np.r_[0:m + 1, n - m:n]


def _band_to_real_3d(F: np.ndarray, n: int, m: int, dtype) -> np.ndarray:
    """Real 3D maps (.., n, n, n) from their spectrum on the band |k_i| <= m, F (.., kx 0..m, ky, kz) with ky and kz
    at -m..m in FFT order (0..m, then -m..-1): the inverse of :func:`_lowpass_3d_pruned`'s forward passes, every
    coefficient outside the band 0."""
    keep = _band(n, m)
    G = _rows(F, np.fft.ifft, keep, n_full=n)                        # (.., kx, ky, z)
    G = _rows(np.moveaxis(G, -1, -3), np.fft.ifft, keep, n_full=n)   # (.., z, kx, y)
    return _rows(np.swapaxes(G, -1, -2), np.fft.irfft, slice(None), n=n, dtype=dtype)  # (.., z, y, x)


def band_limited_noise(rng: np.random.Generator, box: int, ndim: int, rc: float, width_shells: float = 2.0,
                       dtype=np.float32, xp=np):
    """A real map (2D or 3D, ``box`` px a side) of Gaussian noise low-passed at shell ``rc`` with :func:`lowpass`'s
    raised cosine, drawn in Fourier space on the band the filter passes only: independent complex Gaussian
    coefficients with |k_i| <= m = floor(rc + width), at most (box - 1) // 2 (the same distribution as white noise put through
    :func:`lowpass`, but ~(2m / box)^ndim of its draws and one pruned inverse transform instead of two whole
    ones). Not normalised: scale it by its standard deviation. Seeded by ``rng`` alone, so the same on every rank.
    ``xp``: the array module of the result; the coefficients are drawn on the host whatever it is (the same
    numbers on CPU and GPU ranks), a GPU's inverse is one whole ``irfftn`` of the zero-filled spectrum (the same
    map to float rounding)."""
    n = int(box)
    m = max(0, min(int(np.floor(rc + width_shells)), (n - 1) // 2))
    k = np.fft.fftfreq(n, d=1.0 / n)[_band(n, m)]  # -m..m in FFT order
    shape = (m + 1,) + (2 * m + 1,) * (ndim - 1)                   # (kx, ky[, kz])
    F = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    kx = np.arange(m + 1.0)
    r2 = kx[:, None] ** 2 + k[None, :] ** 2 if ndim == 2 else \
        kx[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
    F *= raised_cosine(np, np.sqrt(r2), rc, width_shells, np.float64)
    # the inverse keeps the Hermitian part of the kx = 0 plane, (F(k) + conj F(-k)) / 2, of half the power of the
    # other coefficients': sqrt 2 makes the spectrum white inside the band, as white noise low-passed
    F[0] *= np.sqrt(2.0)
    if ndim == 3 and xp is np:
        return _band_to_real_3d(F, n, m, dtype)
    band = xp.asarray(_band(n, m))
    if ndim == 3:
        full = xp.zeros((n, n, n // 2 + 1), dtype=xp.complex128)    # (kz, ky, kx), rfftn's layout
        full[band[:, None, None], band[None, :, None], xp.arange(m + 1)[None, None, :]] = \
            xp.asarray(F.transpose(2, 1, 0))
        return xp.fft.irfftn(full, s=(n, n, n)).astype(dtype)
    full = xp.zeros((n, n // 2 + 1), dtype=xp.complex128)            # (ky, kx), rfft2's layout
    full[band, :m + 1] = xp.asarray(F.T)
    return xp.fft.irfft2(full, s=(n, n)).astype(dtype)
