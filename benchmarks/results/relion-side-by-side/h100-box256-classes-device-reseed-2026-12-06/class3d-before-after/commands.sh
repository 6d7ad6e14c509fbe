#!/bin/bash
# mpi_em alone, the tree before the GPU re-seeding changes (8d09251, exported beforehand with
# `git archive 8d09251 mpi_em | tar -x -C .dev/old`) against fd45966, on one GPU in one command: box-256 class3d
# (3000 particles) and class2d (4000), 25 iterations each, where the time allowed; the new GPU tests first
set -u
T0=$(date +%s)
source benchmarks/gpu_setup.sh
gpu_setup ab
python3 -m compileall -q -j 0 "$PWD/.dev/old/mpi_em" >/dev/null 2>&1
step() { echo "== $(( $(date +%s) - T0 )) s: $*" | tee -a "$R/steps.txt"; tar czf "$OUT/ab.tgz" -C /tmp ab; }
step "set-up done"
mk() { python3 benchmarks/relion_side_by_side.py --data-only --data "$1" --gpu --box 256 --n "$2" --snr 0.05 --apix 1.5 \
       > "$R/data_$2.log" 2>&1; step "data $2 exit $?"; }
( mk /tmp/d3 3000 ) & P1=$!
( mk /tmp/d2 4000 ) & P2=$!
# (the class2d pair runs only where the time allows)
( python3 -m mpi_em warmup > "$R/warmup.log" 2>&1; step "warmup exit $?" ) & P3=$!
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "reseed or references_from or header_statistics" 2>&1 | tail -15 > "$R/gpu_tests_new.txt"; step "tests: $(tail -1 "$R/gpu_tests_new.txt")"
wait $P3
wait $P1 $P2
job() {  # name tree-path mode data
  local name=$1 tree=$2 mode=$3 d=$4; shift 4
  local o=/tmp/ab_$name; rm -rf "$o"; local t=$(date +%s.%N)
  PYTHONPATH=/tmp/site:$tree timeout 120 mpirun -n 1 --bind-to none python3 -m mpi_em "$mode" --i "$d/particles_unaligned_abs.star" \
    --o "$o" --particle-diameter 307.2 --offset-range 5.0 --offset-step 1.0 --device gpu --seed 0 "$@" > "$R/$name.out" 2>&1
  local rc=$?; local w=$(python3 -c "import time; print(round(time.time() - $t, 2))")
  step "$name exit $rc wall $w s"
  mkdir -p "$R/$name"; cp "$o/run_timings.json" "$o/run.log" "$R/$name/" 2>/dev/null
}
C3="--ref /tmp/d3/start.mrc --ini-high 30 --sym C1 --healpix-order 2 --K 4 --iter 25 --tau2-fudge 4"
C2="--K 50 --iter 25 --psi-step 10.0 --tau2-fudge 2"
[ $(( $(date +%s) - T0 )) -lt 150 ] && job class3d_new "$PWD" class3d /tmp/d3 $C3
[ $(( $(date +%s) - T0 )) -lt 185 ] && job class3d_old "$PWD/.dev/old" class3d /tmp/d3 $C3
[ $(( $(date +%s) - T0 )) -lt 175 ] && job class2d_new "$PWD" class2d /tmp/d2 $C2
[ $(( $(date +%s) - T0 )) -lt 195 ] && job class2d_old "$PWD/.dev/old" class2d /tmp/d2 $C2
tar czf "$OUT/ab.tgz" -C /tmp ab
step "end"
