"""Bit-exact round trips of the accumulator codec (mpi_em.codec)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import require_gpu

from mpi_em import codec


def same_bits(a, b) -> bool:
    a = np.ascontiguousarray(a)
    b = np.ascontiguousarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def radius(shape):
    nz, ny, nx = shape
    kz = np.fft.fftfreq(nz, 1.0 / nz)
    ky = np.fft.fftfreq(ny, 1.0 / ny)
    kx = np.arange(nx)
    return np.sqrt(kz[:, None, None] ** 2 + ky[None, :, None] ** 2 + kx[None, None, :] ** 2)


def accumulator(npix, r_max, seed=0, dtype=np.complex64, lead=()):
    """Random complex values decaying like 1/(1+r)^2 inside the half-ball, exact zeros outside."""
    rng = np.random.default_rng(seed)
    shape = tuple(lead) + (npix, npix, npix // 2 + 1)
    r = radius(shape[-3:])
    amp = 1e3 / (1.0 + r) ** 2
    data = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) * amp
    data[..., r > r_max] = 0
    return data.astype(dtype)


def special_values(dtype, n=4096, seed=1):
    """Random data sprinkled with NaNs of many payloads, -0.0, +-inf, denormals."""
    rng = np.random.default_rng(seed)
    real = np.dtype(dtype).type(0).real.dtype
    uint = np.dtype(f"u{real.itemsize}")
    count = n * (2 if np.dtype(dtype).kind == "c" else 1)
    x = rng.standard_normal(count).astype(real)
    bits = x.view(uint)
    nbits = real.itemsize * 8
    mant = nbits - 1 - {4: 8, 8: 11}[real.itemsize]
    exp_all = ((1 << (nbits - 1 - mant)) - 1) << mant
    sign = 1 << (nbits - 1)
    pos = rng.permutation(count)
    k = count // 8
    payloads = rng.integers(1, 1 << min(mant, 62), size=k, dtype=np.uint64).astype(uint)
    bits[pos[:k]] = exp_all | payloads  # quiet and signalling NaNs, arbitrary payloads
    bits[pos[k:2 * k:2]] |= sign  # negative NaNs
    x[pos[2 * k:3 * k]] = -0.0
    x[pos[3 * k:3 * k + 10]] = np.inf
    x[pos[3 * k + 10:3 * k + 20]] = -np.inf
    bits[pos[3 * k + 20:4 * k]] = rng.integers(1, 1 << min(mant, 62), size=4 * k - 3 * k - 20,
                                               dtype=np.uint64).astype(uint)  # denormals
    return x.view(dtype) if np.dtype(dtype).kind == "c" else x


DTYPES = [np.float32, np.float64, np.complex64, np.complex128]


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_round_trip(dtype):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((17, 9, 5)).astype(dtype) if np.dtype(dtype).kind == "f" else \
        (rng.standard_normal((17, 9, 5)) + 1j * rng.standard_normal((17, 9, 5))).astype(dtype)
    b = codec.decompress(codec.compress(a))
    assert same_bits(a, b)
    assert b.flags.writeable and b.flags.c_contiguous


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_round_trip(dtype):
    a = special_values(dtype)
    assert np.isnan(a).any() if np.dtype(dtype).kind == "f" else np.isnan(a.real).any()
    for level in (1, 3, 19):
        assert same_bits(a, codec.decompress(codec.compress(a, level=level)))
    # also through the packed path: special values inside the ball of a volume
    npix = 16
    vol = np.zeros((npix, npix, npix // 2 + 1), dtype)
    mask = codec.halfball_mask(vol.shape, 6)
    vol[mask] = a[: int(mask.sum())]
    assert same_bits(vol, codec.decompress(codec.compress(vol, r_max=6)))
    assert same_bits(vol, codec.unpack(codec.pack(vol, 6), vol.shape, 6, vol.dtype))


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.uint16, np.int64, np.bool_, ">f4", "<c8"])
def test_other_dtypes_round_trip(dtype):
    rng = np.random.default_rng(3)
    a = (rng.integers(0, 200, size=(4, 8, 8, 5)) % 7).astype(dtype)
    assert same_bits(a, codec.decompress(codec.compress(a)))
    b = np.zeros_like(a)
    mask = codec.halfball_mask(a.shape[1:], 3)
    b[:, mask] = a[:, mask]
    assert same_bits(b, codec.decompress(codec.compress(b, r_max=3)))


def test_sparse_and_edge_shapes():
    a = np.zeros((40, 40, 21), np.float32)
    a[3, 5, 7] = 1.5
    a[-1, -1, -1] = -np.float32(1e-42)
    blob = codec.compress(a)
    assert len(blob) < a.nbytes / 50
    assert same_bits(a, codec.decompress(blob))
    for arr in (np.zeros((0,), np.float64), np.zeros((0, 4, 3), np.complex64), np.float32(np.nan).reshape(()),
                np.arange(10.0)[::3]):
        assert same_bits(np.ascontiguousarray(arr), codec.decompress(codec.compress(arr)))


def test_mask_count_brute_force():
    for shape, r_max in [((32, 32, 17), 8), ((32, 32, 17), 16), ((15, 12, 7), 5.5), ((16, 16, 9), 0)]:
        nz, ny, nx = shape
        count = 0
        for z in range(nz):
            kz = z if z < nz / 2 else z - nz
            for y in range(ny):
                ky = y if y < ny / 2 else y - ny
                for x in range(nx):
                    if kz * kz + ky * ky + x * x <= r_max * r_max:
                        count += 1
        mask = codec.halfball_mask(shape, r_max)
        idx = codec.halfball_index(shape, r_max)
        assert mask.shape == shape and mask.dtype == bool
        assert int(mask.sum()) == count == idx.size == codec.halfball_count(shape, r_max)
        assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)
        assert np.array_equal(np.flatnonzero(mask), idx)
    assert codec.halfball_index((32, 32, 17), 8) is codec.halfball_index((32, 32, 17), 8.0)  # cached


@pytest.mark.parametrize("lead", [(), (2,), (2, 3)])
def test_pack_unpack_round_trip(lead):
    a = accumulator(32, 8, lead=lead)
    p = codec.pack(a, 8)
    n = codec.halfball_count(a.shape[-3:], 8)
    assert p.shape == tuple(lead) + (n,) and p.flags.c_contiguous and p.dtype == a.dtype
    assert same_bits(a, codec.unpack(p, a.shape, 8, a.dtype))
    assert same_bits(a, codec.decompress(codec.compress(a, r_max=8)))


def test_compress_refuses_data_outside_ball():
    a = accumulator(32, 8)
    a[0, 0, 12] = 1e-3  # radius 12 > 8
    with pytest.raises(ValueError, match="outside"):
        codec.compress(a, r_max=8)
    b = np.zeros((32, 32, 17), np.float32)
    b[16, 0, 0] = -0.0  # a negative zero is data too
    with pytest.raises(ValueError):
        codec.compress(b, r_max=8)
    with pytest.raises(ValueError):
        codec.CompressedBuffer.from_array(a, r_max=8)
    # check=False: the deliberate, lossy use drops the outside voxel
    out = codec.decompress(codec.compress(a, r_max=8, check=False))
    assert out[0, 0, 12] == 0 and np.array_equal(out[0, 0, :9], a[0, 0, :9])
    with pytest.raises(ValueError):
        codec.compress(a, r_max=-1)
    with pytest.raises(ValueError):
        codec.compress(np.zeros((4, 4)), r_max=2)


def test_header_and_bad_blobs():
    a = accumulator(32, 8, lead=(2,))
    blob = codec.compress(a, r_max=8)
    info = codec.blob_info(blob)
    assert info["shape"] == a.shape and info["dtype"] == a.dtype and info["r_max"] == 8 and info["packed"]
    assert info["nbytes_raw"] == a.nbytes
    with pytest.raises(ValueError):
        codec.decompress(b"XXXX" + blob[4:])
    with pytest.raises(Exception):
        codec.decompress(blob[:-5])


def test_realistic_accumulator_ratio(capsys):
    npix = 64
    r_max = npix // 4
    a = accumulator(npix, r_max)
    m = codec.measure(a, r_max, repeats=1)
    assert m["exact"]
    assert m["nbytes_raw"] == a.nbytes
    assert m["ratio"] >= 3.3, m
    frac = codec.halfball_count(a.shape, r_max) / np.prod(a.shape)
    with capsys.disabled():
        print(f"\n[codec] Np={npix} r_max={r_max} complex64: in-ball fraction {frac:.3f}, "
              f"ratio {m['ratio']:.2f} ({100 * (1 - 1 / m['ratio']):.1f}% saved)")
    # without r_max the same data still round-trips (ratio then only from zeros + shuffle)
    assert same_bits(a, codec.decompress(codec.compress(a)))


def test_compressed_buffer_and_transit():
    a = accumulator(32, 8, lead=(2,))
    cb = codec.CompressedBuffer.from_array(a, r_max=8)
    assert cb.nbytes < cb.nbytes_raw == a.nbytes
    assert same_bits(a, cb.to_array())
    msg = codec.compress_for_send(a, r_max=8)
    assert msg.dtype == np.uint8 and msg.ndim == 1
    received = np.empty(msg.size, np.uint8)  # as filled by comm.Recv
    received[:] = msg
    assert same_bits(a, codec.decompress_received(received))


def test_threads_option():
    a = accumulator(32, 16)
    assert same_bits(a, codec.decompress(codec.compress(a, r_max=16, threads=2)))


@pytest.mark.gpu
def test_gpu_round_trip():
    cp = require_gpu()
    a = accumulator(32, 8, lead=(2,))
    d = cp.asarray(a)
    blob = codec.compress(d, r_max=8)
    assert same_bits(a, codec.decompress(blob))
    back = codec.decompress(blob, xp=cp)
    assert isinstance(back, cp.ndarray)
    assert same_bits(a, cp.asnumpy(back))
    p = codec.pack(d, 8)
    assert isinstance(p, cp.ndarray) and same_bits(codec.pack(a, 8), cp.asnumpy(p))
    d[0, 0, 0, 12] = 1
    with pytest.raises(ValueError):
        codec.compress(d, r_max=8)
    s = cp.asarray(special_values(np.float64))
    assert same_bits(cp.asnumpy(s), cp.asnumpy(codec.decompress(codec.compress(s), xp=cp)))
    cb = codec.CompressedBuffer.from_array(cp.asarray(a), r_max=8)
    assert same_bits(a, cp.asnumpy(cb.to_array(xp=cp)))
