"""RELION 3.1.3 auto-refine of the issue set's first 5 000 particles from our initial model (im) and from the truth
(tr): final gold-standard resolution, iterations, map vs truth (FSC 0.5, hand searched), per-iteration resolution."""
import glob, json, re, sys
import numpy as np
import starfile
from mpi_em.align import align_to_truth, resolution_to_truth
from mpi_em.io import read_map
truth, apix = read_map('/tmp/im/data/truth.mrc')
true = starfile.read('/tmp/im/data/particles.star')['particles'].iloc[:5000]
ang = lambda df: [df[c].values for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")]
rows = {}
for name in sys.argv[1:]:
    run = f'/tmp/rrel/{name}'
    per = []
    for f in sorted(glob.glob(f'{run}/run_it*_half1_model.star')):
        g = starfile.read(f)['model_general']
        per.append([int(re.search(r'_it(\d+)_', f).group(1)), float(np.ravel(g['rlnCurrentResolution'])[0])])
    g = starfile.read(f'{run}/run_model.star')['model_general']
    vol, _ = read_map(f'{run}/run_class001.mrc')
    est = starfile.read(f'{run}/run_data.star')['particles']
    al, how, _ = align_to_truth(vol, truth, ang(est), ang(true))
    log = open(f'/tmp/rrel/{name}.log').read()
    wall = float(re.findall(r'wall ([0-9.]+)', log)[-1])
    acc = re.findall(r'rlnAccuracyRotations\s+([0-9.]+)', open(f'{run}/run_model.star').read())
    rows[name] = {'gold_standard_A': float(np.ravel(g['rlnCurrentResolution'])[0]), 'iterations': per[-1][0],
                  'seconds': wall, 'map_vs_truth_A': resolution_to_truth(al, truth, apix), 'hand': how,
                  'per_iteration_resolution_A': per}
    print(name, rows[name])
json.dump(rows, open('/tmp/rrel/refine_relion.json', 'w'), indent=1)
