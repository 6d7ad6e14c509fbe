#!/bin/bash
# GPU run J (session 3; issues 4, 7, 8): run F again after the gold FSC moved to Fourier space (one distributed
# reconstruction per iteration instead of two) and the E-step changes: refine3d with 2 ranks sharing the one GPU vs
# 1 rank: same poses, and the cost of the phases that only exist at P >= 2 (host-staged reduce-scatter and
# distributed FFT) at box 128.
set -u
OUT=${1:-/tmp/out}; . benchmarks/gpu_setup.sh; gpu_setup ${2:-runJ}   # run M: the same script, gpu_setup runM
D=/tmp/d
gpu_data $D 20000
for P in 1 1 2; do
  timeout 120 mpirun -n $P --oversubscribe python3 -m mpi_em refine3d --i $D/particles_unaligned.star --ref $D/start.mrc \
    --ini-high 30 --o /tmp/r$P --device gpu --batch 1024 --iter 2 2>&1 | grep -E "placement|iteration|finished" > $R/refine3d_P$P.log
  cp /tmp/r$P/run_timings.json $R/refine3d_P${P}_timings.json
done
python3 - <<'PY' | tee $R/compare.txt
import json, numpy as np
from mpi_em.io import read_particles
a, b = read_particles('/tmp/r1/run_data.star'), read_particles('/tmp/r2/run_data.star')
pa = np.stack([a.rot, a.tilt, a.psi, a.origin_x, a.origin_y], 1); pb = np.stack([b.rot, b.tilt, b.psi, b.origin_x, b.origin_y], 1)
print('1 vs 2 ranks on one GPU: identical poses %.4f' % np.all(np.abs(pa - pb) < 1e-3, axis=1).mean())
for P in (1, 2):
    for it in json.load(open(f'/tmp/r{P}/run_timings.json')):
        ph = {k: max(r['seconds'].get(k, 0) for r in it['per_rank']) for k in ('reduce', 'reconstruct')}
        print(P, 'ranks, iteration', it['iteration'], 'total %.2f s' % it['seconds_iteration'], 'reduce %.3f s reconstruct %.3f s' % (ph['reduce'], ph['reconstruct']),
              'bytes sent %.0f MB' % (max(r['bytes'].get('reduce_sent', 0) for r in it['per_rank']) / 1e6))
PY
tar czf "$OUT/${2:-runJ}.tgz" -C /tmp ${2:-runJ}
