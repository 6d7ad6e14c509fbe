#!/bin/bash
# rr.sh NAME REF : RELION 3.1.3 auto-refine (CPU) of the issue set's first 5 000 particles from REF
name=$1; ref=$2; mkdir -p /tmp/rrel/$name; s=$(date +%s.%N)
cd /tmp/im/data && OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 \
  /usr/bin/mpirun -n 3 --oversubscribe --mca mpi_yield_when_idle 1 /usr/bin/relion_refine_mpi --i sub5000_unaligned.star --o /tmp/rrel/$name/run \
  --ref $ref --ini_high 30 --sym C1 --healpix_order 2 --auto_local_healpix_order 4 --auto_refine --split_random_halves \
  --low_resol_join_halves 40 --tau2_fudge 1 --ctf --pad 2 --particle_diameter 128 --offset_range 3 --offset_step 2 \
  --oversampling 1 --flatten_solvent --zero_mask --dont_combine_weights_via_disc --pool 3 --j 1 --dont_check_norm \
  --random_seed 1 > /tmp/rrel/$name.log 2>&1
echo "exit $? wall $(python3 -c "print(round($(date +%s.%N) - $s, 1))")" >> /tmp/rrel/$name.log
