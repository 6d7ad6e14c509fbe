#!/bin/bash
cd /tmp/c3b/d
s=$(date +%s.%N)
mpirun --allow-run-as-root --oversubscribe -n 3 relion_refine_mpi --i particles_unaligned.star --o /tmp/c3b/rel/run --ref start.mrc --ini_high 30 --sym C1 \
  --healpix_order 2 --K 4 --iter 5 --tau2_fudge 4 --ctf --pad 2 --particle_diameter 153.6 --offset_range 5 --offset_step 2 \
  --oversampling 1 --flatten_solvent --zero_mask --dont_combine_weights_via_disc --pool 3 --j 1 --dont_check_norm \
  --random_seed 1 > /tmp/c3b/rel.log 2>&1
echo "exit $? wall $(python3 -c "print(round($(date +%s.%N) - $s, 1))")" >> /tmp/c3b/rel.log
