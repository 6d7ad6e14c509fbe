#!/bin/bash
# refine3d on 1 rank vs 2 ranks, box 128 (benchmarks/gpu_setup.sh's data): the same poses from both, seconds per
# iteration, and the phases that only exist at P >= 2 (reduce-scatter, distributed reconstruction) with the bytes
# each rank sends (benchmarks/refine3d_eval.py --compare).
#   bash benchmarks/refine3d_ranks.sh OUT NAME [MODE]          # from the repo root on the device, wheels in .whl/
# MODE:
#   one-gpu   (default) 2 ranks sharing one GPU vs 1 rank: $N = 20 000 particles, 2 iterations at the default
#             sampling, plain mpirun (1 rank twice: the first run compiles the kernels)
#   two-gpus  1 vs 2 GPUs of one host: $N = 50 000 particles, auto-sampling to order 5, at most 25 iterations, the
#             true-pose reconstruction (KNOWN=0: none) and the GPU tests (TESTS=0: none) first; WARM=I: a 2-rank
#             warm-up of I iterations first (CuPy's on-disk kernel cache: no timed refinement pays compilation);
#             LAUNCH=1: every run started by launch/mpi-em-run (CPU threads per rank = cores / ranks, each rank
#             through launch/gpu-bind) instead of `mpirun --bind-to none`
#   binding   2 ranks on 2 GPUs, 4 iterations after a warm-up, started four ways: (a) plain mpirun, (b) CPU threads
#             per rank limited (OMP/OpenBLAS = 16), (c) as (b) with each rank seeing only its own GPU
#             (CUDA_VISIBLE_DEVICES per local rank), (d) 1 rank; per-rank E-step phases (summary.txt) and the
#             GPU topology and clocks (topo.txt)
set -u
OUT=${1:-/tmp/out}; MODE=${3:-one-gpu}; . benchmarks/gpu_setup.sh; gpu_setup ${2:-ranks}
D=/tmp/d128
pre() { if [ -n "${LAUNCH:-}" ]; then echo "launch/mpi-em-run -n $1 --"; else echo "mpirun -n $1 --bind-to none --oversubscribe"; fi; }
ref() {  # output folder, iterations, max order, launcher words...
  local out=$1 it=$2 mo=$3; shift 3
  timeout 300 "$@" python3 -m mpi_em refine3d --i $D/particles_unaligned.star --ref $D/start.mrc --ini-high 30 \
    --o $out --device gpu --batch 1024 --iter $it ${mo:+--max-order $mo} 2>&1
}
case $MODE in
  one-gpu)
    gpu_data $D ${N:-20000}
    for P in 1 1 2; do
      ref /tmp/r$P 2 "" $(pre $P) | grep -E "placement|iteration|finished" > $R/refine3d_P$P.log
      cp /tmp/r$P/run_timings.json $R/refine3d_P${P}_timings.json
    done
    python3 benchmarks/refine3d_eval.py $D 1rank=/tmp/r1 2ranks=/tmp/r2 --compare | tee $R/compare.txt ;;
  two-gpus)
    [ "${TESTS:-1}" = 0 ] || gpu_tests
    gpu_data $D ${N:-50000}
    [ "${KNOWN:-1}" = 0 ] || timeout 100 python3 -m mpi_em reconstruct --i $D/particles.star --o /tmp/known \
      --device gpu 2>&1 | tail -1 > $R/known.log
    [ -z "${WARM:-}" ] || ref /tmp/warm $WARM 5 $(pre 2) > /dev/null
    for P in 1 2; do
      ref /tmp/r$P 25 5 $(pre $P) | grep -E "placement|rank|iteration|finished|converged" > $R/refine3d_P$P.log
      cp /tmp/r$P/run_timings.json $R/refine3d_P${P}_timings.json
    done
    python3 benchmarks/refine3d_eval.py $D 1gpu=/tmp/r1 2gpus=/tmp/r2 --compare \
      $([ "${KNOWN:-1}" = 0 ] || echo --known /tmp/known) 2>&1 | tee $R/eval.txt ;;
  binding)
    gpu_data $D ${N:-50000}
    q() { ref /tmp/q 4 5 "$@" > /dev/null; }
    q mpirun -n 2 --bind-to none
    for v in a b c d; do
      case $v in
        a) q mpirun -n 2 --bind-to none ;;
        b) q mpirun -n 2 --bind-to none -x OMP_NUM_THREADS=16 -x OPENBLAS_NUM_THREADS=16 ;;
        c) q mpirun -n 2 --bind-to none -x OMP_NUM_THREADS=16 -x OPENBLAS_NUM_THREADS=16 \
             bash -c 'CUDA_VISIBLE_DEVICES=$OMPI_COMM_WORLD_LOCAL_RANK exec "$0" "$@"' ;;
        d) q mpirun -n 1 --bind-to none ;;
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
    nvidia-smi topo -m > $R/topo.txt 2>&1
    nvidia-smi -q -d CLOCK,PERFORMANCE | grep -E "GPU 0|Graphics|SM  |Performance State" | head -20 >> $R/topo.txt ;;
  *) echo "unknown mode $MODE (one-gpu, two-gpus, binding)"; exit 2 ;;
esac
gpu_pack
