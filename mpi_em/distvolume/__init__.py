"""Stride-distributed Fourier volume: each rank holds only the kz planes it owns.

The all-reduce design keeps a full padded accumulator pair (F complex, W real, each (Np, Np, Np//2+1), FFT
layout [kz, ky, kx], see :mod:`mpi_em.fourier`) on every rank and sums it with ``Allreduce``. Here rank ``r``
of ``P`` owns the kz planes ``z = r, r + P, r + 2P, ...`` (:func:`owned_planes`; any P, a rank may own no
plane when P > Np), so a rank holds about 1/P of the volume:

- :func:`reduce_scatter_planes`: full local partial sums -> the summed planes a rank owns
  (``Reduce_scatter``, or compressed chunks through ``Alltoallv`` summed in rank order).
- :class:`PlaneOwnerAccumulator`: streaming insertion for a memory budget; each batch's stencil
  contributions travel to the owner of their kz plane (``Alltoallv``) and are scatter-added there, so no
  rank ever holds a full padded volume. **Collective per batch**: every rank must call :meth:`add`
  (or :meth:`add_empty`) the same number of times. :meth:`~PlaneOwnerAccumulator.backproject_points` routes the
  in-ball points instead (to the owners of the two planes each stencil touches; the EM jobs' owned accumulators).
- :func:`distributed_reconstruct`: Hermitian merge of the kx = 0 plane, regularised division and a
  distributed inverse real 3D FFT (one ``Alltoallv`` transpose from kz-plane to y-row ownership), then the
  cropped, gridding-corrected box^3 map is ``Allgatherv``-ed to every rank. Equal to
  :func:`mpi_em.fourier.reconstruct` applied to each volume of the summed full arrays, to float64 rounding.
- :func:`volume_bytes_per_rank`: the bytes each rank holds in either design (for benchmarks).

Modules: :mod:`.layout` (the decomposition), :mod:`.reduce` (reduce-scatter), :mod:`.accumulator` (streaming
insertion), :mod:`.reconstruct` (distributed reconstruction). The decomposition itself is one object, :class:`PlaneLayout` (built once per (Np, P) by :func:`plane_layout`):
the owner and local index of a plane, each rank's owned planes, counts and displacements, and the transpose of
the distributed FFT (:meth:`PlaneLayout.transpose`, one per (box, pad, r_max)). Every function here takes its
rank arithmetic from it.

NumPy and CuPy arrays share one code path (:func:`mpi_em.backend.xp_of`); MPI always moves host copies.
"""
from .accumulator import POINT_CHUNK, PlaneOwnerAccumulator  # noqa: F401 - POINT_CHUNK: the memory model's
from .layout import PlaneLayout, Transpose, _ball_index, _displs, owned_planes, plane_layout  # noqa: F401
from .reconstruct import distributed_reconstruct, volume_bytes_per_rank
from .reduce import reduce_scatter_planes

__all__ = [
    "PlaneLayout",
    "plane_layout",
    "owned_planes",
    "reduce_scatter_planes",
    "PlaneOwnerAccumulator",
    "distributed_reconstruct",
    "volume_bytes_per_rank",
]
