"""Fourier-space image formation: grids, shifts, central-slice projector, back-projector, reconstruction.

Conventions (all batched; NumPy or CuPy through the arrays' own module):
- Real-space boxes are even (N), indexed [y, x] / [z, y, x]; the origin is at index N//2 (RELION's centre).
- Images: F = rfft2(ifftshift(img)) -> (N, N//2+1), rows are wrapped ky, columns kx = 0..N/2.
- Volumes are zero-padded by ``pad`` (Np = pad*N) after the gridding pre-correction and stored as
  rfftn(ifftshift(padded)) -> (Np, Np, Np//2+1) "FFT layout" [kz, ky, kx] with wrapped kz, ky.
- The image frequency (kx, ky) samples the volume at pad * A^T (kx, ky, 0) (RELION's projector); points with
  a negative x coordinate use Friedel symmetry F(-k) = conj(F(k)).
- Trilinear interpolation. :func:`project` and :func:`backproject` are exact adjoints under the real inner
  product Re<a, b> (they share :func:`_trilinear_stencil`).
- Only frequencies with |k| <= r_max (image pixels) are used, r_max <= N/2 (RELION inserts up to Nyquist). From
  r_max > N/2 - 1 on, stencil corners can fall beyond the padded grid (an index beyond Np/2 on an axis): they get
  weight 0, as they lie outside the ball |q| < Np/2 that :func:`reconstruct` keeps (RELION's larger array holds
  them and drops them there). Below, every stencil lies inside the grid without wrap-around.

Modules: :mod:`.grids` (frequencies, radii, shells), :mod:`.transforms` (image and volume FFTs, gridding factors),
:mod:`.projector` (slice geometry, projector, back-projector), :mod:`.division` (accumulators -> map).
"""
from __future__ import annotations

from .division import enforce_hermitian_x0, reconstruct, reconstruction_ball, regularised_denominator, soft_mask_outside
from .grids import check_box, default_r_max, freq_grid_2d, radius_2d, radius_3d, shell_index
from .projector import CentredVolumes, SliceGeometry, backproject, padded_reach, project
from .projector import _trilinear_stencil  # noqa: F401 (private; imported from here by mpi_em.symaxis)
from .transforms import (RECONSTRUCT_CHUNKS, crop_volume, gridding_factor, image_fft, image_ifft, pad_volume,
                         shift_phases, volume_fft, volume_ifft)

__all__ = ["CentredVolumes", "RECONSTRUCT_CHUNKS", "SliceGeometry", "backproject", "check_box", "crop_volume",
           "default_r_max", "enforce_hermitian_x0", "freq_grid_2d", "gridding_factor", "image_fft",
           "image_ifft", "pad_volume", "padded_reach", "project", "radius_2d", "radius_3d", "reconstruct",
           "reconstruction_ball", "regularised_denominator", "shell_index", "shift_phases", "soft_mask_outside",
           "volume_fft", "volume_ifft"]
