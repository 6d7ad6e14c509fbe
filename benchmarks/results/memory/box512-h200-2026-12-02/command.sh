#!/usr/bin/env bash
# class3d box-256 phases; box-512 reconstruct and refine3d memory at P = 1 and 2 ranks on one GPU (one H200)
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
R=/tmp/res; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/device.txt
python3 -c "import cupy, numpy, mpi4py; print('cupy', cupy.__version__, 'numpy', numpy.__version__, 'mpi4py', mpi4py.__version__)" >> $R/device.txt
peak() {  # peak NAME CMD...: runs CMD with nvidia-smi sampled every 0.2 s
  local name=$1; shift
  ( while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; sleep 0.2; done ) > /tmp/smi_$name.txt &
  local s=$!; local t0=$(date +%s.%N)
  "$@" > $R/$name.log 2>&1; local rc=$?
  local t1=$(date +%s.%N); kill $s
  echo "$name rc=$rc wall=$(python3 -c "print(round($t1-$t0,1))") s peak=$(sort -n /tmp/smi_$name.txt | tail -1) MiB" >> $R/summary.txt
}
echo "== sim256 $(date)" >> $R/progress.txt
python3 -m mpi_em --quiet simulate --out /tmp/d256 --box 256 --n 5000 --snr 0.05 --apix 1.5 --seed 1 --per-stack 1000 > /dev/null 2>&1
python3 - <<'PY'
import mrcfile, numpy as np
from mpi_em.em.model import lowpass
t = mrcfile.read('/tmp/d256/truth.mrc').astype(np.float64)
with mrcfile.new('/tmp/d256/start.mrc', overwrite=True) as m:
    m.set_data(np.asarray(lowpass(t, 256, 1.5, 30.0)).astype(np.float32)); m.voxel_size = 1.5
PY
echo "== class3d256 $(date)" >> $R/progress.txt
MPI_EM_TIMING_DETAIL=1 peak class3d256 mpirun -n 1 python3 -m mpi_em class3d --i /tmp/d256/particles_unaligned.star \
  --ref /tmp/d256/start.mrc --K 4 --iter 3 --ini-high 30 --o /tmp/c256
cp /tmp/c256/run_timings.json $R/class3d256_timings.json 2>/dev/null
echo "== sim512 $(date)" >> $R/progress.txt
python3 -m mpi_em --quiet simulate --out /tmp/d512 --box 512 --n 3000 --snr 0.05 --apix 1.0 --seed 1 --per-stack 500 > /dev/null 2>&1
for P in 1 2; do
  echo "== rec512 P$P $(date)" >> $R/progress.txt
  MPI_EM_TIMING_DETAIL=1 peak rec512_P$P mpirun -n $P --oversubscribe python3 -m mpi_em reconstruct --i /tmp/d512/particles.star --o /tmp/rec512_$P --device gpu
  cp /tmp/rec512_$P/run.json $R/rec512_P$P.json 2>/dev/null
done
for P in 1 2; do
  echo "== ref512 P$P $(date)" >> $R/progress.txt
  MPI_EM_TIMING_DETAIL=1 peak ref512_P$P mpirun -n $P --oversubscribe python3 -m mpi_em refine3d --i /tmp/d512/particles_unaligned.star \
    --ref /tmp/d512/truth.mrc --ini-high 30 --iter 2 --o /tmp/ref512_$P
  cp /tmp/ref512_$P/run_timings.json $R/ref512_P${P}_timings.json 2>/dev/null
  cp /tmp/ref512_$P/run.json $R/ref512_P${P}_run.json 2>/dev/null
done
echo "== done $(date)" >> $R/progress.txt
