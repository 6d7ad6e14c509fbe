#!/bin/bash
# CPU study: does the half-map FSC of a start's comparison pass tell found maps from blobs better than the summed
# log-likelihood? Seeds' jobs (one start), then per seed map: one pass (--iter 0 --start MAP), reconstruct from its
# poses, FSC of the halves.
set -u
cd /work/main
PY=/work/main/.venv/bin/python
W=/tmp/fr; D=/tmp/imd; mkdir -p $W
export OMP_NUM_THREADS=1 MPI_EM_DEVICE=cpu
[ -f $D/particles.star ] || $PY -m mpi_em simulate --out $D --box 64 --n 20000 --snr 0.05 --apix 2.5 --seed 1 --device cpu > $W/sim.log 2>&1
echo "$(date +%T) data" >> $W/steps.txt
seed_job() {
  local s=$1
  [ -f $W/seed$s.json ] || $PY benchmarks/initial_model.py --work $W/w$s --data $D --device cpu --json $W/seed$s.json -- --seed $s --starts 1 > $W/w$s.log 2>&1
  $PY -m mpi_em initial-model --i $D/particles_unaligned.star --o $W/p$s --overwrite --device cpu --iter 0 \
    --start $W/w$s/run/run_it150_class001.mrc --ini-high 15 --final-high 15 --final-passes 1 > $W/p$s.log 2>&1
  $PY -m mpi_em reconstruct --i $W/p$s/run_data.star --o $W/r$s --overwrite --device cpu > $W/r$s.log 2>&1
  echo "$(date +%T) seed $s done" >> $W/steps.txt
}
export -f seed_job; export PY W D
printf "%s\n" ${SEEDS:-16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31} | xargs -P 2 -I{} bash -c 'seed_job {}'
echo "$(date +%T) all done" >> $W/steps.txt
