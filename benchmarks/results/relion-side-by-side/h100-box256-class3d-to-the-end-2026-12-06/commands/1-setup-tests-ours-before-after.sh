#!/bin/bash
# command 1: set-up, RELION build (refine_mpi), warmup, GPU tests, data (box 256: 3000 and 4000), then our box-256 class3d
# side by side (PROGRAMS=mpi_em), the ABBA before/after of class3d (8d09251 against this tree) and of class2d
set -u
T0=$(date +%s)
source benchmarks/gpu_setup.sh
gpu_setup s1
export OMPI_MCA_hwloc_base_binding_policy=none
step() { echo "== $(( $(date +%s) - T0 )) s: $*" | tee -a "$R/steps.txt"; }
pack() { tar czf "$OUT/s1.tgz" -C /tmp s1; }
el() { echo $(( $(date +%s) - T0 )); }
step "set-up done"
( cd .relion-gpu && bash build.sh refine_mpi > "$R/build.log" 2>&1; echo "build exit $?" >> "$R/build.log" ) &
BPID=$!
python3 -m compileall -q -j 0 "$PWD/.dev/old/mpi_em" >/dev/null 2>&1
mk() { python3 benchmarks/relion_side_by_side.py --data-only --data "$1" --gpu --box "$2" --n "$3" --snr 0.05 --apix 1.5 \
       > "$R/data_$2_$3.log" 2>&1; step "data $2 $3 exit $?"; }
( mk /tmp/d256b 256 3000; mk /tmp/d256 256 4000 ) &
DPID=$!
python3 -m mpi_em warmup > "$R/warmup.log" 2>&1; step "warmup exit $?"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -12 > "$R/gpu_tests.txt"; step "test_gpu: $(tail -1 "$R/gpu_tests.txt")"
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_warmup.py 2>&1 | tail -12 > "$R/warmup_tests.txt"; step "test_warmup: $(tail -1 "$R/warmup_tests.txt")"
pack
wait $DPID
wait $BPID; step "$(tail -1 "$R/build.log")"
pack
SUMMARY=$R/box256-class3d PROGRAMS=mpi_em DATA=/tmp/d256b JOBS=class3d ITER=25 TIMEOUT=120 timeout 200 \
  bash benchmarks/relion_side_by_side_gpu.sh /tmp/sbs256c3 3000 256 > "$R/class3d_ours.log" 2>&1; step "class3d ours exit $?"
pack
C3="--i /tmp/d256b/particles_unaligned_abs.star --ref /tmp/d256b/start.mrc --ini-high 30 --sym C1 --healpix-order 2 --K 4 --iter 25 --tau2-fudge 4"
C2="--i /tmp/d256/particles_unaligned_abs.star --K 50 --iter 25 --psi-step 10.0 --tau2-fudge 2"
COM="--particle-diameter 307.2 --offset-range 5.0 --offset-step 1.0 --device gpu --seed 0"
if [ "$(el)" -lt 400 ]; then
  timeout 175 python3 benchmarks/em_before_after.py --before "$PWD/.dev/old" --repeats 2 --timeout 60 \
    --mpirun "$(command -v mpirun)" --work /tmp/ab3 --json "$R/before_after_class3d.json" -- class3d $C3 $COM \
    > "$R/before_after_class3d.txt" 2>&1; step "before/after class3d exit $?"
  pack
fi
if [ "$(el)" -lt 490 ]; then
  timeout 95 python3 benchmarks/em_before_after.py --before "$PWD/.dev/old" --repeats 2 --timeout 40 \
    --mpirun "$(command -v mpirun)" --work /tmp/ab2 --json "$R/before_after_class2d.json" -- class2d $C2 $COM \
    > "$R/before_after_class2d.txt" 2>&1; step "before/after class2d exit $?"
fi
for d in /tmp/ab3/* /tmp/ab2/*; do [ -d "$d" ] && mkdir -p "$R/runs/$(basename $(dirname $d))_$(basename $d)" && \
  cp "$d/run.log" "$d/run_timings.json" "$R/runs/$(basename $(dirname $d))_$(basename $d)/" 2>/dev/null; done
nvidia-smi --query-gpu=name,memory.used --format=csv >> "$R/steps.txt"
step "end"
pack
