# run from the repository root; DATA: the issue's set (mpi-em simulate --out DATA --box 64 --n 20000 --snr 0.05
# --apix 2.5 --seed 1 --device cpu), W: the work folder
DATA=${DATA:-/tmp/ims/data}; W=${W:-/tmp/st0}; mkdir -p $W
run() { s=$1
OMP_NUM_THREADS=1 .venv/bin/python benchmarks/initial_model.py --work $W/w$s --data $DATA --device cpu --json $W/starts3_seed$s.json -- --starts 3 --seed $s > $W/starts3_seed$s.log 2>&1
echo "$(date +%T) $s rc=$? $(python3 -c "import json;d=json.load(open('$W/starts3_seed$s.json'));print(d['fsc05_A'], round(d['seconds']))")" >> $W/done.txt
grep -h "start .* kept\|summed log-likelihood" $W/w$s/run/run.log >> $W/done.txt
}
run 104 & run 107; wait; run 110
echo ALLDONE >> $W/done.txt
