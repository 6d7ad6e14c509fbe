#!/bin/bash
# one worker: takes the next line of jobs.txt (under a lock) until none left or launch deadline passed
cd /work/main
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
D=/tmp/im21/data
R=benchmarks/results/initial-model/growing-batch-cpu-2026-12-04
STOP=$(date -d '2026-12-04 17:38:00 UTC' +%s)
P=/tmp/im22/progress.txt
W=$1
while true; do
  if [ $(date +%s) -ge $STOP ]; then echo "$(date +%T) w$W stop (time)" >> $P; break; fi
  line=$(flock /tmp/im22/lock bash -c 'i=$(cat /tmp/im22/next); l=$(sed -n "$((i+1))p" /tmp/im22/jobs.txt); echo $((i+1)) > /tmp/im22/next; echo "$l"')
  [ -z "$line" ] && break
  set -- $line; name=$1; shift
  echo "$(date +%T) w$W start $name: $*" >> $P
  .venv/bin/python benchmarks/initial_model.py --work /tmp/im21/runs/$name --data $D/k32b --K 2 --device cpu -- "$@" > /tmp/im21/runs/$name.out 2>&1
  rc=$?
  echo "$(date +%T) w$W end $name rc=$rc $(tail -1 /tmp/im21/runs/$name.out | awk -F'|' '{print $8, $12, $13}')" >> $P
  [ $rc = 0 ] && cp /tmp/im21/runs/$name/initial_model.json $R/$name.json
done
