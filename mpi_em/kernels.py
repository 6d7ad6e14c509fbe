"""Fused CUDA kernels (CuPy RawKernel) for the hot loops of projection and insertion on the GPU.

One thread per (image, frequency): the rotated coordinate, the Friedel flip, the 8 corners and weights in
registers (the NumPy path's stencil arrays would hold ~100 bytes per point on the GPU), and (insertion) the atomics
of consecutive threads on neighbouring voxels of one plane. Symmetry copies are a loop inside the thread.

Semantics are exactly those of :func:`mpi_em.fourier.project` / :func:`mpi_em.fourier.backproject` (same
coordinates, same corner rule, float64 coordinates and accumulation), so results agree to rounding (the order of
the atomic additions); ``tests/test_gpu.py`` checks them against the CPU path.
"""
from __future__ import annotations

import functools

import numpy as np

from . import config


def use_fused(xp, F_acc=None, W_acc=None) -> bool:
    """The one switch between these kernels and the array-expression paths (fourier, fourier2d, symmetrise): GPU
    arrays (``xp``) unless MPI_EM_FUSED_KERNELS=0; insertion also needs ``F_acc`` and ``W_acc`` of one precision
    (complex128 / float64, or complex64 / float32: :data:`ACCUMULATOR_SUFFIX`)."""
    if xp is np or not config.fused_kernels():
        return False
    return _suffix(F_acc, W_acc) is not None


#: the insertion and symmetrisation kernels per accumulator precision (F's complex dtype, W's real dtype)
ACCUMULATOR_SUFFIX = {(np.dtype(np.complex128), np.dtype(np.float64)): "_f64",
                      (np.dtype(np.complex64), np.dtype(np.float32)): "_f32"}


def _suffix(F_acc, W_acc):
    """The kernels' suffix for accumulators F_acc / W_acc (either may be None), or None for other dtypes."""
    if F_acc is None and W_acc is None:
        return "_f64"
    if F_acc is None:
        return {np.dtype(np.float64): "_f64", np.dtype(np.float32): "_f32"}.get(np.dtype(W_acc.dtype))
    cdt = np.dtype(F_acc.dtype)
    rdt = np.dtype(W_acc.dtype) if W_acc is not None else np.dtype(F_acc.real.dtype)
    return ACCUMULATOR_SUFFIX.get((cdt, rdt))


_SRC = r"""
#include <cupy/complex.cuh>

__device__ __forceinline__ void rotate(const double* __restrict__ A, const double* __restrict__ L,
                                       double kx, double ky, double pad, double* c) {
    // p = A^T (kx, ky, 0); c = pad * L^T p   (coords of mpi_em.fourier.SliceGeometry.coords for A @ L)
    double p0 = A[0] * kx + A[3] * ky, p1 = A[1] * kx + A[4] * ky, p2 = A[2] * kx + A[5] * ky;
    if (L == nullptr) { c[0] = pad * p0; c[1] = pad * p1; c[2] = pad * p2; return; }
    c[0] = pad * (L[0] * p0 + L[3] * p1 + L[6] * p2);
    c[1] = pad * (L[1] * p0 + L[4] * p1 + L[7] * p2);
    c[2] = pad * (L[2] * p0 + L[5] * p1 + L[8] * p2);
}

__device__ __forceinline__ void trilinear(const double* c, int npad, int nxh, long long off, long long* idx,
                                          double* w) {
    // the 8 corners of c (x >= 0) in (dz, dy, dx) raster order: flat indices (y and z wrap) and weights, as
    // mpi_em.fourier.projector._trilinear_stencil (a corner beyond the grid, |z| or |y| > Np/2 or x > Np/2: weight 0, index
    // clamped)
    const double x0 = floor(c[0]), y0 = floor(c[1]), z0 = floor(c[2]);
    const double fx = c[0] - x0, fy = c[1] - y0, fz = c[2] - z0;
    const long long ix = (long long)x0, iy = (long long)y0, iz = (long long)z0;
    const long long half = npad / 2;
    int q = 0;
    #pragma unroll
    for (int dz = 0; dz < 2; ++dz) {
        const long long cz = iz + dz;
        const long long zz = (cz % npad + npad) % npad;
        const double wz = (cz > half || cz < -half) ? 0.0 : (dz ? fz : 1.0 - fz);
        #pragma unroll
        for (int dy = 0; dy < 2; ++dy) {
            const long long cy = iy + dy;
            const long long yy = (cy % npad + npad) % npad;
            const double wzy = (cy > half || cy < -half) ? 0.0 : wz * (dy ? fy : 1.0 - fy);
            #pragma unroll
            for (int dx = 0; dx < 2; ++dx, ++q) {
                const long long cx = ix + dx;
                w[q] = cx > half ? 0.0 : wzy * (dx ? fx : 1.0 - fx);
                idx[q] = off + (zz * npad + yy) * nxh + (cx > half ? half : cx);
            }
        }
    }
}

template <typename T>
__device__ void backproject_impl(
        const double* __restrict__ A, const double* __restrict__ L, const complex<double>* __restrict__ data,
        const double* __restrict__ weights, const double* __restrict__ kxy, const long long* __restrict__ vol,
        T* __restrict__ F, T* __restrict__ W, long long n, int m, int S, int npad, int nxh, double pad) {
    // T: the accumulators' real type (double, or float for single-precision accumulators: the stencil and the
    // products in double, each atomic addition rounded to T)
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n * m) return;
    long long i = t / m;
    int j = (int)(t - i * m);
    const double kx = kxy[2 * j], ky = kxy[2 * j + 1];
    const complex<double> d = data[t];
    const double wv = weights != nullptr ? weights[t] : 0.0;
    const long long off = (vol != nullptr ? vol[i] : 0) * (long long)npad * npad * nxh;
    for (int s = 0; s < S; ++s) {
        double c[3];
        rotate(A + 9 * i, L != nullptr ? L + 9 * s : nullptr, kx, ky, pad, c);
        double im = d.imag();
        if (c[0] < 0) { c[0] = -c[0]; c[1] = -c[1]; c[2] = -c[2]; im = -im; }
        long long idx[8];
        double w[8];
        trilinear(c, npad, nxh, off, idx, w);
        #pragma unroll
        for (int q = 0; q < 8; ++q) {
            atomicAdd(F + 2 * idx[q], (T)(w[q] * d.real()));
            atomicAdd(F + 2 * idx[q] + 1, (T)(w[q] * im));
            if (W != nullptr) atomicAdd(W + idx[q], (T)(w[q] * wv));
        }
    }
}

#define BACKPROJECT_ENTRY(NAME, IMPL, T) \
extern "C" __global__ void NAME( \
        const double* A, const double* L, const complex<double>* data, const double* weights, const double* kxy, \
        const long long* vol, T* F, T* W, long long n, int m, int S, int npad, int nxh, double pad) { \
    IMPL<T>(A, L, data, weights, kxy, vol, F, W, n, m, S, npad, nxh, pad); \
}
BACKPROJECT_ENTRY(backproject_fused_f64, backproject_impl, double)
BACKPROJECT_ENTRY(backproject_fused_f32, backproject_impl, float)

template <typename T>
__device__ void project_impl(const complex<T>* __restrict__ V, const double* __restrict__ A,
                             const double* __restrict__ kxy, const long long* __restrict__ vol,
                             complex<T>* __restrict__ out, long long n, int m, int npad, int nxh, double pad) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n * m) return;
    long long i = t / m;
    int j = (int)(t - i * m);
    double c[3];
    rotate(A + 9 * i, nullptr, kxy[2 * j], kxy[2 * j + 1], pad, c);
    bool flip = c[0] < 0;
    if (flip) { c[0] = -c[0]; c[1] = -c[1]; c[2] = -c[2]; }
    long long idx[8];
    double w[8];
    trilinear(c, npad, nxh, (vol != nullptr ? vol[i] : 0) * (long long)npad * npad * nxh, idx, w);
    complex<T> acc(0, 0);
    #pragma unroll
    for (int q = 0; q < 8; ++q) acc += V[idx[q]] * (T)w[q];
    out[t] = flip ? conj(acc) : acc;
}

// ---- 2D: planes (K, Np, Np/2+1), rotations R (n, 2, 2), coords = pad * R^T (kx, ky); y wraps, x does not
// (same argument list as backproject_fused; L and S are unused: no point groups in 2D)
template <typename T>
__device__ void backproject2d_impl(
        const double* __restrict__ R, const double* __restrict__ L, const complex<double>* __restrict__ data,
        const double* __restrict__ weights, const double* __restrict__ kxy, const long long* __restrict__ plane,
        T* __restrict__ F, T* __restrict__ W, long long n, int m, int S, int npad, int nxh, double pad) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n * m) return;
    long long i = t / m;
    int j = (int)(t - i * m);
    const double kx = kxy[2 * j], ky = kxy[2 * j + 1];
    const double* r = R + 4 * i;
    double cx = pad * (r[0] * kx + r[2] * ky), cy = pad * (r[1] * kx + r[3] * ky);
    const complex<double> d = data[t];
    double im = d.imag();
    if (cx < 0) { cx = -cx; cy = -cy; im = -im; }
    const double x0 = floor(cx), y0 = floor(cy), fx = cx - x0, fy = cy - y0;
    const long long ix = (long long)x0, iy = (long long)y0;
    const double wv = weights != nullptr ? weights[t] : 0.0;
    const long long off = (plane != nullptr ? plane[i] : 0) * (long long)npad * nxh;
    #pragma unroll
    for (int dy = 0; dy < 2; ++dy) {
        long long yy = ((iy + dy) % npad + npad) % npad;
        double wy = dy ? fy : 1.0 - fy;
        #pragma unroll
        for (int dx = 0; dx < 2; ++dx) {
            double w = wy * (dx ? fx : 1.0 - fx);
            long long idx = off + yy * nxh + ix + dx;
            atomicAdd(F + 2 * idx, (T)(w * d.real()));
            atomicAdd(F + 2 * idx + 1, (T)(w * im));
            if (W != nullptr) atomicAdd(W + idx, (T)(w * wv));
        }
    }
}
BACKPROJECT_ENTRY(backproject2d_fused_f64, backproject2d_impl, double)
BACKPROJECT_ENTRY(backproject2d_fused_f32, backproject2d_impl, float)

template <typename T>
__device__ void project2d_impl(const complex<T>* __restrict__ V, const double* __restrict__ R,
                               const double* __restrict__ kxy, const long long* __restrict__ plane,
                               complex<T>* __restrict__ out, long long n, int m, int npad, int nxh, double pad) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n * m) return;
    long long i = t / m;
    int j = (int)(t - i * m);
    const double kx = kxy[2 * j], ky = kxy[2 * j + 1];
    const double* r = R + 4 * i;
    double cx = pad * (r[0] * kx + r[2] * ky), cy = pad * (r[1] * kx + r[3] * ky);
    bool flip = cx < 0;
    if (flip) { cx = -cx; cy = -cy; }
    const double x0 = floor(cx), y0 = floor(cy);
    const T fx = (T)(cx - x0), fy = (T)(cy - y0);
    const long long ix = (long long)x0, iy = (long long)y0;
    const long long off = (plane != nullptr ? plane[i] : 0) * (long long)npad * nxh;
    complex<T> acc(0, 0);
    #pragma unroll
    for (int dy = 0; dy < 2; ++dy) {
        long long yy = ((iy + dy) % npad + npad) % npad;
        T wy = dy ? fy : (T)1 - fy;
        #pragma unroll
        for (int dx = 0; dx < 2; ++dx) acc += V[off + yy * nxh + ix + dx] * (wy * (dx ? fx : (T)1 - fx));
    }
    out[t] = flip ? conj(acc) : acc;
}

extern "C" __global__ void project2d_fused_c64(const complex<float>* V, const double* R, const double* kxy,
        const long long* plane, complex<float>* out, long long n, int m, int npad, int nxh, double pad) {
    project2d_impl<float>(V, R, kxy, plane, out, n, m, npad, nxh, pad);
}

extern "C" __global__ void project2d_fused_c128(const complex<double>* V, const double* R, const double* kxy,
        const long long* plane, complex<double>* out, long long n, int m, int npad, int nxh, double pad) {
    project2d_impl<double>(V, R, kxy, plane, out, n, m, npad, nxh, pad);
}

extern "C" __global__ void project_fused_c64(const complex<float>* V, const double* A, const double* kxy,
        const long long* vol, complex<float>* out, long long n, int m, int npad, int nxh, double pad) {
    project_impl<float>(V, A, kxy, vol, out, n, m, npad, nxh, pad);
}

extern "C" __global__ void project_fused_c128(const complex<double>* V, const double* A, const double* kxy,
        const long long* vol, complex<double>* out, long long n, int m, int npad, int nxh, double pad) {
    project_impl<double>(V, A, kxy, vol, out, n, m, npad, nxh, pad);
}

// ---- symmetrise summed accumulators (RELION BackProjector::symmetrise): one thread per output voxel of the
// half grid (V, Np, Np, Np/2+1): out(q) = sum_s G(L_s q), trilinear, Friedel flip for x < 0 (conjugate F);
// voxels with |q| > rlim are set to zero (outside every reconstruction ball: see mpi_em.symmetrise.symmetrise)
template <typename T>
__device__ void symmetrise_impl(
        const complex<T>* __restrict__ F, const T* __restrict__ W, const double* __restrict__ L, int S,
        complex<T>* __restrict__ Fo, T* __restrict__ Wo, long long total, int npad, int nxh, double rlim2) {
    // T: the accumulators' real type; the interpolation and the sum over the operators in double
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= total) return;
    const long long per = (long long)npad * npad * nxh;
    const long long v = t / per, r = t - v * per;
    const int x = (int)(r % nxh);
    const long long zy = r / nxh;
    const int y = (int)(zy % npad), z = (int)(zy / npad);
    const double qx = x, qy = y >= (npad + 1) / 2 ? y - npad : y, qz = z >= (npad + 1) / 2 ? z - npad : z;
    complex<double> accF(0, 0);
    double accW = 0.0;
    if (qx * qx + qy * qy + qz * qz <= rlim2) {
        const long long off = v * per;
        for (int s = 0; s < S; ++s) {
            const double* l = L + 9 * s;
            double c0 = l[0] * qx + l[1] * qy + l[2] * qz;
            double c1 = l[3] * qx + l[4] * qy + l[5] * qz;
            double c2 = l[6] * qx + l[7] * qy + l[8] * qz;
            const bool flip = c0 < 0;
            const double c[3] = {flip ? -c0 : c0, flip ? -c1 : c1, flip ? -c2 : c2};
            long long idx[8];
            double w[8];
            trilinear(c, npad, nxh, off, idx, w);
            complex<double> g(0, 0);
            double gw = 0.0;
            #pragma unroll
            for (int q = 0; q < 8; ++q) {
                g += complex<double>(F[idx[q]].real(), F[idx[q]].imag()) * w[q];
                gw += (double)W[idx[q]] * w[q];
            }
            accF += flip ? conj(g) : g;
            accW += gw;
        }
    }
    Fo[t] = complex<T>((T)accF.real(), (T)accF.imag());
    Wo[t] = (T)accW;
}

#define SYMMETRISE_ENTRY(NAME, T) \
extern "C" __global__ void NAME(const complex<T>* F, const T* W, const double* L, int S, complex<T>* Fo, T* Wo, \
                                long long total, int npad, int nxh, double rlim2) { \
    symmetrise_impl<T>(F, W, L, S, Fo, Wo, total, npad, nxh, rlim2); \
}
SYMMETRISE_ENTRY(symmetrise_fused_f64, double)
SYMMETRISE_ENTRY(symmetrise_fused_f32, float)

// ---- E-step: out[i, c] = log sum_t exp(L[i, t, c] + prior[t]) for L (n, T, C) float32, one pass over L
// (online log-sum-exp; consecutive threads read consecutive c of one (i, t) row)
extern "C" __global__ void logsumexp_translations(const float* __restrict__ L, const float* __restrict__ prior,
                                                  float* __restrict__ out, long long n, int T, long long C) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n * C) return;
    long long i = t / C, c = t - i * C;
    const float* p = L + i * (long long)T * C + c;
    const float neg_inf = __int_as_float(0xff800000);
    float mx = neg_inf, s = 0.0f;
    for (int k = 0; k < T; ++k) {
        float x = p[(long long)k * C] + prior[i * T + k];
        if (x > mx) { s = s * expf(mx - x) + 1.0f; mx = x; }
        else if (x > neg_inf) s += expf(x - mx);
    }
    out[t] = mx > neg_inf ? mx + logf(s) : mx;
}
"""

_THREADS = 256


@functools.lru_cache(maxsize=None)
def _module(device_id: int):
    import cupy as cp

    return cp.RawModule(code=_SRC, options=("-std=c++17",),
                        name_expressions=None)


def _fn(name: str):
    import cupy as cp

    return _module(cp.cuda.runtime.getDevice()).get_function(name)


def _ptr_or_null(a):
    return a if a is not None else np.uint64(0)


def _per_row(index, n):
    """Per-row int64 volume/plane index on the device, or None."""
    import cupy as cp

    if index is None:
        return None
    return cp.ascontiguousarray(cp.broadcast_to(cp.asarray(index, dtype=cp.int64).reshape(-1), (n,)))


def _launch(name, total, args):
    _fn(name)(((total + _THREADS - 1) // _THREADS,), (_THREADS,), args)


def _insert(name, d, F_acc, W_acc, R, data, weights, geom, index, sym_mats=None) -> None:
    """Fused insertion with rotations R (n, d, d) into F_acc / W_acc (in place), rows into volume/plane index."""
    import cupy as cp

    suffix = _suffix(F_acc, W_acc)
    if suffix is None:
        raise TypeError("the fused GPU insertion accumulates in complex128 / float64 or complex64 / float32, not "
                        f"{F_acc.dtype} / {None if W_acc is None else W_acc.dtype}")
    name += suffix
    R = cp.ascontiguousarray(cp.asarray(R, dtype=cp.float64).reshape(-1, d, d))
    n, m = R.shape[0], geom.m
    if n == 0 or m == 0:
        return
    data = cp.ascontiguousarray(cp.asarray(data).reshape(n, m).astype(cp.complex128, copy=False))
    w = None
    if W_acc is not None and weights is not None:
        w = cp.asarray(weights, dtype=cp.float64)
        w = cp.ascontiguousarray(w.reshape(n, m) if w.size == n * m else cp.broadcast_to(w, (n, m)))
    L = None if sym_mats is None else cp.ascontiguousarray(cp.asarray(sym_mats, dtype=cp.float64))
    _launch(name, n * m,
            (R, _ptr_or_null(L), data, _ptr_or_null(w), _kxy(geom), _ptr_or_null(_per_row(index, n)), F_acc,
             _ptr_or_null(W_acc if w is not None else None), np.int64(n), np.int32(m),
             np.int32(1 if L is None else L.shape[0]), np.int32(geom.npad), np.int32(geom.npad // 2 + 1),
             np.float64(geom.pad)))


def _project(prefix, d, V, R, geom, index):
    """Fused slice extraction (rotations R (..., d, d)) from V (complex64 or complex128) -> (..., m)."""
    import cupy as cp

    lead = tuple(R.shape[:-2])
    R = cp.ascontiguousarray(cp.asarray(R, dtype=cp.float64).reshape(-1, d, d))
    n, m = R.shape[0], geom.m
    suffix, dt = ("_c64", cp.complex64) if V.dtype == np.complex64 else ("_c128", cp.complex128)
    V = cp.ascontiguousarray(V.astype(dt, copy=False))
    out = cp.empty((n, m), dtype=dt)
    if n and m:
        _launch(prefix + suffix, n * m,
                (V, R, _kxy(geom), _ptr_or_null(_per_row(index, n)), out, np.int64(n), np.int32(m),
                 np.int32(geom.npad), np.int32(geom.npad // 2 + 1), np.float64(geom.pad)))
    return out.reshape(lead + (m,))


def backproject(F_acc, W_acc, A, data, weights, geom, vol_index=None, sym_mats=None) -> None:
    """GPU :func:`mpi_em.fourier.backproject` (in place), with optional symmetry copies A @ L for L in sym_mats.

    F_acc complex128 and W_acc float64 (or None), or complex64 and float32 (stencil and products in double, each
    addition rounded to single), C-contiguous, one volume or a stack with ``vol_index``.
    """
    _insert("backproject_fused", 3, F_acc, W_acc, A, data, weights, geom, vol_index, sym_mats)


def project(Fvol, A, geom, vol_index=None):
    """GPU :func:`mpi_em.fourier.project`: (..., m) in-ball values of the slices A (..., 3, 3)."""
    return _project("project_fused", 3, Fvol, A, geom, vol_index)


def backproject2d(F_acc, W_acc, R, data, weights, geom, plane_index=None) -> None:
    """GPU :func:`mpi_em.fourier2d.backproject2d` for one plane or a stack with ``plane_index`` (in place)."""
    _insert("backproject2d_fused", 2, F_acc, W_acc, R, data, weights, geom, plane_index)


def project2d(Fplanes, R, geom, plane_index=None):
    """GPU :func:`mpi_em.fourier2d.project2d` for one plane or a stack with ``plane_index``."""
    return _project("project2d_fused", 2, Fplanes, R, geom, plane_index)


def symmetrise(F, W, sym_mats, rlim: float):
    """GPU gather of :func:`mpi_em.symmetrise.symmetrise` (F, W stacks complex128 / float64, or complex64 /
    float32: interpolated and summed in double, stored in their precision) -> new (F, W) of their dtypes."""
    import cupy as cp

    suffix = _suffix(F, W)
    if suffix is None:
        F, W, suffix = F.astype(cp.complex128), W.astype(cp.float64), "_f64"
    F, W = cp.ascontiguousarray(F), cp.ascontiguousarray(W)
    L = cp.ascontiguousarray(cp.asarray(sym_mats, dtype=cp.float64).reshape(-1, 3, 3))
    Fo, Wo = cp.empty_like(F), cp.empty_like(W)
    npad = F.shape[-3]
    _launch("symmetrise_fused" + suffix, F.size,
            (F, W, L, np.int32(L.shape[0]), Fo, Wo, np.int64(F.size), np.int32(npad), np.int32(F.shape[-1]),
             np.float64(rlim * rlim)))
    return Fo, Wo


def logsumexp_translations(L, prior_t):
    """GPU :func:`mpi_em.em.likelihood.marginalise_translations`: L (n, T, C) float32 C-contiguous, log priors
    (n, T) -> (n, C)."""
    import cupy as cp

    n, T, C = L.shape
    out = cp.empty((n, C), dtype=cp.float32)
    if n and C:
        _launch("logsumexp_translations", n * C,
                (L, cp.ascontiguousarray(prior_t, dtype=cp.float32), out, np.int64(n), np.int32(T), np.int64(C)))
    return out


def _kxy(geom):
    import cupy as cp

    k = getattr(geom, "_kxy_f64", None)
    if k is None:
        k = cp.ascontiguousarray(cp.asarray(geom.kxy, dtype=cp.float64))
        geom._kxy_f64 = k
    return k
