cd /work/main
run() { s=$1
OMP_NUM_THREADS=1 .venv/bin/python benchmarks/initial_model.py --work /tmp/st0/w$s --data /tmp/ims/data --device cpu --json /tmp/st0/starts3_seed$s.json -- --starts 3 --seed $s > /tmp/st0/starts3_seed$s.log 2>&1
echo "$(date +%T) $s rc=$? $(python3 -c "import json;d=json.load(open('/tmp/st0/starts3_seed$s.json'));print(d['fsc05_A'], round(d['seconds']))")" >> /tmp/st0/done.txt
grep -h "start .* kept\|summed log-likelihood" /tmp/st0/w$s/run/run.log >> /tmp/st0/done.txt
}
run 104 & run 107; wait; run 110
echo ALLDONE >> /tmp/st0/done.txt
