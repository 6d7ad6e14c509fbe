#!/bin/bash
# class3d before / after the size rule, side by side (one thread each): bash run.sh BEFORE_TREE AFTER_TREE DATA OUT
# (DATA: the box-64 set of ../cpu-incr-size-2026-12-05/, with start.mrc; a tree is a folder holding mpi_em/)
before=$1; after=$2; data=$3; out=$4
mkdir -p $out
job() { ( s=$(date +%s.%N); OMP_NUM_THREADS=1 PYTHONPATH=$2 python -m mpi_em class3d --i $data/particles_unaligned.star \
  --ref $data/start.mrc --ini-high 30 --sym C1 --healpix-order 2 --K 4 --iter 5 --tau2-fudge 4 --particle-diameter 153.6 \
  --offset-range 5 --offset-step 1 --device cpu --seed 0 --o $out/$1 > $out/$1.log 2>&1
  echo "exit $? wall $(python3 -c "print(round($(date +%s.%N) - $s, 1))")" >> $out/$1.log ) ; }
job before $before & job after $after & wait
OUT_JSON=$out/class3d_size_rule.json python ../cpu-incr-size-2026-12-05/evaluate_box64.py $data \
  before:$out/before/run:5 after:$out/after/run:5
