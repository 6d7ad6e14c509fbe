"""Peak GPU memory of a program that a benchmark script starts: ``nvidia-smi``'s memory.used, sampled in a thread."""
from __future__ import annotations

import shutil
import subprocess
import threading


class GpuSampler:
    """Peak of `nvidia-smi --query-gpu=memory.used` (MiB, summed over the visible GPUs) every 0.5 s, minus the
    value before the run."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.peak = None
        self._stop = threading.Event()

    @staticmethod
    def used() -> float | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
            return float(sum(float(x) for x in out.split()))
        except (OSError, ValueError, subprocess.SubprocessError):
            return None

    def _loop(self):
        while not self._stop.is_set():
            u = self.used()
            if u is not None:
                self.peak = u if self.peak is None else max(self.peak, u)
            self._stop.wait(0.5)

    def __enter__(self):
        if self.enabled:
            self.base = self.used() or 0.0
            self._t = threading.Thread(target=self._loop, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._stop.set()
            self._t.join()

    @property
    def peak_mib(self):
        return None if (not self.enabled or self.peak is None) else max(0.0, self.peak - self.base)
