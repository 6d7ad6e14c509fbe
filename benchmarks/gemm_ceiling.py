#!/usr/bin/env python
"""GEMM ceilings of the GPU measured beside the E-step figures: SGEMM (FP32 math), SGEMM with TF32 math, CGEMM.

    python benchmarks/gemm_ceiling.py --n 8192 --json OUT.json
"""
from __future__ import annotations

import argparse
import json
import time


def rate(cp, n, dtype, tf32=False, repeats=5):
    import os

    a = cp.random.random((n, n)).astype(dtype)
    b = cp.random.random((n, n)).astype(dtype)
    os.environ["CUPY_TF32"] = "1" if tf32 else "0"
    mode = None
    try:  # CuPy reads CUPY_TF32 at import; switch the compute type explicitly where the API exists
        from cupy._core import _routines_linalg as rl

        mode = rl.get_compute_type(cp.dtype(dtype))
        rl.set_compute_type(cp.dtype(dtype), rl.COMPUTE_TYPE_TF32 if tf32 else rl.COMPUTE_TYPE_DEFAULT)
    except Exception:  # noqa: BLE001
        pass
    c = a @ b
    cp.cuda.get_current_stream().synchronize()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        c = a @ b
        cp.cuda.get_current_stream().synchronize()
        best = min(best, time.perf_counter() - t)
    if mode is not None:
        rl.set_compute_type(cp.dtype(dtype), mode)
    flops = 2.0 * n ** 3 * (4 if cp.dtype(dtype).kind == "c" else 1)
    del c
    return flops / best


def main():
    import cupy as cp

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    out = {"n": a.n, "gpu": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
           "sgemm_fp32_TFLOPs": rate(cp, a.n, cp.float32) / 1e12,
           "sgemm_tf32_TFLOPs": rate(cp, a.n, cp.float32, tf32=True) / 1e12,
           "cgemm_fp32_TFLOPs_real_equivalent": rate(cp, a.n // 2, cp.complex64) / 1e12}
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
