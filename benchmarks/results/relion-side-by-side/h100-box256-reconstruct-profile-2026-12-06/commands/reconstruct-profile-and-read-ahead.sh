#!/bin/bash
# reconstruct, 20 000 box-256 particles (5.2 GB), one H100: a profile of the job, and the reader's read-ahead depth 2 / 4 / 8
set -u
T0=$(date +%s)
source benchmarks/gpu_setup.sh; gpu_setup rec-read
step() { echo "== $(( $(date +%s) - T0 )) s: $*" | tee -a "$R/steps.txt"; }
pack() { tar czf "$OUT/rec-read.tgz" -C /tmp rec-read; }
D=/tmp/d256
BOX=256 PER_STACK=5000 SIM_TIMEOUT=200 gpu_data $D 20000 > $R/sim.txt 2>&1; step "data: $(tail -1 $R/sim.txt)"
free -g | head -2 >> $R/steps.txt
cd /tmp
job() { # NAME DEPTH
  local t=$EPOCHREALTIME
  READ_DEPTH=$2 timeout 60 python3 $OLDPWD/benchmarks/results/relion-side-by-side/h100-box256-reconstruct-profile-2026-12-06/commands/depth.py reconstruct --i $D/particles.star --o /tmp/rec_$1 --overwrite \
    --device gpu > /tmp/rec_$1.log 2>&1
  echo "$1 depth $2 exit $? $(python3 -c "print(round($EPOCHREALTIME - $t, 2))") s; $(python3 -c "import json; d=json.load(open('/tmp/rec_$1/run.json')); print('total %.2f insert %.2f reconstruct %.2f' % (d['seconds_total'], d['seconds_insert'], d['seconds_reconstruct']))" 2>&1)" | tee -a $R/ab.txt
}
job warm 2; step "warm-up (kernels, page cache)"
READ_DEPTH=2 timeout 60 python3 -m cProfile -o $R/reconstruct.prof $OLDPWD/benchmarks/results/relion-side-by-side/h100-box256-reconstruct-profile-2026-12-06/commands/depth.py reconstruct --i $D/particles.star \
  --o /tmp/rec_prof --overwrite --device gpu > $R/prof.log 2>&1; step "profile exit $?"
python3 -c "import pstats; pstats.Stats('$R/reconstruct.prof').sort_stats('cumulative').print_stats(45)" > $R/profile_cumulative.txt 2>&1
python3 -c "import pstats; pstats.Stats('$R/reconstruct.prof').sort_stats('tottime').print_stats(30)" > $R/profile_tottime.txt 2>&1
pack
for i in 1 2 3; do for d in 2 4 8; do job d${d}_$i $d; done; done
step "A/B done"; cp /tmp/rec_d2_1/run.log $R/ 2>/dev/null; pack
