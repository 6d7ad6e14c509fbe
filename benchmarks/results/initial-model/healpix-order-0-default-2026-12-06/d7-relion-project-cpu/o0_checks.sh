# run from the repository root
D=benchmarks/results/initial-model/healpix-order-0-default-2026-12-06/d7-relion-project-cpu
for s in 0 1 2 3; do for o in 0 1; do for w in relion d7; do
  echo "== $w order $o seed $s"; OMP_NUM_THREADS=1 .venv/bin/python $D/o0_checks.py $o $s $w 2>&1 | grep -E "ARGV|vs|FAIL|PASS|Error"
done; done; done
echo ALLDONE
