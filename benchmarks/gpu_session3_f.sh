#!/bin/bash
# GPU run M (session 3; issues 4, 7, 8): run J's script again after the plain reduce-scatter sends only the data
# cube of the current size: refine3d with 2 ranks sharing the one GPU vs 1 rank, same poses, and the cost of the
# phases that only exist at P >= 2 (host-staged reduce-scatter and distributed FFT) at box 128.
# From the repo root on the device, wheels in .whl/:  bash benchmarks/gpu_session3_f.sh "$OUT"
exec bash benchmarks/gpu_session3_c.sh "${1:-/tmp/out}" runM
