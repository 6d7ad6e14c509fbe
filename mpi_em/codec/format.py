"""The blob format: a self-describing header (magic, version, dtype, shape, r_max, packed flag, shuffle unit, payload
size) followed by the zstd frame of the (optionally half-ball packed) byte-shuffled payload."""
from __future__ import annotations

import struct
from typing import Any

import numpy as np
import zstandard

from ..backend import to_host, xp_of
from .halfball import _outside_nonzero, _split, pack, unpack

MAGIC = b"MEZC"
FORMAT_VERSION = 1
_FLAG_PACKED = 1
_FLAG_SHUFFLED = 2
# magic, version, flags, shuffle unit, ndim, len(dtype str), r_max, payload nbytes
_HEAD = struct.Struct("<4sBBBBBdQ")
_ALLOWED_KINDS = "biufc"


def _check_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.kind not in _ALLOWED_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise TypeError(f"codec supports bool/int/uint/float/complex arrays, not {dtype}")
    return dtype


def _shuffle_unit(dtype: np.dtype) -> int:
    """Size of the scalars whose bytes are grouped: the real component for complex dtypes."""
    return dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize


def _shuffle(a, unit: int):
    """Bytes of contiguous ``a`` reordered: byte 0 of every scalar, then byte 1, ... (same module)."""
    xp = xp_of(a)
    b = a.reshape(-1).view(xp.uint8)
    if unit <= 1 or b.size == 0:
        return b
    return xp.ascontiguousarray(b.reshape(-1, unit).T).reshape(-1)


def _unshuffle(b, unit: int):
    xp = xp_of(b)
    if unit <= 1 or b.size == 0:
        return b
    return xp.ascontiguousarray(b.reshape(unit, -1).T).reshape(-1)


def compress(buf, r_max=None, level: int = 3, *, threads: int = 0, check: bool = True, shuffle: bool = True) -> bytes:
    """Losslessly compress an array (NumPy or CuPy) to self-describing ``bytes``.

    ``r_max``: keep only the half-ball of radius r_max of the last three axes (FFT layout); every
    voxel outside must be all-zero bits, else ``ValueError`` (``check=False`` skips that test and
    silently drops the outside voxels). ``level``: zstd level. ``threads``: zstd worker threads
    (0 = none, -1 = one per core).
    """
    xp = xp_of(buf)
    dtype = _check_dtype(buf.dtype)
    buf = xp.ascontiguousarray(buf)
    shape = tuple(int(n) for n in buf.shape)
    flags = 0
    if r_max is not None:
        r_max = float(r_max)
        if not r_max >= 0:  # also rejects NaN; -1 is the header's "no r_max"
            raise ValueError(f"r_max must be a number >= 0 (or +inf), got {r_max}")
        _split(shape)
        if check and _outside_nonzero(buf, r_max):
            raise ValueError(
                f"compress(r_max={r_max}): array of shape {shape} has non-zero data outside the half-ball; "
                "compressing it would lose data (pass check=False to drop it on purpose)"
            )
        payload = pack(buf, r_max)
        flags |= _FLAG_PACKED
    else:
        payload = buf
    unit = _shuffle_unit(dtype) if shuffle else 1
    if unit > 1:
        flags |= _FLAG_SHUFFLED
    raw = _shuffle(payload, unit)
    raw = to_host(raw)
    dstr = dtype.str.encode("ascii")
    header = _HEAD.pack(MAGIC, FORMAT_VERSION, flags, unit, len(shape), len(dstr),
                        -1.0 if r_max is None else r_max, raw.nbytes)
    header += dstr + struct.pack(f"<{len(shape)}q", *shape)
    cctx = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True, write_content_size=True)
    return header + cctx.compress(memoryview(raw))


def _parse(blob) -> tuple[dict[str, Any], int]:
    mv = memoryview(blob).cast("B")
    if mv.nbytes < _HEAD.size:
        raise ValueError("not an mpi_em codec blob (too short)")
    magic, version, flags, unit, ndim, dlen, r_max, payload_nbytes = _HEAD.unpack_from(mv, 0)
    if magic != MAGIC:
        raise ValueError(f"not an mpi_em codec blob (magic {bytes(magic)!r})")
    if version != FORMAT_VERSION:
        raise ValueError(f"codec blob version {version} is not supported (this is version {FORMAT_VERSION})")
    off = _HEAD.size
    dtype = _check_dtype(bytes(mv[off:off + dlen]).decode("ascii"))
    off += dlen
    shape = struct.unpack_from(f"<{ndim}q", mv, off)
    off += 8 * ndim
    info = {
        "dtype": dtype,
        "shape": tuple(shape),
        "r_max": None if r_max < 0 else r_max,
        "packed": bool(flags & _FLAG_PACKED),
        "shuffle_unit": unit if flags & _FLAG_SHUFFLED else 1,
        "nbytes_payload": int(payload_nbytes),
        "nbytes_raw": int(np.prod(shape, dtype=np.int64)) * dtype.itemsize,
        "nbytes_compressed": mv.nbytes,
    }
    return info, off


def blob_info(blob) -> dict[str, Any]:
    """Header of a blob: dtype, shape, r_max (None if not packed), packed, sizes."""
    return _parse(blob)[0]


def decompress(blob, xp=np):
    """The array that :func:`compress` compressed, bit-exact; ``xp=cupy`` returns a device array."""
    info, off = _parse(blob)
    mv = memoryview(blob).cast("B")[off:]
    raw = zstandard.ZstdDecompressor().decompress(mv, max_output_size=max(info["nbytes_payload"], 1))
    if len(raw) != info["nbytes_payload"]:
        raise ValueError(f"corrupt blob: {len(raw)} payload bytes, header says {info['nbytes_payload']}")
    b = np.frombuffer(raw, dtype=np.uint8)
    if xp is not np:
        b = xp.asarray(b)
    b = _unshuffle(b, info["shuffle_unit"])
    dtype, shape = info["dtype"], info["shape"]
    if info["packed"]:
        lead, _ = _split(shape)
        packed = b.view(dtype).reshape(lead + (-1,))
        return unpack(packed, shape, info["r_max"], dtype)
    out = b.view(dtype).reshape(shape)
    if xp is np and not out.flags.writeable:
        out = out.copy()  # unshuffle of a 1-byte unit returns the read-only bytes buffer
    return out
