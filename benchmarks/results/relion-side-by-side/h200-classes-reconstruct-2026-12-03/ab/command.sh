# A/B on one machine: class3d / class2d box 128 (10 000 particles, 5 it.) with HEAD, HEAD without the writer's preload,
# HEAD without the soft mask, and the tree 8f73275 (the classifications' earlier side-by-side); two rounds
set -uo pipefail
source benchmarks/gpu_setup.sh
gpu_setup s16
T0=$(date +%s); st() { echo "$1 $(( $(date +%s) - T0 )) s" | tee -a $R/steps.txt; ( cd /tmp && tar czf $OUT/s16.tgz s16 ); }
python3 benchmarks/relion_side_by_side.py --data-only --data /tmp/sbs128data --gpu --box 128 --n 10000 --snr 0.05 --apix 1.5 > $R/data128.log 2>&1; st data128
D=/tmp/sbs128data
C3="class3d --ref $D/start.mrc --ini-high 30.0 --sym C1 --healpix-order 2 --K 4 --iter 5 --tau2-fudge 4 --i $D/particles_unaligned_abs.star --particle-diameter 153.6 --offset-range 5.0 --offset-step 1.0 --device gpu --seed 0"
C2="class2d --K 50 --iter 5 --psi-step 10.0 --tau2-fudge 2 --i $D/particles_unaligned_abs.star --particle-diameter 153.6 --offset-range 5.0 --offset-step 1.0 --device gpu --seed 0"
go() { name=$1; shift; rm -rf /tmp/v/$name; mkdir -p /tmp/v/$name
  ( cd /tmp/v/$name && /usr/bin/time -f "wall %e s" timeout 100 mpirun -n 1 --bind-to none "$@" --o out > $R/$name.log 2>&1 )
  cp /tmp/v/$name/out/run_timings.json $R/${name}_timings.json 2>/dev/null; st $name; }
NEW="python3 $PWD/.dev/variant.py"
OLD="env PYTHONPATH=/tmp/site:$PWD/.dev/old python3 -m mpi_em"
go warm_c3 $NEW $C3; go warm_c2 $NEW $C2
for r in 1 2; do
  go c3_head_$r $NEW $C3
  go c3_old_$r $OLD $C3
  go c3_nopreload_$r env VARIANT=nopreload $NEW $C3
  go c3_nomask_$r env VARIANT=nomask $NEW $C3
  go c2_head_$r $NEW $C2
  go c2_old_$r $OLD $C2
done
