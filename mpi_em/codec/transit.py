"""Holding and sending compressed buffers: :class:`CompressedBuffer` (a buffer kept compressed between steps), the
uint8 form for mpi4py messages, and the ratio / throughput measurement of the codec."""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..backend import is_gpu_array, synchronize, to_host, xp_of
from .format import blob_info, compress, decompress
from .halfball import _words, halfball_count


class CompressedBuffer:
    """A volume-sized buffer held compressed in memory between steps."""

    __slots__ = ("blob", "shape", "dtype", "r_max")

    def __init__(self, blob: bytes):
        info = blob_info(blob)
        self.blob = bytes(blob)
        self.shape = info["shape"]
        self.dtype = info["dtype"]
        self.r_max = info["r_max"]

    @classmethod
    def from_array(cls, a, r_max=None, level: int = 3, **kw) -> "CompressedBuffer":
        return cls(compress(a, r_max, level, **kw))

    def to_array(self, xp=np):
        return decompress(self.blob, xp=xp)

    @property
    def nbytes(self) -> int:
        """Compressed size (bytes held)."""
        return len(self.blob)

    @property
    def nbytes_raw(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def ratio(self) -> float:
        return self.nbytes_raw / max(self.nbytes, 1)

    def __repr__(self) -> str:
        return (f"CompressedBuffer(shape={self.shape}, dtype={self.dtype}, r_max={self.r_max}, "
                f"{self.nbytes} B of {self.nbytes_raw} B, ratio {self.ratio:.2f})")


def compress_for_send(buf, r_max=None, level: int = 3, **kw) -> np.ndarray:
    """:func:`compress` as a 1-D uint8 NumPy array (read-only view of the bytes) for ``comm.Send``.

    The receiver learns the size with ``MPI.Status.Get_count(MPI.BYTE)`` (after ``Probe``), receives
    into a uint8 array of that size and calls :func:`decompress_received`.
    """
    return np.frombuffer(compress(buf, r_max, level, **kw), dtype=np.uint8)


def decompress_received(arr, xp=np):
    """Inverse of :func:`compress_for_send` for a received uint8 array (exactly the message bytes)."""
    arr = np.ascontiguousarray(to_host(arr)).reshape(-1)
    if arr.dtype != np.uint8:
        arr = arr.view(np.uint8)
    return decompress(memoryview(arr), xp=xp)


def measure(buf, r_max=None, repeats: int = 3, level: int = 3, threads: int = 0) -> dict[str, Any]:
    """Ratio and throughput (MB/s of raw full-array bytes, best of ``repeats``) of compress/decompress.

    Also verifies the round trip is bit-exact (``exact``).
    """
    xp = xp_of(buf)
    nbytes_raw = int(buf.nbytes)
    nbytes_packed = (nbytes_raw if r_max is None
                     else int(np.prod(buf.shape[:-3], dtype=np.int64)) * halfball_count(buf.shape[-3:], r_max)
                     * buf.dtype.itemsize)
    t_c = t_d = float("inf")
    blob = out = None
    for _ in range(max(1, repeats)):
        synchronize(xp)
        t0 = time.perf_counter()
        blob = compress(buf, r_max, level, threads=threads)
        t_c = min(t_c, time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = decompress(blob, xp=xp)
        synchronize(xp)
        t_d = min(t_d, time.perf_counter() - t0)
    a = xp.ascontiguousarray(buf)
    exact = bool(out.shape == a.shape and out.dtype == a.dtype
                 and (_words(out) == _words(a)).all())
    mb = nbytes_raw / 1e6
    return {
        "ratio": nbytes_raw / len(blob),
        "compress_MBps": mb / t_c if t_c > 0 else float("inf"),
        "decompress_MBps": mb / t_d if t_d > 0 else float("inf"),
        "nbytes_raw": nbytes_raw,
        "nbytes_packed": nbytes_packed,
        "nbytes_compressed": len(blob),
        "exact": exact,
        "gpu": is_gpu_array(buf),
    }
