#!/bin/bash
# GPU run H (session 3; issues 7, 4): GPU tests incl. the symmetrise kernel; the symmetry anchor both ways
# (per-copy insertion vs RELION's symmetrised sum); where the E-step's time goes at box 128 (bench_estep).
# From the repo root on the device, wheels in .whl/:  bash benchmarks/gpu_session3_a.sh "$OUT"
set -u
OUT=${1:-/tmp/out}; . benchmarks/gpu_setup.sh; gpu_setup runH
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -3 | tee $R/gpu_tests.txt
timeout 150 python3 benchmarks/bench_insert.py --device gpu --box 64 --n 2000 --anchor-n 100000 \
  --json $R/anchor.json 2>&1 | tail -4 | tee $R/anchor.txt
for o in 3 2; do
  r=$([ $o = 3 ] && echo 29 || echo 21)
  timeout 200 python3 benchmarks/bench_estep.py --device gpu --box 128 --n 8192 --batch 1024 --order $o --r $r \
    --json $R/estep_order$o.json 2>&1 | tee $R/estep_order$o.txt
done
tar czf "$OUT/runH.tgz" -C /tmp runH
