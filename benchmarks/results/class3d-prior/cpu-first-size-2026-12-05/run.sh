#!/bin/bash
# run.sh NAME TREE [extra options]
name=$1; tree=$2; shift 2
s=$(date +%s.%N)
cd /tmp/c3b && PYTHONPATH=$tree OMP_NUM_THREADS=1 python3 -m mpi_em class3d --i /tmp/c3b/d/particles_unaligned.star --ref /tmp/c3b/d/start.mrc \
  --ini-high 30 --sym C1 --healpix-order 2 --K 4 --iter 5 --tau2-fudge 4 --particle-diameter 153.6 --offset-range 5 \
  --offset-step 1 --device cpu --seed 0 "$@" --o /tmp/c3b/$name > /tmp/c3b/$name.log 2>&1
echo "exit $? wall $(python3 -c "print(round($(date +%s.%N) - $s, 1))")" >> /tmp/c3b/$name.log
