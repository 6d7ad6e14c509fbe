#!/bin/bash
# The issue's set on the 2-core CPU VM: initial-model (defaults) at --seed 3 and 21, the seed-3 job's final passes
# again at HEALPix order 2 (its checkpoint after the 150th mini-batch continued with --final-healpix-order 2 written
# into it: the mini-batches do not depend on the passes' order), refine3d from the seed-3 and seed-21 maps and from
# the truth low-passed to 30 Å; then eval.py. Run from the repository root; W: a work folder.
set -eu
W=${W:-/tmp/ims}; D=$W/data
[ -f $D/particles.star ] || mpi-em simulate --out $D --box 64 --n 20000 --snr 0.05 --apix 2.5 --seed 1 --device cpu
for s in 3 21; do
  mpi-em initial-model --i $D/particles_unaligned.star --o $W/s$s --K 1 --device cpu --seed $s
done
mkdir -p $W/s3o2 && cp $W/s3/run_it150_checkpoint.h5 $W/s3/checkpoint.json $W/s3o2/
python3 - $W/s3o2 <<'PY'
import json, sys
c = json.load(open(sys.argv[1] + "/checkpoint.json"))
c["args"]["final_healpix_order"], c["args"]["output"] = 2, sys.argv[1]
json.dump(c, open(sys.argv[1] + "/checkpoint.json", "w"), indent=1)
PY
mpi-em initial-model --continue $W/s3o2
python3 - $D $W <<'PY'
import sys, mrcfile, numpy as np
from mpi_em.em.model import lowpass
with mrcfile.open(sys.argv[1] + "/truth.mrc") as m:
    v, apix = m.data.astype(np.float64), float(m.voxel_size.x)
with mrcfile.new(sys.argv[2] + "/truth30.mrc", overwrite=True) as m:
    m.set_data(lowpass(v, v.shape[0], apix, 30.0).astype(np.float32)); m.voxel_size = apix
PY
for start in s3 s21 truth; do
  ref=$W/$start/run_class001.mrc; [ $start = truth ] && ref=$W/truth30.mrc
  mpi-em refine3d --i $D/particles_unaligned.star --ref $ref --ini-high 30 --o $W/r_$start --overwrite --device cpu
done
python3 benchmarks/results/initial-model/map-fit-refine-cpu-2026-12-07/eval.py $D $W \
  > benchmarks/results/initial-model/map-fit-refine-cpu-2026-12-07/eval.txt
