#!/bin/bash
# GPU run G (issue 7): batches read into page-locked memory vs pageable, refine3d one iteration (box 128, 50k),
# warm; GPU tests.
set -u
OUT=${1:-/tmp/out}; R=/tmp/runG; mkdir -p "$OUT" $R
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -2 | tee $R/gpu_tests.txt
D=/tmp/d; timeout 100 python3 -m mpi_em simulate --out $D --box 128 --n 50000 --snr 0.05 --apix 1.5 --per-stack 5000 --seed 11 2>&1 | tail -1
python3 - <<'PY'
import mrcfile, numpy as np
from mpi_em.em.model import lowpass
v = mrcfile.read('/tmp/d/truth.mrc').astype(np.float64)
with mrcfile.new('/tmp/d/start.mrc', overwrite=True) as m:
    m.set_data(lowpass(v, 128, 1.5, 30.0).astype(np.float32)); m.voxel_size = 1.5
PY
for p in 1 0 1 0; do
  MPI_EM_PINNED=$p timeout 60 python3 -m mpi_em refine3d --i $D/particles_unaligned.star --ref $D/start.mrc \
    --ini-high 30 --o /tmp/r --device gpu --batch 1024 --iter 1 >/dev/null 2>&1
  python3 -c "
import json; it = json.load(open('/tmp/r/run_timings.json'))[-1]; s = it['per_rank'][0]['seconds']
print('pinned=$p', 'iteration %.2f s' % it['seconds_iteration'], 'E-step %.2f s' % it['per_rank'][0]['seconds_estep'], 'read %.2f prepare %.2f' % (s['read'], s['prepare']))" | tee -a $R/pinned.txt
done
tar czf "$OUT/runG.tgz" -C /tmp runG
