#!/bin/bash
name=$1; tree=$2; shift 2
s=$(date +%s.%N)
cd /tmp/c3b && PYTHONPATH=$tree OMP_NUM_THREADS=1 python3 -m mpi_em refine3d --i /tmp/c3b/d/particles_unaligned.star --ref /tmp/c3b/d/start.mrc \
  --ini-high 30 --particle-diameter 153.6 --device cpu --seed 0 "$@" --o /tmp/c3b/$name > /tmp/c3b/$name.log 2>&1
echo "exit $? wall $(python3 -c "print(round($(date +%s.%N) - $s, 1))")" >> /tmp/c3b/$name.log
