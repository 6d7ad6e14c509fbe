# The three commands, on one H100 (16 cores), each from the repository root with .whl/ carried (benchmarks/gpu_setup.sh);
# sweep.sh is ../../options-sweep-h100-2026-12-06/commands/sweep.sh.
# def116 and def132 ran before the default changed: "--batch-size 350" was the default job then, with the global
# search at HEALPix order 1 throughout; to run them today, give "--healpix-order 1" instead.
LIMIT=570 SEEDS="$(seq -s ' ' 0 31)" bash sweep.sh "o0 --healpix-order 0 --final-healpix-order 1"
LIMIT=560 SEEDS="$(seq -s ' ' 116 131)" bash sweep.sh "o0b --healpix-order 0 --final-healpix-order 1" "def116 --batch-size 350"
LIMIT=515 SEEDS="$(seq -s ' ' 132 147)" bash sweep.sh "o0c --healpix-order 0 --final-healpix-order 1" "def132 --batch-size 350"
