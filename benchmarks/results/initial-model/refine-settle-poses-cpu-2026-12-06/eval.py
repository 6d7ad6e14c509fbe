"""Final gold-standard resolution (the job's own: its final iteration, the best one), map vs truth (FSC 0.5, hand
searched) and iterations of each refinement NAME in /tmp/rim, on the first 5 000 particles of the issue's set."""
import json, sys
import starfile
from mpi_em.align import align_to_truth, resolution_to_truth
from mpi_em.io import read_map
truth, apix = read_map('/tmp/im/data/truth.mrc')
true = starfile.read('/tmp/im/data/particles.star')['particles'].iloc[:5000]
ang = lambda df: [df[c].values for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")]
rows = {}
for name in sys.argv[1:]:
    run = f'/tmp/rim/{name}'
    g = starfile.read(f'{run}/run_model.star')['model_general']
    gs = float(g['rlnCurrentResolution'].iloc[0]); it = int(g['rlnCurrentIteration'].iloc[0])
    vol, _ = read_map(f'{run}/run_class001.mrc')
    est = starfile.read(f'{run}/run_data.star')['particles']
    al, how, _ = align_to_truth(vol, truth, ang(est), ang(true))
    log = open(f'{run}/run.log').read()
    n = int(log.split('refine3d finished: ')[1].split(' iterations')[0])
    secs = float(log.split(' iterations in ')[1].split(' s')[0])
    rows[name] = {'gold_standard_A': gs, 'best_iteration': it, 'iterations': n, 'seconds': secs,
                  'map_vs_truth_A': resolution_to_truth(al, truth, apix), 'hand': how}
    print(name, rows[name])
json.dump(rows, open('/tmp/rim/refine.json', 'w'), indent=1)
