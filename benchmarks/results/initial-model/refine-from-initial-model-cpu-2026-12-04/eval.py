import json, starfile
from mpi_em.align import align_to_truth, resolution_to_truth
from mpi_em.io import read_map
truth, apix = read_map('/tmp/im64cpu/truth.mrc')
true = starfile.read('/tmp/im64cpu/sub5000.star')['particles']
ang = lambda df: [df[c].values for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")]
rows = {}
for start in ('im', 'truth'):
    run = f'/tmp/rf/r_{start}'
    g = starfile.read(f'{run}/run_model.star')['model_general']
    gs = float(g['rlnCurrentResolution'].iloc[0]); it = int(g['rlnCurrentIteration'].iloc[0])
    vol, _ = read_map(f'{run}/run_class001.mrc')
    est = starfile.read(f'{run}/run_data.star')['particles']
    al, how, _ = align_to_truth(vol, truth, ang(est), ang(true))
    rows[start] = {'gold_standard_A': gs, 'final_iteration': it, 'map_vs_truth_A': resolution_to_truth(al, truth, apix), 'hand': how}
rows['gold_standard_ratio'] = rows['im']['gold_standard_A'] / rows['truth']['gold_standard_A']
print(json.dumps(rows, indent=1))
json.dump(rows, open('/tmp/rf/refine.json', 'w'), indent=1)
