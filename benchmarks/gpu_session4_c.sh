#!/bin/bash
# GPU run Q (session 4): why is rank 0 of 2 ranks on 2 H200s ~1.8x slower than rank 1 in the E-step's
# launch-bound phases (run P)? Box 128, 50 000 particles, refine3d 4 iterations, after a warm-up run that compiles
# every kernel: (a) plain mpirun as in runs N/P; (b) CPU threads per rank limited (OMP/OpenBLAS = 16, as
# launch/mpi-em-run does); (c) each rank sees only its own GPU (CUDA_VISIBLE_DEVICES per local rank); (d) 1 rank.
# From the repo root on the device, wheels in .whl/:  bash benchmarks/gpu_session4_c.sh "$OUT"
set -u
OUT=${1:-/tmp/out}; . benchmarks/gpu_setup.sh; gpu_setup runQ
D=/tmp/d128
gpu_data $D 50000
ref() { timeout 120 "$@" python3 -m mpi_em refine3d --i $D/particles_unaligned.star --ref $D/start.mrc --ini-high 30 \
  --o /tmp/q --device gpu --batch 1024 --max-order 5 --iter 4 > /dev/null 2>&1; }
ref mpirun -n 2 --bind-to none
for v in a b c d; do
  case $v in
    a) ref mpirun -n 2 --bind-to none ;;
    b) ref mpirun -n 2 --bind-to none -x OMP_NUM_THREADS=16 -x OPENBLAS_NUM_THREADS=16 ;;
    c) ref mpirun -n 2 --bind-to none -x OMP_NUM_THREADS=16 -x OPENBLAS_NUM_THREADS=16 \
         bash -c 'CUDA_VISIBLE_DEVICES=$OMPI_COMM_WORLD_LOCAL_RANK exec "$0" "$@"' ;;
    d) ref mpirun -n 1 --bind-to none ;;
  esac
  cp /tmp/q/run_timings.json $R/timings_$v.json
  python3 - $R/timings_$v.json $v <<'PY' | tee -a $R/summary.txt
import json, sys
for it in json.load(open(sys.argv[1]))[1:]:
    print(sys.argv[2], 'iteration', it['iteration'], '%.2f s' % it['seconds_iteration'],
          ' | '.join('rank %d E %.2f: %s' % (r, p['seconds_estep'], ' '.join('%s %.3f' % (k, v) for k, v in p['seconds'].items()
          if k in ('prepare', 'coarse', 'fine', 'insert', 'stats'))) for r, p in enumerate(it['per_rank'])))
PY
done
nvidia-smi topo -m > $R/topo.txt 2>&1; nvidia-smi -q -d CLOCK,PERFORMANCE | grep -E "GPU 0|Graphics|SM  |Performance State" | head -20 >> $R/topo.txt
tar czf "$OUT/runQ.tgz" -C /tmp runQ
