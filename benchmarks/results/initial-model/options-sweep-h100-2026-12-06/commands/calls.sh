# the four device commands, one after the other on one warm H100 (the machine kept /tmp between them: steps.txt and
# smi.txt hold all four; the data set was simulated again by each, the same files)
bash commands/sweep.sh "fudge1 --sigma2-fudge 1" "inihigh22 --ini-high 22" "startnoise1 --start-noise 1" "diam115 --particle-diameter 115"
bash commands/sweep.sh "sn1d115 --start-noise 1 --particle-diameter 115" "startnoise3 --start-noise 3" "diam105 --particle-diameter 105" "sn3d105 --start-noise 3 --particle-diameter 105"
LIMIT=560 bash commands/sweep.sh "healpix2 --healpix-order 2" "batch700 --batch-size 700"
LIMIT=370 SEEDS="108 109 110 111 112 113 114 115" bash commands/sweep.sh "batch700b --batch-size 700" "default108 --batch-size 350"
