#!/bin/bash
# the eight seeds' maps after mini-batch iteration J compared in one pass each over all particles (one noise model:
# the images' own), at the schedule's resolution of iteration J: initial-model --iter 0 --start MAPS
source /work/main/.venv/bin/activate
cd /work/main
export OMP_NUM_THREADS=${THREADS:-1} OPENBLAS_NUM_THREADS=${THREADS:-1}
J=$1; RES=$2
maps=""; for s in 0 1 2 3 4 5 6 7; do maps="$maps /tmp/ims/w$s/run/run_it$(printf %03d $J)_class001.mrc"; done
rm -rf /tmp/ims/cmp$J
python -m mpi_em initial-model --i /tmp/ims/data/particles.star --o /tmp/ims/cmp$J --device cpu --iter 0 \
  --start $maps --ini-high $RES --final-high $RES --final-passes 1 > /tmp/ims/cmp$J.log 2>&1
grep "summed log-likelihood\|kept" /tmp/ims/cmp$J/run.log
