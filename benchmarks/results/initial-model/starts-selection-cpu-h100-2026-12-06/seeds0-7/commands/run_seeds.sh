#!/bin/bash
# eight single starts of the default initial-model on the set, two at a time, one thread each
source /work/main/.venv/bin/activate
cd /work/main
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
for pair in "0 1" "2 3" "4 5" "6 7"; do
  for s in $pair; do
    ( /usr/bin/time -f "seed $s %e s" python benchmarks/initial_model.py --work /tmp/ims/w$s --data /tmp/ims/data --device cpu --json /tmp/ims/seed$s.json -- --seed $s > /tmp/ims/w$s.log 2>&1 ) &
  done
  wait
done
