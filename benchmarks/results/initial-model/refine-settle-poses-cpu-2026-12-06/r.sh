#!/bin/bash
# r.sh NAME TREE REF [extra]
name=$1; tree=$2; ref=$3; shift 3
s=$(date +%s.%N)
cd /tmp/rim && PYTHONPATH=$tree OMP_NUM_THREADS=1 python3 -m mpi_em refine3d --i /tmp/im/data/sub5000_unaligned.star \
  --ref $ref --ini-high 30 --device cpu "$@" --o /tmp/rim/$name > /tmp/rim/$name.log 2>&1
echo "exit $? wall $(python3 -c "print(round($(date +%s.%N) - $s, 1))")" >> /tmp/rim/$name.log
