#!/bin/bash
# GPU run B (issues 4, 5, 6, 8): one-GPU scaling points with phases (reconstruct, refine3d and class2d, one
# iteration each, box 128, 50k particles), the E-step's GEMM flop rate, class2d on 100k particles K=100 and
# class3d on 50k particles K=4 (seconds per iteration).
# From the repo root on the device, wheels in .whl/:  bash benchmarks/gpu_session2_b.sh "$OUT"
set -u
OUT=${1:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
nvidia-smi -L > "$OUT/device.txt"
D=/tmp/d128
timeout 120 python3 -m mpi_em simulate --out $D --box 128 --n 100000 --snr 0.05 --apix 1.5 --per-stack 5000 --seed 11 2>&1 | tail -1
python3 - <<'PY'
import mrcfile, numpy as np
from mpi_em.em.model import lowpass
v = mrcfile.read('/tmp/d128/truth.mrc').astype(np.float64)
with mrcfile.new('/tmp/d128/start.mrc', overwrite=True) as m:
    m.set_data(lowpass(v, 128, 1.5, 30.0).astype(np.float32)); m.voxel_size = 1.5
PY
timeout 200 python3 benchmarks/scaling/scaling.py --box 128 --apix 1.5 --n 50000 --ranks 1 --device gpu --K 100 \
  --batch 1024 --data $D --out "$OUT/scaling" 2>&1 | grep -v "^+" | tail -30
timeout 170 /usr/bin/time -f "wall %e s, max RSS %M kB" python3 -m mpi_em class2d --i $D/particles_unaligned.star \
  --o /tmp/c2d --K 100 --iter 2 --device gpu --batch 1024 2>&1 | grep -v "inserted" | tee "$OUT/class2d_100k_K100.log" | tail -8
cp /tmp/c2d/run_timings.json "$OUT/class2d_100k_K100_timings.json" 2>/dev/null; cp /tmp/c2d/run_classes.png "$OUT/class2d_100k_K100.png" 2>/dev/null
python3 -c "
import starfile
b = starfile.read('$D/particles_unaligned.star', always_dict=True); b['particles'] = b['particles'].iloc[:50000]
starfile.write(b, '$D/p50k_unaligned.star', float_format=None)"
timeout 150 /usr/bin/time -f "wall %e s, max RSS %M kB" python3 -m mpi_em class3d --i $D/p50k_unaligned.star --ref $D/start.mrc \
  --ini-high 30 --o /tmp/c3d --K 4 --iter 2 --device gpu --batch 1024 2>&1 | grep -v "inserted" | tee "$OUT/class3d_50k_K4.log" | tail -6
cp /tmp/c3d/run_timings.json "$OUT/class3d_50k_K4_timings.json" 2>/dev/null
