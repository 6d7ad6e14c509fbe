"""MRC image stacks and maps (mrcfile), plus small HDF5 helpers (h5py)."""
from __future__ import annotations

import logging
import os
import warnings

import h5py
import mrcfile
import numpy as np

from ..errors import InputError
from .atomic import atomic_path

log = logging.getLogger("mpi_em")


def _check_exists(path, field=None):
    if not os.path.exists(path):
        raise InputError(path, "file not found", field=field)
    if os.path.isdir(path):
        raise InputError(path, "is a folder, not an MRC file", field=field)


def _open_mmap(path, with_note: bool = False):
    """Open ``path`` read-only memory-mapped; InputError on failure. ``with_note``: return (mrc, note), where note
    is None for a standard header, else a short text saying why the strict reader refused the header (the file was
    then opened with mrcfile's permissive mode, which reads headers that lack the ``MAP `` id or carry an unknown
    machine stamp, as older programs write them)."""
    _check_exists(path)
    note = None
    # Header first, so header faults and data-size faults get different fields.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", header_only=True, permissive=False):
                pass
    except Exception as e:
        mrc = _open_permissive(path, e)
        note = str(e)
        return (mrc, note) if with_note else mrc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mrc = mrcfile.mmap(path, mode="r", permissive=False)
    except Exception as e:
        msg = str(e)
        if "length" in msg or "bytes" in msg or "size" in msg:
            raise InputError(path, f"file is shorter than its header says (truncated?): {msg}",
                             field="data size") from e
        raise InputError(path, f"cannot read MRC data: {msg}", field="header") from e
    return (mrc, note) if with_note else mrc


def _open_permissive(path, strict_error):
    """The file whose header the strict reader refused, opened in permissive mode; a file whose data still cannot
    be read (random bytes, a truncated file, an unknown mode) gets the strict reader's one-line error."""
    problems = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mrc = mrcfile.mmap(path, mode="r", permissive=True)
        problems = [str(w.message) for w in caught]
    except Exception as e:
        raise InputError(path, f"bad MRC header: {strict_error}", field="header") from e
    data = mrc.data
    if data is None or data.ndim not in (2, 3) or data.size == 0:
        mrc.close()
        extra = [p for p in problems if p != str(strict_error)]
        detail = f" ({'; '.join(extra)})" if extra else ""
        raise InputError(path, f"bad MRC header: {strict_error}{detail}", field="header") from strict_error
    return mrc


def _stack_view(mrc, path):
    data = mrc.data
    if data is None:
        raise InputError(path, "MRC file has no data", field="data size")
    if np.iscomplexobj(data):
        raise InputError(path, f"complex MRC mode {int(mrc.header.mode)} is not supported", field="mode")
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise InputError(path, f"expected a 2D image or 3D stack, got {data.ndim} dimensions", field="nz")
    return data


def stack_info(path) -> tuple[int, int, int, float]:
    """(n_images, ny, nx, voxel_size_A) of an image stack (a 2D image counts as 1 image)."""
    return _stack_header(path)[:4]


def _stack_header(path) -> tuple[int, int, int, float, str | None]:
    """:func:`stack_info` plus the note of :func:`_open_mmap` (None for a standard header)."""
    path = os.fspath(path)
    mrc, note = _open_mmap(path, with_note=True)
    try:
        data = _stack_view(mrc, path)
        n, ny, nx = data.shape
        return int(n), int(ny), int(nx), float(mrc.voxel_size.x), note
    finally:
        mrc.close()


def read_images(path, indices, out=None) -> np.ndarray:
    """float32 array (len(indices), ny, nx) of the given 0-based slices, memory-mapped; into ``out`` when given
    (an array of that shape, e.g. a slice of a page-locked batch, or a function of the shape that makes one).
    Series of consecutive slices (a plan sorted by stack) are copied from the file's pages into the output in one
    pass each; other orders are gathered."""
    path = os.fspath(path)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    mrc = _open_mmap(path)
    try:
        data = _stack_view(mrc, path)
        n = data.shape[0]
        bad = (idx < 0) | (idx >= n)
        if bad.any():
            k = int(idx[np.argmax(bad)])
            raise InputError(path, f"image index {k + 1} is past the end of the stack ({n} images)",
                             field="rlnImageName")
        if out is None:
            out = np.empty((len(idx),) + data.shape[1:], dtype=np.float32)
        elif callable(out):
            out = out((len(idx),) + data.shape[1:])
        if out.shape != (len(idx),) + data.shape[1:]:
            raise InputError(path, f"images of {data.shape[2]} x {data.shape[1]} px where the batch holds "
                                   f"{out.shape[2]} x {out.shape[1]} px (stacks of one job share one box)",
                             field="nx")
        starts = np.flatnonzero(np.diff(idx, prepend=idx[:1] - 2) != 1)  # where a series of consecutive slices starts
        if len(starts) <= max(1, len(idx) // 8):
            ends = np.append(starts[1:], len(idx))
            for a, b in zip(starts, ends):
                out[a:b] = data[idx[a]:idx[a] + (b - a)]  # one pass: the file's pages -> out, as float32
        else:
            out[...] = data[idx]
    finally:
        mrc.close()
    # per image: a float64 sum is finite exactly when every pixel is (float32 values cannot overflow it)
    finite = np.isfinite(out.sum(axis=(1, 2), dtype=np.float64))
    if not finite.all():
        k = int(idx[np.argmax(~finite)])
        raise InputError(path, f"NaN or infinite pixel values in image {k + 1} (1-based)", field="data")
    return out


def check_stacks(star) -> None:
    """Cheap header-only checks of every stack a ParticleStar refers to. Stacks whose header is non-standard (no
    ``MAP `` id: read in permissive mode) or whose voxel size is 0 are accepted with one warning each kind (naming
    the first such file): the STAR file's pixel size is used, as always."""
    box = int(star.box[0])
    psize = float(star.pixel_size[0])
    stacks = np.asarray(star.stack)
    order = np.argsort(stacks, kind="stable")
    sorted_stacks = stacks[order]
    starts = np.flatnonzero(np.r_[True, sorted_stacks[1:] != sorted_stacks[:-1]])
    ends = np.r_[starts[1:], len(order)]
    nonstandard, no_voxel = [], []
    for s, e in zip(starts, ends):
        rows = order[s:e]
        stack = str(sorted_stacks[s])
        first_row = int(rows.min()) + 1
        if not os.path.isfile(stack):
            raise InputError(stack, f"stack file not found (referenced by row {first_row} of {star.path})",
                             field="rlnImageName")
        n, ny, nx, vs, note = _stack_header(stack)
        if note is not None:
            nonstandard.append((stack, note))
        elif not vs > 0:
            no_voxel.append(stack)
        worst = rows[np.argmax(star.index[rows])]
        kmax = int(star.index[worst])
        if kmax >= n:
            raise InputError(stack, f"row {int(worst) + 1} of {star.path} refers to image {kmax + 1}, "
                                    f"past the end of the stack ({n} images)", field="rlnImageName")
        if ny != box or nx != box:
            src = getattr(star, "box_source", "rlnImageSize")
            said = f"STAR file {star.path} says" if src == "rlnImageSize" else f"{src} (STAR file {star.path}) has"
            raise InputError(stack, f"{said} images of {box} x {box} pixels but the stack holds {nx} x {ny}",
                             field="rlnImageSize")
        if note is None and vs > 0 and abs(vs - psize) > 1e-3 * psize:
            raise InputError(stack, f"STAR file {star.path} says {psize:g} Å but the MRC header says {vs:g} Å",
                             field=getattr(star, "pixel_size_field", "rlnImagePixelSize"))
    if nonstandard:
        stack, note = nonstandard[0]
        more = f" (and {len(nonstandard) - 1} more stacks)" if len(nonstandard) > 1 else ""
        log.warning("%s%s: non-standard MRC header (%s); read in permissive mode, pixel size %g Å from %s",
                    stack, more, note, psize, star.path)
    if no_voxel:
        more = f" (and {len(no_voxel) - 1} more stacks)" if len(no_voxel) > 1 else ""
        log.warning("%s%s: the MRC header's voxel size is 0; pixel size %g Å from %s",
                    no_voxel[0], more, psize, star.path)


def read_map(path) -> tuple[np.ndarray, float]:
    """(float32 volume (z, y, x), voxel size in Å)."""
    path = os.fspath(path)
    mrc = _open_mmap(path)
    try:
        data = mrc.data
        if data is None or data.ndim != 3:
            raise InputError(path, f"expected a 3D map, got shape {None if data is None else data.shape}",
                             field="nz")
        if np.iscomplexobj(data):
            raise InputError(path, f"complex MRC mode {int(mrc.header.mode)} is not supported", field="mode")
        vol = np.array(data, dtype=np.float32)
        vs = float(mrc.voxel_size.x)
    finally:
        mrc.close()
    if not np.isfinite(vol).all():
        raise InputError(path, "NaN or infinite voxel values", field="data")
    return vol, vs


def _write_mrc(path, arr, voxel_size, stack: bool, stats=None):
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            if stats is not None:  # given: not computed from the data by set_data (~0.1 s of a 256^3 map's 0.12 s)
                mrc.update_header_stats = _no_stats
            mrc.set_data(arr)
            if stack:
                mrc.set_image_stack()
            else:
                mrc.set_volume()
            mrc.voxel_size = float(voxel_size)
            if stats is not None:
                h = mrc.header
                h.dmin, h.dmax, h.dmean, h.rms = (np.float32(x) for x in stats)


def _no_stats() -> None:
    """Stands in for an MrcFile's ``update_header_stats`` (which ``set_data`` calls) where the statistics are given."""


#: the first stage of :func:`map_statistics` reduces segments of at most this many voxels (the largest power of two
#: up to it that divides a map's voxel count: 512 for every box that is a multiple of 8), so that its kernels are the
#: same at every such box (a GPU reduction is compiled per block size, which follows the reduced length) and the
#: warm-up's box-48 jobs compile them for all
STAT_RUN = 512


def _stat_run(n: int) -> int:
    run = STAT_RUN
    while n % run:
        run //= 2
    return run


_SQUARE_SUM = None


def _square_sums(x3, xp):
    """Per row of ``x3`` (V, R, L) along its last axis, the sum of squares in double, without a full-size temporary
    (CuPy: one reduction kernel that squares in double as it reads)."""
    global _SQUARE_SUM
    if xp is np:
        return np.einsum("vrl,vrl->vr", x3, x3, dtype=np.float64)
    if _SQUARE_SUM is None:
        _SQUARE_SUM = xp.ReductionKernel("T x", "float64 y", "(double)x * (double)x", "a + b", "y = a", "0",
                                         "mpi_em_square_sum", reduce_type="double")
    return _SQUARE_SUM(x3, axis=2)


def map_statistics(maps):
    """(V, 4) float64 host array of each map's (min, max, mean, rms) as an MRC header holds them (rms: the standard
    deviation), from (V, ...) maps on their device. In two stages: the device reduces each map's segments of
    :data:`STAT_RUN` voxels (min, max, sum and sum of squares in double), the host the partial results (at box 256:
    4 x 32 768 per map). One reduction per map and statistic on the device gets as many GPU blocks as maps: on an
    H100 ~0.08 s (inferred) of a box-256 class3d's M-step of 0.33 s for four maps (the M-step's seconds against the
    tree before it, benchmarks/results/relion-side-by-side/h100-box256-class3d-to-the-end-2026-12-06/before-after/)."""
    from ..backend import to_host, xp_of

    xp = xp_of(maps)
    V = maps.shape[0]
    n = int(np.prod(maps.shape[1:]))
    x3 = maps.reshape(V, -1, _stat_run(n))
    lo = to_host(x3.min(axis=2)).min(axis=1)
    hi = to_host(x3.max(axis=2)).max(axis=1)
    s1 = to_host(x3.sum(axis=2, dtype=xp.float64)).sum(axis=1)
    s2 = to_host(_square_sums(x3, xp)).sum(axis=1)
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean * mean, 0.0))
    return np.stack([lo.astype(np.float64), hi.astype(np.float64), mean, std], axis=1)


def write_map(path, vol, voxel_size: float, stats=None) -> None:
    """Write a 3D float32 map atomically with the given voxel size (Å). ``stats``: its (min, max, mean, rms) for the
    header, where they are known (:func:`map_statistics` on a GPU rank); else mrcfile computes them from the data
    (~0.1 s of the ~0.12 s a 256^3 map takes on one core)."""
    vol = np.ascontiguousarray(vol, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"write_map needs a 3D array, got shape {vol.shape}")
    _write_mrc(os.fspath(path), vol, voxel_size, stack=False, stats=stats)


def write_stack(path, images, pixel_size: float) -> None:
    """Write an (n, ny, nx) float32 image stack (.mrcs) atomically."""
    images = np.ascontiguousarray(images, dtype=np.float32)
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3:
        raise ValueError(f"write_stack needs an (n, ny, nx) array, got shape {images.shape}")
    _write_mrc(os.fspath(path), images, pixel_size, stack=True)


# ----------------------------------------------------------------- HDF5

def write_hdf5(path, arrays: dict, attrs: dict | None = None) -> None:
    """Write a dict of arrays (keys may contain '/' for groups) and root attributes, atomically."""
    with atomic_path(os.fspath(path)) as tmp:
        with h5py.File(tmp, "w") as f:
            for key, value in arrays.items():
                value = np.asarray(value)
                if value.dtype.kind == "U":
                    value = value.astype(h5py.string_dtype())
                f.create_dataset(key, data=value)
            for key, value in (attrs or {}).items():
                f.attrs[key] = value


def read_hdf5(path) -> tuple[dict, dict]:
    """(dict of every dataset as a numpy array keyed by its full name, dict of root attributes)."""
    path = os.fspath(path)
    _check_exists(path)
    arrays = {}
    try:
        with h5py.File(path, "r") as f:
            def visit(name, obj):
                if isinstance(obj, h5py.Dataset):
                    if h5py.check_string_dtype(obj.dtype) is not None:
                        arrays[name] = obj.asstr()[()]
                        if isinstance(arrays[name], np.ndarray):
                            arrays[name] = arrays[name].astype(str)
                    else:
                        arrays[name] = obj[()]
            f.visititems(visit)
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    except OSError as e:
        raise InputError(path, f"not a readable HDF5 file: {e}", field="hdf5") from e
    return arrays, attrs
