"""Memory model of a rank: what each job holds, in bytes, known before the first iteration.

Derived from how the jobs allocate (figures per rank; ``vox`` = Np^2 (Np/2 + 1) voxels of one padded half
volume, Np = pad x box; ``m`` = the in-ball points of an image, |k| <= r; ``n`` = particles per batch):

- **references** (EM jobs): one complex128 Fourier volume per reference (:class:`mpi_em.em.references.References`,
  ``volume_fft`` of the float32 maps divided by the float64 gridding factor): 16 vox bytes each, 2 x folds
  (refine3d) or K (class3d); class2d: K planes of Np (Np/2 + 1). Every rank holds all of them during the
  E-step, which gives them back when it ends (:func:`mpi_em.em.engine.end_e_step`).
- **accumulators**: F complex128 + W float64 per volume, 24 vox bytes (``--accumulate single``: complex64 +
  float32, 12 vox bytes, and the 3D references complex64, 8 vox bytes), 2 x folds (refine3d), K (class*), 2
  (reconstruct); the EM jobs' E-step inserts into full local partial sums on every rank
  (:func:`mpi_em.em.model.e_step_accumulators`), which stay allocated through the M-step, or, with owned
  accumulators (``--owned-accumulators``), into the rank's kz planes only: 24 vox / P bytes per volume.
- **cached images** (``--cache-images``): 4 box^2 bytes per particle of the rank.
- **batch workspace**: images read ahead (3 batches, float32), in-ball FFTs and CTFs (12 n m), the coarse pass
  (global grid: shifted images 8 n T m, the projections of the grid kept per reference set 12 K C m as
  float32 GEMM operands, written a chunk of orientations at a time (``em.search.grid_operands``: 2^21 (CPU) or
  2^25 (GPU) points per class, 12 bytes per point of the chunk on GPUs), likelihood chunks of at most 2^24
  (CPU) or 2^31 (GPU) float32 elements and their marginal's temporaries; local searches: 48 n K L m), the fine pass (16 n S m
  over the S = 8 x selected poses, 48 n S m) and the insertion (48 n S m), and on CPU ranks the NumPy stencils of the
  projector and back-projector (``PROJECT_BYTES_PER_POINT``, ``INSERT_BYTES_PER_CORNER`` per
  point and corner, measured with tracemalloc; the back-projector adds in place). GPU ranks use the fused kernels: no stencil arrays. Owned accumulators: the
  routed points (``ROUTED_BYTES_PER_RECORD`` per point and owner) and one chunk of stencils.
- **FFT plans**: CPU ranks: NumPy's pocketfft caches only twiddle factors (O(Np)), counted as 0. GPU ranks:
  cuFFT plans are kept by CuPy's plan cache with work areas up to the transform's size; each phase counts its
  own: the E-step the batched image transform's, the reference and reconstruction phases their chunked volume
  transforms' (~1/16 of a volume). Between phases the EM jobs clear the cache (:func:`release_device_memory`)
  where the peak leaves less than the largest phase's plans under the limit; where it leaves more, the cache
  keeps plans up to that room (:func:`keep_fft_plans`), so the peak plus the kept plans stays within the limit.
- **reconstruction** (M-step): the owned kz planes after the reduce-scatter (24 V vox / P; none at P = 1, where
  the accumulators are used as they are, nor with owned accumulators), the fold sums and leave-one-fold-out
  volumes of refine3d, the shell statistics (2^24 voxels at a time) and the transients of the reconstruction:
  serial (P = 1) ``RECONSTRUCT_SERIAL_BYTES_PER_VOXEL`` per voxel of one volume at a time, distributed
  ``RECONSTRUCT_DIST_BYTES_PER_VOXEL`` + ``RECONSTRUCT_DIST_FIXED`` per owned voxel (one volume at a time).

The peak is the largest of the job's phases (EM: references, E-step, M-step; reconstruct: insertion, reduction,
reconstruction), each the sum of what is alive in it. The E-step terms are evaluated at the largest image size
the job can reach (r = box/2 - 1) and the largest pose grid its options allow: an upper bound for a run (early
iterations at low resolution use far less).
"""
from .model import *  # noqa: F401,F403
from .model import (_em_phases, _fine_candidates, _grid_size, _images_per_rank, _reconstruct_phases)  # noqa: F401
from .limits import *  # noqa: F401,F403
from .limits import (_adapt, _adapt_precision, _largest, _limit, _size_arg, _terms_text)  # noqa: F401
