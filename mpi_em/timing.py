"""Per-phase wall-clock timers and operation counts (read, E-step passes, insertion, reduction, reconstruction).

A :class:`PhaseTimer` is passed down the data path; ``with timer("name"):`` adds the wall time of the block to
``timer.seconds[name]``. On the GPU the device is synchronised at the block's start and end, so the time belongs to
the phase that launched the work (a few synchronisations per batch). ``timer.flops[name]`` counts floating-point
operations where the phase is a matrix product (the E-step's GEMMs), for achieved-rate figures, and
``timer.bytes[name]`` bytes handed to collectives. ``timer.detail(name)`` times a step inside a phase only when
the timer was made with ``detail=True`` (benchmarks; kept apart in ``detail_seconds``, so phases still add up).
``step_sync=True`` (GPU ranks on the driver's stream-ordered pool, i.e. under a memory limit) synchronises the device
at the end of every such step without timing it: the driver's pool gives back the blocks freed on the stream only
at a synchronisation, so without them it held up to ~700 MiB more than the live arrays at box 512 (measured;
``benchmarks/results/refine3d-convergence/``), past the limit the E-step was sized to.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import numpy as np

from .backend import synchronize


class PhaseTimer:
    def __init__(self, xp=np, sync: bool = True, detail: bool = False, step_sync: bool = False):
        self.xp, self.sync, self.detailed = xp, sync, detail
        self.step_sync = bool(step_sync) and xp is not np
        self.seconds: dict[str, float] = defaultdict(float)
        self.detail_seconds: dict[str, float] = defaultdict(float)
        self.flops: dict[str, float] = defaultdict(float)
        self.bytes: dict[str, float] = defaultdict(float)
        self.pool_bytes: dict[str, int] = {}  # detail on GPU: the CuPy pool's reserved bytes at each phase's end
        self.live_peak_bytes: dict[str, int] = {}  # detail on GPU (CuPy's pool): the arrays' bytes at their peak
        self.live_end_bytes: dict[str, int] = {}  # detail on GPU: the arrays' bytes at each phase's end
        from .backend import allocator_in_use

        # CuPy's pool calls memory hooks; the driver's allocator (backend.allocator_choice) does not
        self._hook = _live_bytes_hook() if detail and xp is not np and allocator_in_use() != "async" else None

    @contextmanager
    def __call__(self, name: str):
        if self.sync:
            synchronize(self.xp)
        hook = self._hook
        outer_peak = None
        if hook is not None:  # the phase's own peak; an enclosing phase keeps the larger of both
            outer_peak, hook.peak = hook.peak, hook.live
        t = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                synchronize(self.xp)
            self.seconds[name] += time.perf_counter() - t
            if self.detailed and self.xp is not np:
                from .backend import memory_pool

                # reserved memory only grows inside a phase (unless the phase frees the pool's blocks): its value
                # at the end is the phase's high-water mark of the pool, what nvidia-smi sees
                pool = memory_pool(self.xp)
                self.pool_bytes[name] = max(self.pool_bytes.get(name, 0), int(pool.total_bytes()))
                self.live_end_bytes[name] = max(self.live_end_bytes.get(name, 0), int(pool.used_bytes()))
            if hook is not None:
                self.live_peak_bytes[name] = max(self.live_peak_bytes.get(name, 0), hook.peak)
                hook.peak = max(outer_peak, hook.peak)

    @contextmanager
    def detail(self, name: str):
        if not self.detailed:
            yield
            if self.step_sync:
                synchronize(self.xp)
            return
        synchronize(self.xp)
        t = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.xp)
            self.detail_seconds[name] += time.perf_counter() - t

    def add_flops(self, name: str, n: float) -> None:
        self.flops[name] += float(n)

    def add_bytes(self, name: str, n: float) -> None:
        self.bytes[name] += float(n)

    def as_dict(self) -> dict:
        out = {"seconds": dict(self.seconds), "flops": dict(self.flops), "bytes": dict(self.bytes)}
        if self.detailed:
            out["detail_seconds"] = dict(self.detail_seconds)
            if self.pool_bytes:
                out["pool_bytes"] = dict(self.pool_bytes)
                out["live_end_bytes"] = dict(self.live_end_bytes)
            if self.live_peak_bytes:
                out["live_peak_bytes"] = dict(self.live_peak_bytes)
        return out


_HOOK = None


def _live_bytes_hook():
    """One CuPy memory hook per process, entered for good, counting the bytes of the arrays alive (``live``) and
    their peak since it was last reset (``peak``): what the job needs, beside what the pool keeps reserved. Only
    CuPy's own pool calls hooks (not the driver's, :func:`mpi_em.backend.allocator_choice`)."""
    global _HOOK
    if _HOOK is None:
        from cupy.cuda import memory_hook  # type: ignore

        class LiveBytes(memory_hook.MemoryHook):
            name = "mpi_em_live_bytes"

            def __init__(self):
                self.live = self.peak = 0

            def malloc_postprocess(self, device_id, size, mem_size, mem_ptr, pmem_id):
                self.live += mem_size
                self.peak = max(self.peak, self.live)

            def free_postprocess(self, device_id, mem_size, mem_ptr, pmem_id):
                self.live -= mem_size

        _HOOK = LiveBytes()
        _HOOK.__enter__()
    return _HOOK


class _Null:
    """Timer that does nothing (default)."""

    @contextmanager
    def __call__(self, name: str):
        yield

    detail = __call__

    def add_flops(self, name: str, n: float) -> None:
        pass

    def add_bytes(self, name: str, n: float) -> None:
        pass


NULL_TIMER = _Null()
