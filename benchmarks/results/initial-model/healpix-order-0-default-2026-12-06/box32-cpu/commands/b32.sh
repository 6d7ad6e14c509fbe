#!/bin/bash
# order 0 (mini-batches) + order 1 (final passes) against the defaults on the box-32 sets, CPU, 2 jobs at a time
set -u
# run from the repository root; B: the work folder
PY=${PY:-.venv/bin/python}; B=${B:-/tmp/b32}; mkdir -p $B/res; export OMP_NUM_THREADS=1
sim() { [ -f $B/$1/particles.star ] || $PY -m mpi_em simulate --out $B/$1 --box 32 "${@:2}" --device cpu > $B/sim_$1.log 2>&1; }
sim d32s05 --apix 5 --n 3000 --snr 0.5 --seed 1
sim d32s05d2 --apix 5 --n 3000 --snr 0.5 --seed 2
sim d32s5 --apix 5 --n 500 --snr 5 --seed 1
sim lum32 --apix 4 --n 1000 --snr 1 --seed 1 --domains 4 --domain-spread 0.12 --domain-distance 0.8
sim k32b --apix 4 --n 1500 --snr 1 --seed 3 --conformations 2
jobs() {
  for row in "d32s05 0" "d32s05 1" "d32s05 2" "d32s05 3" "d32s05d2 0" "d32s5 0" "d32s5 1" "lum32 0" "lum32 1"; do
    set -- $row; for v in def o0; do echo "$v $1 $2 1"; done; done
  for s in $(seq 0 31); do for v in def o0; do echo "$v k32b $s 2"; done; done
}
run1() {
  v=$1; set=$2; s=$3; K=$4; name=${v}_${set}_s$s
  [ -f $B/res/$name.json ] && return
  extra="--healpix-order 1"; [ $v = o0 ] && extra="--healpix-order 0 --final-healpix-order 1"
  fh=""; [ $K = 2 ] && fh="--final-high 12"
  t0=$(date +%s)
  $PY benchmarks/initial_model.py --work $B/w_$name --data $B/$set --K $K --device cpu --json $B/res/$name.json -- --seed $s $fh $extra > $B/log_$name.txt 2>&1
  echo "$(date +%T) $name rc=$? $(( $(date +%s) - t0 )) s" >> $B/done.txt
  rm -rf $B/w_$name/run/*_it*.mrc 2>/dev/null
}
export -f run1; export B PY
jobs | xargs -P 2 -L 1 bash -c 'run1 $0 $1 $2 $3'
echo ALLDONE >> $B/done.txt
