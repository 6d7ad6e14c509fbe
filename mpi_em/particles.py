"""A rank's particles: batches read from their stacks (memory-mapped), with the next batch prefetched."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .io import read_images


def read_rows(stacks, indices) -> np.ndarray:
    """Images for parallel arrays of stack paths and 0-based slices, in that order (one read per stack run)."""
    stacks = np.asarray(stacks)
    indices = np.asarray(indices)
    out = None
    # consecutive runs of the same stack (plans are sorted by stack, so this is one run per stack)
    change = np.flatnonzero(stacks[1:] != stacks[:-1]) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(stacks)]])
    for s, e in zip(starts, ends):
        imgs = read_images(stacks[s], indices[s:e])
        if out is None:
            out = np.empty((len(stacks),) + imgs.shape[1:], dtype=np.float32)
        out[s:e] = imgs
    return out if out is not None else np.zeros((0, 0, 0), np.float32)


def iter_batches(plan: dict, batch_size: int, prefetch: bool = True, depth: int = 2):
    """Yield (slice into the plan, images (b, N, N) float32) over a rank's plan; reads overlap compute.

    With ``prefetch``, ``depth`` batches are read ahead by as many threads (reading is I/O and memory copies,
    which release the GIL), so a GPU that consumes a batch faster than one thread reads it still waits less.
    """
    n = len(plan["index"])
    slices = [slice(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]
    if not slices:
        return
    load = lambda sl: read_rows(plan["stack"][sl], plan["index"][sl])  # noqa: E731
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
