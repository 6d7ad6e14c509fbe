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
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from . import config
from .backend import scatter_add, xp_of


# ----------------------------------------------------------------------------------------------- grids
def freq_grid_2d(box: int, xp=np):
    """(ky (box,1), kx (1,box//2+1)) integer frequencies (float64) of the rfft2 grid."""
    ky = xp.fft.fftfreq(box, d=1.0 / box).reshape(-1, 1)
    kx = xp.arange(box // 2 + 1, dtype=xp.float64).reshape(1, -1)
    return ky, kx


def radius_2d(box: int, xp=np):
    ky, kx = freq_grid_2d(box, xp)
    return xp.sqrt(ky * ky + kx * kx)


def radius_3d(n: int, xp=np):
    """|k| on the (n, n, n//2+1) rfftn grid."""
    kz = xp.fft.fftfreq(n, d=1.0 / n).reshape(-1, 1, 1)
    ky = kz.reshape(1, -1, 1)
    kx = xp.arange(n // 2 + 1, dtype=xp.float64).reshape(1, 1, -1)
    return xp.sqrt(kz * kz + ky * ky + kx * kx)


def default_r_max(box: int) -> int:
    return box // 2 - 1


def check_box(box: int) -> None:
    if box % 2 or box < 8:
        raise ValueError(f"box size must be even and >= 8, got {box}")


# ------------------------------------------------------------------------------------------- 2D FFTs
def image_fft(images):
    """(n, N, N) real -> (n, N, N//2+1) complex (centre at N//2 moved to the origin)."""
    xp = xp_of(images)
    return xp.fft.rfft2(xp.fft.ifftshift(images, axes=(-2, -1)))


def image_ifft(F, box: int):
    xp = xp_of(F)
    return xp.fft.fftshift(xp.fft.irfft2(F, s=(box, box)), axes=(-2, -1))


def shift_phases(box: int, shifts, xp=np, dtype=np.complex64):
    """(n, N, N//2+1) factors exp(-2 pi i k.s/N): multiplying an image's FFT by them moves it by +s pixels.

    ``shifts`` is (n, 2) as (sx, sy) in pixels.
    """
    ky, kx = freq_grid_2d(box, xp)
    s = xp.asarray(shifts, dtype=xp.float64).reshape(-1, 2)
    ph = -2.0 * np.pi / box * (kx[None] * s[:, 0, None, None] + ky[None] * s[:, 1, None, None])
    return xp.exp(1j * ph).astype(dtype)


# ----------------------------------------------------------------------------------- gridding factors
@lru_cache(maxsize=16)
def _sinc2_1d_host(n_real: int, n_padded: int) -> np.ndarray:
    x = (np.arange(n_real) - n_real // 2) / n_padded
    return np.sinc(x) ** 2


def gridding_factor(box: int, pad: int, xp=np):
    """Separable sinc^2 of the trilinear kernel on the box: real-space attenuation of trilinear sampling."""
    s = xp.asarray(_sinc2_1d_host(box, pad * box))
    return s.reshape(-1, 1, 1) * s.reshape(1, -1, 1) * s.reshape(1, 1, -1)


# --------------------------------------------------------------------------------------------- volumes
def pad_volume(vol, pad: int):
    xp = xp_of(vol)
    n = vol.shape[-1]
    npad = pad * n
    out = xp.zeros(vol.shape[:-3] + (npad, npad, npad), dtype=vol.dtype)
    o = (npad - n) // 2
    out[..., o:o + n, o:o + n, o:o + n] = vol
    return out


def crop_volume(vol, box: int):
    npad = vol.shape[-1]
    o = (npad - box) // 2
    return vol[..., o:o + box, o:o + box, o:o + box]


def volume_fft(vol, pad: int = 2, gridding: bool = True, out=None):
    """Projector preparation: gridding pre-correction, zero padding, 3D rFFT -> (Np, Np, Np//2+1).

    rfftn(ifftshift(padded)) without the padded real volume: the rows of the box are transformed along x and
    placed at their wrapped (ifftshifted) y, z; then the box's z planes along y and every column along z, in
    place, by chunks (~1/:data:`RECONSTRUCT_CHUNKS` of the volume): the output and small temporaries only. A
    stack (V, N, N, N) gives (V, Np, Np, Np//2+1), each volume transformed in its place of the output (``out``:
    a C-contiguous complex array of that shape to write into)."""
    xp = xp_of(vol)
    if vol.ndim != 3:
        npad = pad * vol.shape[-1]
        if out is None:  # the single volume's dtype: complex128 from the float64 gridding factor
            cdt = np.result_type(vol.dtype, np.float64 if gridding else np.float32, np.complex64)
            out = xp.empty(vol.shape[:-3] + (npad, npad, npad // 2 + 1), dtype=cdt)
        for v in range(vol.shape[0]):
            volume_fft(vol[v], pad, gridding, out=out[v])
        return out
    box = vol.shape[-1]
    npad = pad * box
    v = vol / gridding_factor(box, pad, xp) if gridding else vol
    dst = xp.asarray((np.arange(box) + (npad - box) // 2 - npad // 2) % npad)  # wrapped index of each box index
    rows = xp.zeros((box, box, npad), dtype=np.result_type(v.dtype, np.float32))
    rows[..., dst] = v
    del v
    rows = xp.fft.rfft(rows, axis=-1)                                         # (box_z, box_y, Np//2+1)
    if out is None:
        out = xp.zeros((npad, npad, npad // 2 + 1), dtype=rows.dtype)
    else:
        out[...] = 0
    out[dst[:, None], dst[None, :]] = rows
    del rows
    step = -(-npad // RECONSTRUCT_CHUNKS)
    for z0 in range(0, box, step):
        zs = dst[z0:z0 + step]
        out[zs] = xp.fft.fft(out[zs], axis=1)
    for y0 in range(0, npad, step):
        out[:, y0:y0 + step] = xp.fft.fft(out[:, y0:y0 + step], axis=0)
    return out


def volume_ifft(F, box: int, pad: int = 2, gridding: bool = True):
    """Inverse of :func:`volume_fft` (with the gridding correction) -> real (box, box, box)."""
    xp = xp_of(F)
    npad = pad * box
    vol = xp.fft.fftshift(xp.fft.irfftn(F, s=(npad, npad, npad), axes=(-3, -2, -1)), axes=(-3, -2, -1))
    vol = crop_volume(vol, box)
    if gridding:
        vol = vol / gridding_factor(box, pad, xp)
    return vol


# -------------------------------------------------------------------------------------- slice sampling
class SliceGeometry:
    """The in-ball points of an image's rfft2 grid (|k| <= r_max), shared by projection and insertion."""

    def __init__(self, box: int, r_max: float | None = None, pad: int = 2, xp=np):
        check_box(box)
        self.box, self.pad, self.xp = box, pad, xp
        self.r_max = float(default_r_max(box) if r_max is None else r_max)
        if self.r_max > box // 2:
            raise ValueError(f"r_max {self.r_max} exceeds box//2 = {box // 2}")
        r = radius_2d(box, np)
        flat = np.flatnonzero(r.ravel() <= self.r_max)
        ky, kx = freq_grid_2d(box, np)
        kyy = np.broadcast_to(ky, r.shape).ravel()[flat]
        kxx = np.broadcast_to(kx, r.shape).ravel()[flat]
        self.index = xp.asarray(flat)                       # into the flattened (N, N//2+1) grid
        self.kxy = xp.asarray(np.stack([kxx, kyy], axis=1))  # (m, 2) as (kx, ky)
        self.m = flat.size
        self.npad = pad * box
        self.vol_shape = (self.npad, self.npad, self.npad // 2 + 1)

    def gather(self, F2):
        """(n, N, N//2+1) -> (n, m) in-ball values."""
        return F2.reshape(F2.shape[0], -1)[:, self.index]

    def scatter(self, vals):
        """(n, m) -> (n, N, N//2+1) with zeros outside the ball."""
        xp = self.xp
        out = xp.zeros((vals.shape[0], self.box * (self.box // 2 + 1)), dtype=vals.dtype)
        out[:, self.index] = vals
        return out.reshape(vals.shape[0], self.box, self.box // 2 + 1)

    def phases(self, shifts, dtype=np.complex64):
        """exp(+2 pi i k.t / N) at the in-ball points: multiplying X by it moves the image by -t.
        ``shifts`` (..., 2) as (tx, ty) in pixels -> (..., m)."""
        xp = self.xp
        ph = 2.0 * np.pi / self.box * (xp.asarray(shifts, dtype=xp.float64) @ self.kxy.T)
        return xp.exp(1j * ph).astype(dtype)

    def coords(self, A):
        """(n, m, 3) padded-grid coordinates (x, y, z) = pad * A^T (kx, ky, 0) for rotations A (n,3,3)."""
        xp = self.xp
        A = xp.asarray(A, dtype=xp.float64)
        # (A^T k)_j = sum_i A_ij k_i over i in (x, y): one batched (m, 2) @ (2, 3) product per rotation
        return self.kxy @ (self.pad * A[:, :2, :])


def padded_reach(r_max: float, pad: int) -> float:
    """Radius in padded-grid voxels that the insertion of in-ball points |k| <= r_max can reach: the trilinear
    stencil adds at most sqrt(3) to pad * r_max (bounded by pad * r_max + 2); the symmetrised sum stays inside
    it too. Nothing outside needs sending in a reduction."""
    return pad * float(r_max) + 2.0


def fused_kernels() -> bool:
    """GPU arrays use the fused CUDA kernels of :mod:`mpi_em.kernels` unless MPI_EM_FUSED_KERNELS=0."""
    return config.fused_kernels()


def _trilinear_stencil(coords, npad: int):
    """Flat indices (n, m, 8), weights (n, m, 8) and Friedel flags (n, m) for trilinear sampling.

    The 8 corners are built by broadcasting per-axis pairs (no per-corner temporaries); corner order is
    (dz, dy, dx) in raster order. A corner beyond the grid (|z| or |y| > Np/2, x > Np/2: only for points beyond
    |k| = N/2 - 1) has weight 0 and a clamped index. Indices are int32 where the volume allows (half the memory
    traffic of int64; wrapped with a comparison rather than a modulo).
    """
    xp = xp_of(coords)
    flip = coords[..., 0] < 0
    c = xp.where(flip[..., None], -coords, coords)
    c0 = xp.floor(c)
    f = c - c0
    half = npad // 2
    nxh = half + 1
    itype = xp.int32 if npad * npad * nxh < 2 ** 31 else xp.int64
    c0 = c0.astype(itype)
    one = xp.asarray([0, 1], dtype=itype)

    def corners(ci, fi, wrap):  # (..., 2) grid indices and weights of the two corners along one axis
        pair = ci[..., None] + one
        wts = xp.stack([1 - fi, fi], axis=-1)
        if wrap:  # |index| <= Np/2 lies on the grid; negative indices wrap
            return xp.where(pair < 0, pair + npad, pair), wts * (xp.abs(pair) <= half)
        return xp.minimum(pair, half), wts * (pair <= half)

    pz, wz = corners(c0[..., 2], f[..., 2], True)
    py, wy = corners(c0[..., 1], f[..., 1], True)
    px, wx = corners(c0[..., 0], f[..., 0], False)
    zy = (pz * (npad * nxh))[..., :, None] + (py * nxh)[..., None, :]
    idx = zy[..., :, :, None] + px[..., None, None, :]
    w = (wz[..., :, None] * wy[..., None, :])[..., :, :, None] * wx[..., None, None, :]
    lead = coords.shape[:-1]
    return idx.reshape(lead + (8,)), w.reshape(lead + (8,)), flip


def _volume_offsets(vol_index, geom: SliceGeometry, xp):
    size = geom.vol_shape[0] * geom.vol_shape[1] * geom.vol_shape[2]
    off = xp.asarray(vol_index, dtype=xp.int64) * size
    return off[..., None, None]


def project(Fvol, A, geom: SliceGeometry, vol_index=None):
    """Central slices of FFT-layout volume(s) for rotations A (..., 3, 3) -> (..., m) complex in-ball values.

    ``Fvol`` is one volume, or a stack (V, Np, Np, Np//2+1) with ``vol_index`` (same leading shape as A)
    naming the volume each rotation samples.
    """
    xp = xp_of(Fvol)
    if xp is not np and fused_kernels():
        from . import kernels

        return kernels.project(Fvol, A, geom, vol_index)
    lead = A.shape[:-2]
    A = xp.asarray(A).reshape(-1, 3, 3)
    coords = geom.coords(A)
    if Fvol.dtype == np.complex64:  # single-precision references: single-precision stencil (half the traffic)
        coords = coords.astype(np.float32)
    idx, w, flip = _trilinear_stencil(coords, geom.npad)
    if vol_index is not None:
        idx = idx + _volume_offsets(xp.asarray(vol_index).reshape(-1), geom, xp)
    vals = (Fvol.reshape(-1)[idx] * w.astype(Fvol.real.dtype)).sum(axis=-1)
    return xp.where(flip, xp.conj(vals), vals).reshape(lead + (geom.m,))


class CentredVolumes:
    """FFT-layout volumes (V, Np, Np, Np//2+1) re-laid for trilinear sampling on CPU ranks: kz and ky centred
    (index k + Np/2 for |k| <= Np/2, the Nyquist plane at both ends) with a zero margin of one voxel beyond
    Np/2 in z, y and x, so that the 8 corners of a point are its base index plus 8 fixed offsets (no wrapping,
    no per-corner masks: a corner beyond the grid reads the margin's zero, as :func:`_trilinear_stencil` gives
    it weight 0). :meth:`project` equals :func:`project` to float rounding, in about half the time."""

    def __init__(self, F):
        xp = xp_of(F)
        V, npad, _, nxh = F.shape
        half = npad // 2
        self.npad, self.S, self.X = npad, npad + 2, nxh + 1
        k = xp.arange(-half, half + 1)
        self.C = xp.zeros((V, self.S, self.S, self.X), dtype=F.dtype)
        self.C[:, (k + half)[:, None], (k + half)[None, :], :nxh] = F[:, (k % npad)[:, None], (k % npad)[None, :]]
        dz, dy, dx = np.meshgrid([0, 1], [0, 1], [0, 1], indexing="ij")
        self.offsets = xp.asarray(((dz * self.S + dy) * self.X + dx).reshape(8), dtype=xp.int32)
        self.dtype = F.dtype

    def project(self, A, geom: SliceGeometry, vol_index=None):
        """As :func:`project` (``A`` (..., 3, 3), ``vol_index`` naming the volume of each rotation)."""
        xp = xp_of(self.C)
        lead = A.shape[:-2]
        A = xp.asarray(A).reshape(-1, 3, 3)
        c = geom.coords(A)
        if self.dtype == np.complex64:
            c = c.astype(np.float32)
        flip = c[..., 0] < 0
        c = xp.where(flip[..., None], -c, c)
        c0 = xp.floor(c)
        f = c - c0
        half = self.npad // 2
        itype = xp.int32 if self.C.size < 2 ** 31 else xp.int64
        c0 = xp.clip(c0.astype(itype), -half, half)
        base = ((c0[..., 2] + half) * self.S + (c0[..., 1] + half)) * self.X + c0[..., 0]
        if vol_index is not None:
            base += xp.asarray(vol_index, dtype=itype).reshape(-1, 1) * (self.S * self.S * self.X)
        idx = base[..., None] + self.offsets
        wz = xp.stack([1 - f[..., 2], f[..., 2]], axis=-1)
        wy = xp.stack([1 - f[..., 1], f[..., 1]], axis=-1)
        wx = xp.stack([1 - f[..., 0], f[..., 0]], axis=-1)
        w = ((wz[..., :, None] * wy[..., None, :])[..., :, :, None] * wx[..., None, None, :]).reshape(idx.shape)
        vals = (self.C.reshape(-1)[idx] * w.astype(self.C.real.dtype, copy=False)).sum(axis=-1)
        return xp.where(flip, xp.conj(vals), vals).reshape(lead + (geom.m,))


def backproject(F_acc, W_acc, A, data, weights, geom: SliceGeometry, vol_index=None, sym_mats=None):
    """Adjoint of :func:`project`: insert (n, m) complex ``data`` and real ``weights`` (e.g. CTF.X, CTF^2).

    Accumulates in place into F_acc (complex) and W_acc (real), both FFT-layout (Np, Np, Np//2+1), or stacks
    of such volumes with ``vol_index`` (n,) naming the target of each row. ``sym_mats`` (G, 3, 3): every row is
    inserted once per point-group operator L, with rotation A @ L (on GPUs in the same kernel launch).
    """
    xp = xp_of(F_acc)
    if xp is not np and fused_kernels() and F_acc.dtype == np.complex128 and \
            (W_acc is None or W_acc.dtype == np.float64):
        from . import kernels

        return kernels.backproject(F_acc, W_acc, A, data, weights, geom, vol_index, sym_mats=sym_mats)
    A = xp.asarray(A, dtype=xp.float64).reshape(-1, 3, 3)
    if sym_mats is not None:
        for L in sym_mats:
            backproject(F_acc, W_acc, A @ xp.asarray(L, dtype=xp.float64), data, weights, geom, vol_index)
        return
    data = data.reshape(-1, geom.m)
    idx, w, flip = _trilinear_stencil(geom.coords(A), geom.npad)
    if vol_index is not None:
        idx = idx + _volume_offsets(xp.asarray(vol_index).reshape(-1), geom, xp)
        if weights is not None:
            weights = weights.reshape(-1, geom.m)
    d = xp.where(flip, xp.conj(data), data)
    scatter_add(F_acc, idx, d[..., None] * w)
    if W_acc is not None and weights is not None:
        scatter_add(W_acc, idx, weights[..., None] * w)


def enforce_hermitian_x0(F, W=None):
    """Merge the kx = 0 plane's Friedel pairs (RELION enforceHermitianSymmetry), in place.

    Both (ky, kz) and (-ky, -kz) on the kx = 0 plane receive data during insertion; they describe one
    Fourier component, so each becomes the sum of itself and the conjugate of its mirror.
    """
    xp = xp_of(F)
    npad = F.shape[-3]
    mirror = (-xp.arange(npad)) % npad
    plane = F[..., :, :, 0]
    plane_m = plane[..., mirror, :][..., :, mirror]
    F[..., :, :, 0] = plane + xp.conj(plane_m)
    if W is not None:
        wp = W[..., :, :, 0]
        W[..., :, :, 0] = wp + wp[..., mirror, :][..., :, mirror]


def shell_index(r, last: int | None = None):
    """Integer shell round(|k|) of frequency radii ``r`` (image pixels, >= 0; any shape, NumPy or CuPy): the one
    rounding rule of every per-shell sum (FSC, noise spectrum, tau^2). With ``last``, radii beyond it go to shell
    ``last`` (the tau^2 table's end, or an "outside" bin)."""
    xp = xp_of(r)
    sh = xp.rint(r).astype(xp.int64)
    return sh if last is None else xp.minimum(sh, last)


def regularised_denominator(W, r, mean_w, tau2=None, tau2_fudge: float = 1.0, min_weight: float = 1e-3):
    """The divisor of F in reconstruction, shared by 2D and 3D: max(W, min_weight * mean_w) without a prior,
    W + 1 / (tau2_fudge * tau2(shell)) (floored at 1e-10 * mean_w) with one; ``r`` is |k| in image pixels and
    ``mean_w`` the mean weight inside the ball (a scalar, or broadcastable per volume/plane).

    A shell whose tau2 is 0 (no signal: the gold-standard FSC is 0 or below) has a prior of zero variance, so its
    coefficients come out 0 (a divisor of 1e20 x mean W: 1e-20 of their unregularised value), as RELION's (whose
    FSC floor of 0.001 makes them ~1000x smaller). Treating tau2 = 0 as "no prior" divided those noise-only
    shells by W alone: the half maps' noise there grew up to 60x the signal's power, at the edge of the band the
    E-step aligns with (benchmarks/results/refine3d-convergence/)."""
    xp = xp_of(W)
    floor_ok = xp.asarray(mean_w) > 0
    if tau2 is None:
        return xp.maximum(W, xp.where(floor_ok, min_weight * xp.asarray(mean_w), 1.0))
    tau2 = xp.asarray(tau2, dtype=xp.float64)
    sh = shell_index(r, tau2.shape[-1] - 1)
    t = tau2[..., sh] * tau2_fudge
    scale = xp.where(floor_ok, xp.asarray(mean_w, dtype=xp.float64), 1.0)
    # tau2 = 0: 1e20 x mean W, not infinity: complex / inf is NaN on CuPy (its division scales by |divisor|)
    denom = W + xp.where(t > 0, 1.0 / xp.where(t > 0, t, 1.0), 1e20 * scale)
    return xp.maximum(denom, 1e-10 * scale)


def reconstruction_ball(r, r_max: float, box: int):
    """The Fourier voxels a reconstruction keeps, ``r`` = |k| in image pixels: r <= r_max + 1/2, and r < N/2 (the
    padded grid's Nyquist sphere, RELION's bound, which only matters from r_max = N/2 on)."""
    return (r <= r_max + 0.5) & (r < box / 2)


def soft_mask_outside(vol, width: float = 3.0, inplace: bool = False):
    """RELION's ``softMaskOutsideMap`` (radius N/2), applied to every reconstruction: beyond N/2 + ``width`` px from
    the centre the map is the mean of the voxels beyond N/2 (weighted by the edge), and over the ``width`` px in
    between it is blended into it by a raised cosine. Interpolation aliasing and noise in the box corners, which
    the gridding correction amplifies (2x at the corners for pad 2), are gone: without it a noise-free
    RELION-projected map's FSC against the truth was 0.96 at 0.9 Nyquist instead of 0.999, a noisy map's mean FSC
    0.044 below relion_reconstruct's (``benchmarks/relion_parity.py``). ``vol`` (..., N, N, N) float, any array
    module; a new array, or ``vol`` itself with ``inplace``. Works one z slice at a time (temporaries of N^2)."""
    xp = xp_of(vol)
    n = vol.shape[-1]
    out = vol if inplace else vol.copy()
    c = np.arange(n, dtype=np.float64) - n // 2
    ryx2 = xp.asarray(c[:, None] ** 2 + c[None, :] ** 2)

    def edge(z):  # 0 inside radius N/2, 1 beyond N/2 + width
        t = xp.clip((xp.sqrt(c[z] ** 2 + ryx2) - n / 2) / width, 0.0, 1.0)
        return 0.5 - 0.5 * xp.cos(np.pi * t)

    num, den = 0.0, 0.0
    for z in range(n):
        e = edge(z)
        num = num + (out[..., z, :, :] * e).sum(axis=(-2, -1))
        den += float(e.sum())
    bg = (num / den)[..., None, None]
    for z in range(n):
        e = edge(z)
        out[..., z, :, :] = out[..., z, :, :] * (1 - e) + bg * e
    return out


#: the reconstruction's division and inverse FFT go in this many chunks of planes or rows (its temporaries are
#: ~1/RECONSTRUCT_CHUNKS of the volume's)
RECONSTRUCT_CHUNKS = 16


def reconstruct(F_acc, W_acc, box: int, pad: int = 2, r_max: float | None = None, tau2=None,
                tau2_fudge: float = 1.0, min_weight: float = 1e-3, gridding: bool = True,
                mask_outside: bool = False):
    """Regularised division and inverse transform of the accumulators -> real volume (box^3).

    Without tau2: V = F / max(W, min_weight * mean(W in ball)) (known-pose reconstruction).
    With tau2 (per image-pixel shell): V = F / (W + 1 / (tau2_fudge * tau2(shell))) (RELION's MAP estimate).
    Voxels outside :func:`reconstruction_ball` are 0. ``mask_outside``: :func:`soft_mask_outside` on the
    gridding-corrected map (RELION applies it before the correction: the same map to 1e-3 in FSC).
    The inputs are not modified.

    Lean: one complex128 working copy of F (the float64 copy of W only until the division) and temporaries of
    ~1/:data:`RECONSTRUCT_CHUNKS` of the volume: the division and the inverse FFT (:func:`_ifft_cropped`) go plane by
    plane, in place, and only the rows and columns inside the final crop are transformed along the last axes.
    """
    xp = xp_of(F_acc)
    r_max = default_r_max(box) if r_max is None else r_max
    npad = pad * box
    F = xp.array(F_acc, dtype=xp.complex128)
    W = xp.array(W_acc, dtype=xp.float64)
    enforce_hermitian_x0(F, W)
    step = -(-npad // RECONSTRUCT_CHUNKS)
    kz = np.fft.fftfreq(npad, d=1.0 / npad)
    ky = xp.fft.fftfreq(npad, d=1.0 / npad).reshape(1, -1, 1)
    kx = xp.arange(npad // 2 + 1, dtype=xp.float64).reshape(1, 1, -1)

    def chunks():  # (plane slice, |k| / pad in image pixels, the ball) per chunk of kz planes
        for z0 in range(0, npad, step):
            z = xp.asarray(kz[z0:z0 + step]).reshape(-1, 1, 1)
            r = xp.sqrt(z * z + ky * ky + kx * kx) / pad
            yield slice(z0, z0 + step), r, reconstruction_ball(r, r_max, box)

    total, count = 0.0, 0
    for sl, r, inside in chunks():  # mean of W in the ball
        total += float(W[sl][inside].sum())
        count += int(inside.sum())
    mean_w = total / count if count else 1.0
    for sl, r, inside in chunks():  # division in place, zero outside the ball
        F[sl] /= regularised_denominator(W[sl], r, mean_w, tau2, tau2_fudge, min_weight)
        F[sl][~inside] = 0
    del W
    vol = _ifft_cropped(F, box, pad, reach=pad * (r_max + 0.5), gridding=gridding)
    return soft_mask_outside(vol, inplace=True) if mask_outside else vol


def _ifft_cropped(F, box: int, pad: int, reach: float | None = None, gridding: bool = True):
    """:func:`volume_ifft` of a private (Np, Np, Np//2+1) complex128 ``F``, overwritten, in
    :data:`RECONSTRUCT_CHUNKS` chunks: ifft along ky of the kz planes (those with |kz| <= ``reach`` only, F
    being zero beyond it), then per chunk of the y rows inside the crop ifft along kz and irfft along kx of the
    columns kx <= ``reach``, kept at the z and x inside the crop -> real (box, box, box) float64."""
    xp = xp_of(F)
    npad = F.shape[0]
    nxh = npad // 2 + 1
    ncol = nxh if reach is None else min(nxh, int(np.floor(reach)) + 1)
    k = np.abs(np.fft.fftfreq(npad, d=1.0 / npad))
    band = np.flatnonzero(k <= reach) if reach is not None else np.arange(npad)
    step = -(-npad // RECONSTRUCT_CHUNKS)
    for i in range(0, band.size, step):
        zs = xp.asarray(band[i:i + step])
        F[zs, :, :ncol] = xp.fft.ifft(F[zs, :, :ncol], axis=1)
    # fftshift + crop: cropped index i of an axis reads full index (o + i + Np/2) mod Np
    o = (npad - box) // 2
    src = xp.asarray((np.arange(o, o + box) + npad // 2) % npad)
    out = xp.empty((box, box, box), dtype=xp.float64)
    g = gridding_factor(box, pad, xp) if gridding else None
    step = -(-box // RECONSTRUCT_CHUNKS)
    for y0 in range(0, box, step):
        ys = src[y0:y0 + step]
        col = xp.fft.ifft(F[:, ys, :ncol], axis=0)[src]                    # (box_z, ny, ncol)
        part = xp.fft.irfft(col, n=npad, axis=-1)[..., src]                  # (box_z, ny, box_x)
        out[:, y0:y0 + step, :] = part if g is None else part / g[:, y0:y0 + step, :]
    return out
