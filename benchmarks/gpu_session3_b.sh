#!/bin/bash
# GPU run I (session 3; issues 7, 4): after the E-step changes (shared GEMM operands cached per reference set, the
# norm subtracted after the marginal, one fused pass for the marginal over translations, top-k by argmax, CTFs
# and shifts at the in-ball points only, gold FSC from the down-sampled accumulators): GPU tests; bench_estep at
# the job's default offset range (3 px) and RELION's (5 px); refine3d box 128 / 50k as in run D (same data and
# command), warm, with its map and angular error vs truth.
# From the repo root on the device, wheels in .whl/:  bash benchmarks/gpu_session3_b.sh "$OUT"
set -u
OUT=${1:-/tmp/out}; . benchmarks/gpu_setup.sh; gpu_setup runI
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -3 | tee $R/gpu_tests.txt
for off in 3 5; do
  timeout 150 python3 benchmarks/bench_estep.py --device gpu --box 128 --n 8192 --batch 1024 --order 3 --r 29 \
    --offset-range $off --json $R/estep_order3_off$off.json 2>&1 | tee $R/estep_order3_off$off.txt
done
D=/tmp/d128
gpu_data $D 50000
# warm-up (kernel compilation), then the timed run (run D's command)
timeout 100 python3 -m mpi_em refine3d --i $D/particles_unaligned.star --ref $D/start.mrc --ini-high 30 --o /tmp/warm \
  --device gpu --batch 1024 --max-order 3 --iter 2 >/dev/null 2>&1
timeout 150 python3 -m mpi_em refine3d --i $D/particles_unaligned.star --ref $D/start.mrc --ini-high 30 --o /tmp/ref \
  --device gpu --batch 1024 --max-order 3 --iter 5 2>&1 | grep -E "iteration|finished" > $R/refine3d.log
cp /tmp/ref/run_timings.json $R/refine3d_timings.json
python3 - <<'PY' 2>&1 | tee $R/refine3d_eval.txt
import json, mrcfile, numpy as np
from mpi_em.evaluate import pose_errors
from mpi_em.fsc import fsc, resolution_at
t = mrcfile.read('/tmp/d128/truth.mrc')
m = mrcfile.read('/tmp/ref/run_class001.mrc')
a, _ = pose_errors('/tmp/ref/run_data.star', '/tmp/d128/particles.star')
print('map vs truth FSC 0.5 %.2f A, median angular error %.2f deg' % (resolution_at(fsc(m, t), 128, 1.5, 0.5), np.median(a)))
ceil = json.load(open('/tmp/runI/estep_order3_off3.json'))['sgemm_ceiling_TFLOPs']
for r in json.load(open('/tmp/ref/run_timings.json')):
    p = r['per_rank'][0]; f = sum(p['flops'].values()); e = p['seconds_estep']
    ph = ' '.join('%s %.2f' % (k, v) for k, v in p['seconds'].items())
    print('iteration %d: %.2f s, E-step %.2f s, %.1f TFLOP/s = %.0f%% of SGEMM %.1f; %s' % (r['iteration'], r['seconds_iteration'], e, f / e / 1e12, 100 * f / e / 1e12 / ceil, ceil, ph))
PY
tar czf "$OUT/runI.tgz" -C /tmp runI
