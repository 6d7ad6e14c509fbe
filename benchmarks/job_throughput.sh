#!/bin/bash
# Seconds per iteration of the jobs on one GPU, box 128, 1.5 Å/px, SNR 0.05 (benchmarks/gpu_setup.sh's data,
# $N = 100 000 particles, the first 50 000 where a job says 50k), one MODE after the other:
#   bash benchmarks/job_throughput.sh OUT NAME MODE...          # from the repo root on the device, wheels in .whl/
# MODE:
#   phases    one iteration of reconstruct, refine3d (order-2 global search) and class2d (K = 100) on 50k, every
#             phase timed (benchmarks/scaling/scaling.py --ranks 1 --device gpu; WARMUP=1: each job once on 2000
#             particles first, so that kernel compilation is not timed)
#   class2d   class2d, all N particles, K = 100, 2 iterations (the first pass, then seconds per iteration)
#   class3d   class3d, 50k, K = 4, $C3D_ITER = 3 iterations, from the truth at 30 Å
#   refine3d  refine3d, 50k, $ITER = 5 iterations to order 3, once per $TF32 value (default "0 1": FP32 and TF32
#             likelihood GEMMs, CUPY_TF32), after a warm-up of $WARM = 2 iterations (0: none); map vs truth,
#             angular error and GEMM rate per iteration against the same run's SGEMM ceiling (--ceiling, 51)
#   pinned    refine3d, 50k, one iteration, batches read into page-locked vs pageable memory (MPI_EM_PINNED),
#             twice each, warm
set -u
OUT=${1:-/tmp/out}; . benchmarks/gpu_setup.sh; gpu_setup ${2:-throughput}; shift $(( $# < 2 ? $# : 2 ))
D=/tmp/d128
gpu_data $D ${N:-100000}
python3 - $D <<'PY'
import sys, starfile
d = sys.argv[1]
for name in ('particles', 'particles_unaligned'):
    b = starfile.read(f'{d}/{name}.star', always_dict=True); b['particles'] = b['particles'].iloc[:50000]
    starfile.write(b, f'{d}/p50k_{name}.star', float_format=None)
PY
ref() {  # output folder, iterations, options...
  local out=$1 it=$2; shift 2
  timeout 200 python3 -m mpi_em refine3d --i $D/p50k_particles_unaligned.star --ref $D/start.mrc --ini-high 30 \
    --o $out --device gpu --batch 1024 --iter $it "$@" 2>&1
}
T=/usr/bin/time; TF='wall %e s, max RSS %M kB'
for mode in "$@"; do
  case $mode in
    phases)
      timeout 300 python3 benchmarks/scaling/scaling.py --box 128 --apix 1.5 --n 50000 --ranks 1 --device gpu --K 100 \
        --batch 1024 ${WARMUP:+--warmup} --data $D --out $R/scaling 2>&1 | grep -v "^+" | tail -22 ;;
    class2d)
      timeout 300 $T -f "$TF" python3 -m mpi_em class2d --i $D/particles_unaligned.star --o /tmp/c2d --K 100 --iter 2 \
        --device gpu --batch 1024 2>&1 | grep -v inserted | tee $R/class2d_K100.log | tail -6
      cp /tmp/c2d/run_timings.json $R/class2d_K100_timings.json; cp /tmp/c2d/run_classes.png $R/class2d_K100.png ;;
    class3d)
      timeout 300 $T -f "$TF" python3 -m mpi_em class3d --i $D/p50k_particles_unaligned.star --ref $D/start.mrc \
        --ini-high 30 --o /tmp/c3d --K 4 --iter ${C3D_ITER:-3} --device gpu --batch 1024 2>&1 | grep -v inserted \
        | tee $R/class3d_50k_K4.log | tail -6
      cp /tmp/c3d/run_timings.json $R/class3d_50k_K4_timings.json ;;
    refine3d)
      [ "${WARM:-2}" = 0 ] || ref /tmp/warm ${WARM:-2} --max-order 3 > /dev/null
      runs=()
      for tf in ${TF32:-0 1}; do
        CUPY_TF32=$tf ref /tmp/ref_tf$tf ${ITER:-5} --max-order 3 | grep -E "iteration|finished" > $R/refine3d_tf32_$tf.log
        cp /tmp/ref_tf$tf/run_timings.json $R/refine3d_tf32_${tf}_timings.json; runs+=("tf32_$tf=/tmp/ref_tf$tf")
      done
      timeout 100 python3 -m mpi_em reconstruct --i $D/p50k_particles.star --o /tmp/known --device gpu > /dev/null 2>&1
      python3 benchmarks/refine3d_eval.py $D "${runs[@]}" --particles $D/p50k_particles.star --known /tmp/known --ceiling ${CEILING:-51} 2>&1 \
        | tee $R/refine3d_eval.txt ;;
    pinned)
      ref /tmp/r 1 > /dev/null
      for p in 1 0 1 0; do
        MPI_EM_PINNED=$p ref /tmp/r 1 > /dev/null
        python3 -c "
import json; it = json.load(open('/tmp/r/run_timings.json'))[-1]; s = it['per_rank'][0]['seconds']
print('pinned=$p', 'iteration %.2f s' % it['seconds_iteration'], 'E-step %.2f s' % it['per_rank'][0]['seconds_estep'],
      'read %.2f prepare %.2f' % (s['read'], s['prepare']))" | tee -a $R/pinned.txt
      done ;;
    *) echo "unknown mode $mode (phases, class2d, class3d, refine3d, pinned)"; exit 2 ;;
  esac
done
gpu_pack
