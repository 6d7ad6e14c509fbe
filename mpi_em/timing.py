"""Per-phase wall-clock timers and operation counts (read, E-step passes, insertion, reduction, reconstruction).

A :class:`PhaseTimer` is passed down the data path; ``with timer("name"):`` adds the wall time of the block to
``timer.seconds[name]``. On the GPU the device is synchronised at the block's start and end, so the time belongs to
the phase that launched the work (a few synchronisations per batch). ``timer.flops[name]`` counts floating-point
operations where the phase is a matrix product (the E-step's GEMMs), for achieved-rate figures, and
``timer.bytes[name]`` bytes handed to collectives.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import numpy as np

from .backend import synchronize


class PhaseTimer:
    def __init__(self, xp=np, sync: bool = True):
        self.xp, self.sync = xp, sync
        self.seconds: dict[str, float] = defaultdict(float)
        self.flops: dict[str, float] = defaultdict(float)
        self.bytes: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str):
        if self.sync:
            synchronize(self.xp)
        t = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                synchronize(self.xp)
            self.seconds[name] += time.perf_counter() - t

    def add_flops(self, name: str, n: float) -> None:
        self.flops[name] += float(n)

    def add_bytes(self, name: str, n: float) -> None:
        self.bytes[name] += float(n)

    def as_dict(self) -> dict:
        return {"seconds": dict(self.seconds), "flops": dict(self.flops), "bytes": dict(self.bytes)}


class _Null:
    """Timer that does nothing (default)."""

    @contextmanager
    def __call__(self, name: str):
        yield

    def add_flops(self, name: str, n: float) -> None:
        pass

    def add_bytes(self, name: str, n: float) -> None:
        pass


NULL_TIMER = _Null()
