#!/bin/bash
# GPU run K (session 3; issue 7): after the three 3D kernels (insertion, projection, symmetrise) were moved onto one
# trilinear-stencil device function: GPU tests; insertion/projection throughput and the symmetry anchor again
# (same command as session 2's insert_gpu.json and run H), to check that nothing slowed down.
# From the repo root on the device, wheels in .whl/:  bash benchmarks/gpu_session3_d.sh "$OUT"
set -u
OUT=${1:-/tmp/out}; . benchmarks/gpu_setup.sh; gpu_setup runK
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -3 | tee $R/gpu_tests.txt
timeout 300 python3 benchmarks/bench_insert.py --device gpu --box 64 128 256 --project --anchor-n 100000 \
  --json $R/insert_gpu.json 2>&1 | tee $R/insert_gpu.txt | tail -25
tar czf "$OUT/runK.tgz" -C /tmp runK
