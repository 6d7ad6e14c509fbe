"""Lossless compression of Fourier accumulators (half-ball packing + byte shuffle + zstd).

Fourier accumulators live in "FFT layout": arrays of shape ``(..., Nz, Ny, Nx_half)`` indexed
``[z, y, x]``, where z and y are wrapped FFT frequencies (index ``i`` is frequency ``i`` if
``i < N/2`` else ``i - N``) and ``x = 0 .. Nx_half - 1`` (the ``numpy.fft.rfftn`` layout). Only the
voxels with radius ``sqrt(kz² + ky² + kx²) <= r_max`` carry data (a half-ball); leading axes
(classes, half-sets) are kept as they are.

Three levels of use:

* :func:`pack` / :func:`unpack` — in-memory r_max compression: the in-ball voxels as one contiguous
  array (same dtype), and back to the full array with zeros outside.
* :func:`compress` / :func:`decompress` — bytes. ``compress`` returns plain ``bytes`` (chosen over a
  dataclass so that the result can be written to a file or sent through MPI as it is); the blob is
  self-describing (header: magic, version, dtype, shape, r_max, packed flag, shuffle unit, payload
  size), :func:`blob_info` reads the header. Steps: optional half-ball pack, byte view, byte shuffle
  (all first bytes of the scalars together, then all second bytes, ...; complex values are shuffled
  per real component), zstd (single thread by default, with a content checksum).
  Round trips are bit-exact for any dtype of kind b/i/u/f/c (NaN payloads, -0.0, inf, denormals):
  the data are only ever moved as unsigned-integer words, never as floats.
  With ``r_max`` given, ``compress`` verifies that every voxel outside the ball has all-zero bits
  (so -0.0 outside counts as data) and raises ``ValueError`` otherwise, unless ``check=False``
  (then the outside voxels are dropped: a deliberate, lossy use).
* :class:`CompressedBuffer`, :func:`compress_for_send` / :func:`decompress_received` — holding a
  buffer compressed between steps, and sending one through mpi4py as a uint8 buffer.

CuPy arrays are accepted everywhere: the check, the packing and the shuffle execute on the device with
the array's own module, only the packed, shuffled bytes go to the host for zstd;
``decompress(blob, xp=cupy)`` unshuffles and unpacks on the device.

Modules: :mod:`.halfball` (geometry, pack / unpack), :mod:`.format` (the blob: compress / decompress),
:mod:`.transit` (held and sent buffers, measurement).
"""
from __future__ import annotations

from .format import FORMAT_VERSION, MAGIC, blob_info, compress, decompress
from .halfball import halfball_count, halfball_index, halfball_mask, pack, unpack
from .transit import CompressedBuffer, compress_for_send, decompress_received, measure

__all__ = [
    "halfball_mask",
    "halfball_index",
    "halfball_count",
    "pack",
    "unpack",
    "compress",
    "decompress",
    "blob_info",
    "CompressedBuffer",
    "compress_for_send",
    "decompress_received",
    "measure",
    "MAGIC",
    "FORMAT_VERSION",
]
