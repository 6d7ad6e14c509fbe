#!/bin/bash
# Known-pose reconstruction on the GPU, end to end, on 1 and 2 ranks (2 ranks share the one GPU): seconds and
# phases (run.json), the gold-standard FSC, and the largest difference between the 1-rank and 2-rank maps.
#   bash benchmarks/reconstruct.sh OUT NAME                     # from the repo root on the device, wheels in .whl/
# Environment: BOX (128), N (20 000), APIX (1.5), BATCH (2048); SNR 0.05; TESTS=1 runs the GPU tests first.
# The box-256 measurement: BOX=256 N=10000 APIX=1.0 BATCH=1024.
set -u
OUT=${1:-/tmp/out}; . benchmarks/gpu_setup.sh; gpu_setup ${2:-reconstruct}
BOX=${BOX:-128}; D=/tmp/rec$BOX
[ -z "${TESTS:-}" ] || gpu_tests tests/test_gpu.py tests/test_codec.py tests/test_fourier.py tests/test_ctf.py
timeout 200 python3 -m mpi_em simulate --out $D --box $BOX --n ${N:-20000} --snr 0.05 --apix ${APIX:-1.5} \
  --per-stack 2000 2>&1 | tail -1
for P in 1 2; do
  timeout 200 /usr/bin/time -f "wall %e s, max RSS %M kB" mpirun -n $P --oversubscribe python3 -m mpi_em reconstruct \
    --i $D/particles.star --o $D/rec$P --device gpu --batch ${BATCH:-2048} 2>&1 | grep -v inserted \
    | tee -a $R/reconstruct$BOX.txt
  cp $D/rec$P/run.json $R/reconstruct${BOX}_P$P.json
done
python3 -m mpi_em fsc $D/rec1/map.mrc $D/rec2/map.mrc | tee -a $R/reconstruct$BOX.txt
python3 - $D <<'PY' | tee -a $R/reconstruct$BOX.txt
import sys, mrcfile, numpy as np
a = mrcfile.read(f'{sys.argv[1]}/rec1/map.mrc'); b = mrcfile.read(f'{sys.argv[1]}/rec2/map.mrc')
print('1-rank vs 2-rank GPU map: max |diff| / max |map| =', float(np.abs(a - b).max() / np.abs(a).max()))
PY
cp $D/rec1/fsc.png $R/reconstruct${BOX}_fsc.png
gpu_pack
