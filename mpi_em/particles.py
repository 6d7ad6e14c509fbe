"""A rank's particles: batches read from their stacks (memory-mapped), with the next batch prefetched."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import config
from .io import read_images


def _pinned_alloc():
    """An allocator of page-locked host arrays (CuPy's pinned pool: host-to-device copies at DMA speed) that
    works from the reading threads: each call first makes this rank's GPU current in the calling thread, so no
    thread touches (and creates a context on) another rank's GPU."""
    import cupy  # type: ignore
    import cupyx  # type: ignore

    dev = cupy.cuda.runtime.getDevice()

    def alloc(shape, dtype):
        cupy.cuda.Device(dev).use()
        return cupyx.empty_pinned(shape, dtype=dtype)

    return alloc


def pinned_wanted(xp) -> bool:
    """Read batches into page-locked memory for GPU ranks (MPI_EM_PINNED=0 turns it off)."""
    return xp is not np and config.pinned()


def read_rows(stacks, indices, alloc=np.empty) -> np.ndarray:
    """Images for parallel arrays of stack paths and 0-based slices, in that order (one read per stack run);
    ``alloc(shape, dtype)`` makes the output (e.g. page-locked memory for GPU ranks)."""
    stacks = np.asarray(stacks)
    indices = np.asarray(indices)
    if len(stacks) == 0:
        return np.zeros((0, 0, 0), np.float32)
    # consecutive rows of the same stack (plans are sorted by stack, so this is one block per stack), each read
    # straight into its rows of the output, which the first block's reading makes (its stack's image size)
    change = np.flatnonzero(stacks[1:] != stacks[:-1]) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(stacks)]])
    out = None

    def batch(shape):
        nonlocal out
        out = alloc((len(stacks),) + tuple(shape[1:]), dtype=np.float32)
        return out[:shape[0]]

    for s, e in zip(starts, ends):
        read_images(stacks[s], indices[s:e], out=batch if out is None else out[s:e])
    return out


def iter_batches(plan: dict, batch_size: int, prefetch: bool = True, depth: int = 2, pinned: bool = False):
    """Yield (slice into the plan, images (b, N, N) float32) over a rank's plan; reads overlap compute.

    With ``prefetch``, ``depth`` batches are read ahead by as many threads (reading is I/O and memory copies,
    which release the GIL), so a GPU that consumes a batch faster than one thread reads it still waits less.
    ``pinned``: batches in page-locked host memory (GPU ranks; see :func:`pinned_wanted`).
    """
    n = len(plan["index"])
    slices = [slice(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]
    if not slices:
        return
    alloc = _pinned_alloc() if pinned else np.empty
    load = lambda sl: read_rows(plan["stack"][sl], plan["index"][sl], alloc)  # noqa: E731
    if not prefetch or len(slices) == 1:
        for sl in slices:
            yield sl, load(sl)
        return
    depth = max(1, min(depth, len(slices)))
    with ThreadPoolExecutor(max_workers=depth) as pool:
        futs = [pool.submit(load, sl) for sl in slices[:depth]]
        for i, sl in enumerate(slices):
            imgs = futs[i].result()
            futs[i] = None
            if i + depth < len(slices):
                futs.append(pool.submit(load, slices[i + depth]))
            yield sl, imgs


class ImageCache:
    """A rank's images kept in its array module's memory between passes over the same plan (EM jobs read every
    particle every iteration): the first complete pass reads from disk as :func:`iter_batches` does and keeps
    each batch; later passes yield the kept batches (no disk read, no host-to-device copy). Batches are yielded on
    ``xp`` either way. ``enabled`` False: every pass reads from disk."""

    def __init__(self, xp, enabled: bool):
        self.xp, self.enabled = xp, bool(enabled)
        self._items = None

    @property
    def full(self) -> bool:
        return self._items is not None

    def batches(self, plan: dict, batch_size: int, pinned: bool = False):
        if self._items is not None:
            yield from self._items
            return
        items = [] if self.enabled else None
        for sl, imgs in iter_batches(plan, batch_size, pinned=pinned):
            imgs = self.xp.asarray(imgs)
            if items is not None:
                items.append((sl, imgs))
            yield sl, imgs
        if items is not None:
            self._items = items  # only a complete pass is kept


class RowCache:
    """A rank's images kept in its array module's memory by their position in the rank's plan, for a job that
    reads subsets of the plan in any order (initial-model's random mini-batches): the first batches asked for
    read the whole plan once (as :func:`iter_batches` reads it, batch after batch) into one (n, N, N) float32
    array, and every batch of any subset is then gathered from it (no file opened, no host-to-device copy).
    ``enabled`` False: every batch is read from its stacks."""

    def __init__(self, xp, enabled: bool, plan: dict):
        self.xp, self.enabled = xp, bool(enabled)
        self._plan = {k: plan[k] for k in ("stack", "index", "row")}  # the images' sources: fixed for a job
        rows = np.asarray(plan["row"], dtype=np.int64)
        self._pos = np.full(int(rows.max()) + 1 if rows.size else 0, -1, dtype=np.int64)
        self._pos[rows] = np.arange(rows.size)
        self._images = None

    def _fill(self, batch_size: int, pinned: bool):
        out = None
        for sl, imgs in iter_batches(self._plan, batch_size, pinned=pinned):
            if out is None:
                out = self.xp.empty((len(self._plan["index"]),) + tuple(imgs.shape[1:]), dtype=self.xp.float32)
            out[sl] = self.xp.asarray(imgs)
        self._images = out

    def batches(self, sub: dict, batch_size: int, pinned: bool = False):
        """(slice into ``sub``, images (b, N, N) on the array module) over ``sub``, a subset of the plan's rows."""
        if not self.enabled:
            for sl, imgs in iter_batches(sub, batch_size, pinned=pinned):
                yield sl, self.xp.asarray(imgs)
            return
        pos = self._pos[np.asarray(sub["row"], dtype=np.int64)]
        if len(pos) == 0:
            return
        if self._images is None:
            self._fill(batch_size, pinned)
        for s in range(0, len(pos), batch_size):
            sl = slice(s, min(len(pos), s + batch_size))
            yield sl, self._images[self.xp.asarray(pos[sl])]


def cache_wanted(mode: str, xp, n_images: int, box: int, fraction: float = 0.25) -> bool:
    """``--cache-images``: 'on', 'off', or 'auto' = on GPU ranks whose images (float32) fit in ``fraction`` of the
    device's free memory (the E-step's working arrays need the rest); CPU ranks read through the page cache."""
    if mode in ("on", "off"):
        return mode == "on"
    if xp is np:
        return False
    import cupy  # type: ignore

    free, _ = cupy.cuda.runtime.memGetInfo()
    return 4.0 * n_images * box * box <= fraction * free
