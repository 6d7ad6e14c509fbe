#!/bin/bash
# after 1-class2d-ab-and-cupyx.sh, on its machine (its data and kernel cache): the pinned allocator without cupyx (patched copy): does anything else load cupyx.linalg?
set -u
source benchmarks/gpu_setup.sh
gpu_setup box256-cupyx
mkdir -p /tmp/alt && cp -r mpi_em /tmp/alt/ && python3 $(dirname $0)/pinned_allocator_patch.py /tmp/alt && python3 -m compileall -q -j 0 /tmp/alt/mpi_em >/dev/null 2>&1
D=/tmp/d256
(cd /tmp/alt && PYTHONPATH=/tmp/alt:/tmp/site timeout 60 mpirun -n 1 --bind-to none python3 $OLDPWD/$(dirname $0)/import_spy.py class2d --K 50 --iter 2 --psi-step 10 \
  --tau2-fudge 2 --i $D/particles_unaligned_abs.star --particle-diameter 307.2 --offset-range 5.0 --offset-step 1.0 \
  --device gpu --seed 0 --o /tmp/spy6 > $R/spy6.txt 2>&1; echo "spy exit $?")
grep -A3 "first import" $R/spy6.txt | head -30; echo "---"; grep -c "first import" $R/spy6.txt
C2="class2d --K 50 --iter 25 --psi-step 10.0 --tau2-fudge 2 --i $D/particles_unaligned_abs.star --particle-diameter 307.2 --offset-range 5.0 --offset-step 1.0 --device gpu --seed 0"
for t in alt head; do s=$EPOCHREALTIME
  if [ $t = alt ]; then (cd /tmp/alt && PYTHONPATH=/tmp/alt:/tmp/site timeout 60 mpirun -n 1 --bind-to none python3 -m mpi_em $C2 --o /tmp/j6$t > /dev/null 2>&1)
  else (cd /tmp && timeout 60 mpirun -n 1 --bind-to none python3 -m mpi_em $C2 --o /tmp/j6$t > /dev/null 2>&1); fi
  echo "$t $(python3 -c "print(round($EPOCHREALTIME - $s, 3))")"; done
