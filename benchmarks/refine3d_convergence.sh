#!/bin/bash
# refine3d to convergence on one GPU against the true poses (issue 4's benchmark): simulated particles (box $BOX =
# 128, $N = 50 000, $APIX = 1.5 Å/px, SNR 0.05, seed 11), start = the truth low-passed to $LOWPASS = 30 Å,
# auto-sampling up to HEALPix order $MAX_ORDER = 5 (local searches from order 4), at most $ITER = 25 iterations;
# gold-standard resolution against `mpi-em reconstruct` of the true poses, map vs truth, pose errors, seconds, wall
# clock and E-step GEMM rates per iteration (benchmarks/refine3d_eval.py).
#   bash benchmarks/refine3d_convergence.sh OUT NAME [VARIANT...]     # from the repo root on the device, wheels in .whl/
# VARIANT (default N): N = the defaults; P = RELION's plain scheme (--folds 1 --no-refine-offsets); R = with
# --refine-offsets; any other name V with a code tree in .ab/V (git-ignored, carried to the device) runs that
# tree's code (`git archive COMMIT mpi_em | tar -x -C .ab/V`, e.g. to compare a version that writes its files in
# the main thread) with the defaults. Environment: WARM = warm-up iterations first (default 3; 0: none; the
# kernel cache then stays warm), WARM3=1 also warms the order-3 global search, KNOWN=0 skips the true-pose
# reconstruction, DETAIL=1 repeats the first variant with MPI_EM_TIMING_DETAIL=1, LAUNCH="" runs `python3`
# directly instead of `launch/mpi-em-run -n 1 --`, BATCH (1024), EXTRA (more refine3d options), CLASS2D=K then
# runs class2d with K classes on the same particles (3 iterations).
set -u
OUT=${1:-/tmp/out}; . benchmarks/gpu_setup.sh; gpu_setup ${2:-refine3d}; shift $(( $# < 2 ? $# : 2 ))
D=/tmp/d${BOX:-128}
[ -f $D/start.mrc ] || gpu_data $D ${N:-50000}
REPO=$PWD
LAUNCH=${LAUNCH-launch/mpi-em-run -n 1 --}
run1() {  # code tree, output folder, iterations, options (run from the code tree: `python -m` imports from the cwd)
  local code=$1 out=$2 it=$3; shift 3
  (cd $code && PYTHONPATH=/tmp/site:$code timeout 400 ${LAUNCH:+$REPO/$LAUNCH} python3 -m mpi_em refine3d \
    --i $D/particles_unaligned.star --ref $D/start.mrc --ini-high ${LOWPASS:-30} --o $out --device gpu \
    --batch ${BATCH:-1024} --max-order ${MAX_ORDER:-5} --iter $it ${EXTRA:-} "$@" 2>&1)
}
[ "${WARM:-3}" = 0 ] || run1 $PWD /tmp/warm ${WARM:-3} >/dev/null
[ -z "${WARM3:-}" ] || run1 $PWD /tmp/warm3 1 --healpix-order 3 >/dev/null
[ "${KNOWN:-1}" = 0 ] || timeout 200 python3 -m mpi_em reconstruct --i $D/particles.star --o /tmp/known --device gpu \
  > $R/known.log 2>&1
runs=()
for V in "${@:-N}"; do
  code=$PWD; [ -d .ab/$V ] && code=$PWD/.ab/$V
  opts=()
  case $V in P) opts=(--folds 1 --no-refine-offsets) ;; R) opts=(--refine-offsets) ;; esac
  run1 $code /tmp/r$V ${ITER:-25} "${opts[@]}" | grep -E "placement|iteration|finished|converged|final" > $R/refine3d_$V.log
  cp /tmp/r$V/run_timings.json $R/refine3d_${V}_timings.json; cp /tmp/r$V/run_model.star $R/refine3d_${V}_model.star
  runs+=("$V=/tmp/r$V")
done
if [ -n "${DETAIL:-}" ]; then
  MPI_EM_TIMING_DETAIL=1 run1 $PWD /tmp/rdetail ${ITER:-25} > /dev/null
  cp /tmp/rdetail/run_timings.json $R/refine3d_detail_timings.json; runs+=("detail=/tmp/rdetail")
fi
python3 benchmarks/refine3d_eval.py $D "${runs[@]}" $([ "${KNOWN:-1}" = 0 ] || echo --known /tmp/known) 2>&1 | tee $R/eval.txt
if [ -n "${CLASS2D:-}" ]; then
  timeout 300 /usr/bin/time -f "wall %e s, max RSS %M kB" python3 -m mpi_em class2d --i $D/particles_unaligned.star \
    --o /tmp/c2d --K $CLASS2D --iter 3 --device gpu --batch ${BATCH:-1024} 2>&1 | tee $R/class2d_gpu.log
  cp /tmp/c2d/run_classes.png $R/class2d_classes.png 2>/dev/null
fi
gpu_pack
