#!/bin/bash
# ordered job list: seed-major so every seed gets all three schedules before the next seed
: > /tmp/im22/jobs.txt
for N in $(seq 5 40); do
  echo "def_k32b_s$N --final-high 12 --seed $N" >> /tmp/im22/jobs.txt
  echo "g500_k32b_s$N --iter 150 --batch-size 500 --batch-size-ini 100 --healpix-order 1 --final-high 12 --seed $N" >> /tmp/im22/jobs.txt
  echo "f350_k32b_s$N --iter 150 --batch-size 350 --healpix-order 1 --final-high 12 --seed $N" >> /tmp/im22/jobs.txt
done
echo 0 > /tmp/im22/next
