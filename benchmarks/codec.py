#!/usr/bin/env python
"""Compression ratio and throughput of mpi_em.codec on realistic Fourier accumulators.

For each Np, builds the two accumulators of a reconstruction (complex64 data, float32 weights) in FFT
layout (Np, Np, Np//2+1), with magnitudes decaying with radius and exact zeros outside r_max, for
r_max = Np/8, Np/4, Np/2 (early low-resolution iterations ... full resolution), and measures
compress/decompress (half-ball pack + byte shuffle + zstd). MB/s are of raw full-volume bytes.

    python benchmarks/codec.py --np 128 256 --device cpu --json codec.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zstandard  # noqa: E402

from mpi_em import codec  # noqa: E402
from mpi_em.backend import get_xp  # noqa: E402


def radius(npix: int) -> np.ndarray:
    k = np.fft.fftfreq(npix, 1.0 / npix).astype(np.float32)
    kx = np.arange(npix // 2 + 1, dtype=np.float32)
    return np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)


def build(npix: int, r_max: float, seed: int = 0):
    """(data complex64, weights float32), host arrays, zero outside the half-ball of r_max."""
    rng = np.random.default_rng(seed)
    shape = (npix, npix, npix // 2 + 1)
    r = radius(npix)
    outside = r > r_max
    amp = (1e4 / (1.0 + r) ** 2).astype(np.float32)
    data = np.empty(shape, np.complex64)
    data.real = rng.standard_normal(shape, dtype=np.float32) * amp
    data.imag = rng.standard_normal(shape, dtype=np.float32) * amp
    data[outside] = 0
    # weights: sums of CTF^2 over many particles: positive, smooth in r, with per-voxel noise
    weights = (5e3 * (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)) / (1.0 + r / 8.0)).astype(np.float32)
    weights[outside] = 0
    return data, weights


def machine_info(device: str, xp) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "zstandard": zstandard.__version__,
        "zstd_library": zstandard.ZSTD_VERSION if hasattr(zstandard, "ZSTD_VERSION") else None,
        "device": device,
    }
    if xp is not np:
        props = xp.cuda.runtime.getDeviceProperties(xp.cuda.runtime.getDevice())
        name = props["name"]
        info["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
        info["cupy"] = xp.__version__
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--np", type=int, nargs="+", default=[128, 256], help="box sizes (default 128 256)")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--level", type=int, default=3, help="zstd level (default 3)")
    ap.add_argument("--threads", type=int, default=0, help="zstd threads (0 = single thread)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)

    xp = get_xp(args.device)
    rows = []
    hdr = (f"{'Np':>5} {'buffer':>8} {'r_max':>6} {'raw MB':>8} {'packed MB':>10} {'compr MB':>9} "
           f"{'saved %':>8} {'ratio':>7} {'compr MB/s':>11} {'decomp MB/s':>12} {'exact':>6}")
    print(hdr)
    print("-" * len(hdr))
    t_all = time.perf_counter()
    for npix in args.np:
        for r_max in (npix / 8, npix / 4, npix / 2):
            data, weights = build(npix, r_max)
            for name, host in (("data", data), ("weights", weights)):
                buf = xp.asarray(host)
                m = codec.measure(buf, r_max, repeats=args.repeats, level=args.level, threads=args.threads)
                row = {
                    "Np": npix, "buffer": name, "dtype": str(host.dtype), "r_max": r_max,
                    "raw_MB": m["nbytes_raw"] / 1e6, "packed_MB": m["nbytes_packed"] / 1e6,
                    "compressed_MB": m["nbytes_compressed"] / 1e6,
                    "saved_percent": 100.0 * (1.0 - m["nbytes_compressed"] / m["nbytes_raw"]),
                    **m,
                }
                rows.append(row)
                print(f"{npix:>5} {name:>8} {r_max:>6g} {row['raw_MB']:>8.2f} {row['packed_MB']:>10.2f} "
                      f"{row['compressed_MB']:>9.2f} {row['saved_percent']:>8.1f} {m['ratio']:>7.2f} "
                      f"{m['compress_MBps']:>11.0f} {m['decompress_MBps']:>12.0f} {str(m['exact']):>6}",
                      flush=True)
                del buf
    elapsed = time.perf_counter() - t_all
    print(f"({elapsed:.1f} s; MB/s are raw full-volume bytes per second, best of {args.repeats}; "
          f"zstd level {args.level}, threads {args.threads})")
    if args.json:
        out = {
            "command": " ".join([Path(sys.executable).name] + sys.argv),
            "argv": sys.argv,
            "machine": machine_info(args.device, xp),
            "settings": {"level": args.level, "threads": args.threads, "repeats": args.repeats},
            "elapsed_s": elapsed,
            "results": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=float))
        print(f"wrote {args.json}")
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
