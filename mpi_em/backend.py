"""The one array-module switch: NumPy on CPU ranks, CuPy on GPU ranks.

Every numerical module receives arrays and asks :func:`xp_of` which module they belong to, so there is a
single code path. Only the few operations whose spelling differs between NumPy and CuPy live here
(scatter-add, device placement, host copies).
"""
from __future__ import annotations

import numpy as np

from . import config

try:  # CuPy is an optional extra ("gpu"); its absence is the normal CPU case.
    import cupy as _cp  # type: ignore

    try:
        _HAVE_GPU = _cp.cuda.runtime.getDeviceCount() > 0
    except Exception:  # driver missing or no device
        _HAVE_GPU = False
except Exception:  # pragma: no cover - depends on the machine
    _cp = None
    _HAVE_GPU = False


def gpu_available() -> bool:
    return _HAVE_GPU


def get_xp(device: str = "cpu"):
    """Array module for a device name: 'cpu' -> numpy, 'gpu' / 'cuda' / 'cuda:N' -> cupy."""
    if device in (None, "cpu"):
        return np
    if not _HAVE_GPU:
        raise RuntimeError(f"device {device!r} asked for, but CuPy with a CUDA device is not available")
    if ":" in device:
        _cp.cuda.Device(int(device.split(":", 1)[1])).use()
    _use_allocator()
    return _cp


_ASYNC_POOLS: dict = {}
_IN_USE: dict = {}        # device id -> 'async' or 'pool': the allocator set on it
_LIMITED = False          # the job has a memory limit (--max-memory): set_memory_limited


def set_memory_limited(limited: bool) -> None:
    """Whether the job has a memory limit (``--max-memory``; :func:`mpi_em.cli.main` sets it from the options).
    Under ``MPI_EM_GPU_ALLOCATOR=auto`` (the default) GPU ranks then allocate from the CUDA driver's pool
    (:func:`allocator_choice`)."""
    global _LIMITED
    _LIMITED = bool(limited)


def memory_limited() -> bool:
    """Whether the job has a memory limit (:func:`set_memory_limited`)."""
    return _LIMITED


def allocator_choice(setting: str, limited: bool) -> str:
    """The GPU allocator for ``MPI_EM_GPU_ALLOCATOR`` = ``setting``: 'pool' and 'async' as given; 'auto': 'async'
    (the driver's stream-ordered pool, whose reserve follows the live arrays) for a job with a memory limit, else
    'pool' (CuPy's, which keeps freed blocks: at box 512 its reserve was 3.2 GiB over the live arrays in the
    M-step, 23.38 against 21.79 GiB on the device: benchmarks/results/memory/large-box-remeasured-h200-2026-12-02/)."""
    if setting in ("pool", "async"):
        return setting
    return "async" if limited else "pool"


def _use_allocator() -> None:
    """Set the current device's allocator (:func:`allocator_choice`): the driver's stream-ordered pool
    (cudaMallocAsync) or CuPy's own pool, whose freed blocks split for small arrays can keep large ones reserved
    (:func:`memory_pool` is the pool in use either way). A device without the driver's pool keeps CuPy's."""
    if config.timing_detail():  # the arrays' live bytes counted from the first allocation on
        from .timing import _live_bytes_hook

        _live_bytes_hook()
    dev = _cp.cuda.Device().id
    want = allocator_choice(config.gpu_allocator(), _LIMITED)
    if want == _IN_USE.get(dev, "pool"):
        return
    if want == "async":
        try:
            if dev not in _ASYNC_POOLS:
                _ASYNC_POOLS[dev] = _cp.cuda.MemoryAsyncPool()
            _cp.cuda.set_allocator(_ASYNC_POOLS[dev].malloc)
        except Exception as e:  # noqa: BLE001 - an old driver or device: CuPy's pool instead
            import logging

            logging.getLogger("mpi_em").warning("GPU %d: the driver's stream-ordered allocator is not available "
                                                "(%s): CuPy's memory pool instead", dev, e)
            return
    else:
        _cp.cuda.set_allocator(_cp.get_default_memory_pool().malloc)
    _IN_USE[dev] = want


def allocator_in_use() -> str | None:
    """'async' or 'pool' on the current GPU, None without CuPy."""
    if _cp is None:
        return None
    return _IN_USE.get(_cp.cuda.Device().id, "pool")


def memory_pool(xp=None):
    """The CuPy memory pool GPU arrays come from on the current device (its ``total_bytes``, ``used_bytes``,
    ``free_bytes``, ``free_all_blocks``); None on CPU ranks or without CuPy."""
    if _cp is None or xp is np:
        return None
    if allocator_in_use() == "async":
        return _ASYNC_POOLS[_cp.cuda.Device().id]
    return _cp.get_default_memory_pool()


def default_device() -> str:
    """'gpu' when CuPy sees a device and MPI_EM_DEVICE does not say 'cpu'."""
    want = config.device()
    if want == "cpu":
        return "cpu"
    if want != "auto":
        return want
    return "gpu" if _HAVE_GPU else "cpu"


def xp_of(*arrays):
    """The array module (numpy or cupy) that owns these arrays. Not ``cupy.get_array_module``: its first call
    imports cupyx.scipy and SciPy (tens of MB and ~1 s of a CPU rank's start, for sparse matrices we never use)."""
    if _cp is not None and any(isinstance(a, _cp.ndarray) for a in arrays):
        return _cp
    return np


def is_gpu_array(a) -> bool:
    return _cp is not None and isinstance(a, _cp.ndarray)


def to_host(a):
    """A NumPy copy (or the array itself if already on the host)."""
    if is_gpu_array(a):
        return a.get()
    return np.asarray(a)


def synchronize(xp) -> None:
    if xp is not np and _cp is not None:
        _cp.cuda.get_current_stream().synchronize()


def scatter_add(target, index, values) -> None:
    """target.ravel()[index] += values, with repeated indices summed (in place, real or complex).

    NumPy: ``np.add.at`` (in place; since NumPy 1.25 2.6x faster than a bincount over the whole target for real
    values and 7x for complex ones, 25M random indices into 17M voxels, without the bincount's target-sized
    temporaries), each addition rounded to the target's precision as the GPU's atomics; CuPy: ``cupy.add.at``
    (atomic adds; it takes no complex arrays, so a complex target is added to as its interleaved real and imaginary
    parts; the same sums and speed as the deprecated ``cupyx.scatter_add``, float32 and float64, 25M random indices
    into 17M elements on an H200: ~0.9 and ~1.3 ms per call for either). ``target`` must be C-contiguous.
    """
    xp = xp_of(target)
    flat = target.reshape(-1)
    index = index.reshape(-1)
    values = values.reshape(-1)
    if xp is not np and xp.iscomplexobj(flat):  # cupy.add.at takes no complex arrays
        real_view = flat.view(flat.real.dtype)  # interleaved re, im
        xp.add.at(real_view, 2 * index, values.real.astype(real_view.dtype, copy=False))
        xp.add.at(real_view, 2 * index + 1, values.imag.astype(real_view.dtype, copy=False))
    else:
        xp.add.at(flat, index, values.astype(flat.dtype, copy=False))
