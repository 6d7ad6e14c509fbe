import json, os, starfile
from mpi_em.align import align_to_truth, resolution_to_truth
from mpi_em.io import read_map
truth, apix = read_map('/tmp/im64cpu/truth.mrc')
true = starfile.read('/tmp/im64cpu/sub5000.star')['particles']
ang = lambda df: [df[c].values for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")]
rows = {}
for ini in (30, 40, 50, 60):
    for start in ('im', 'tr'):
        run = f'/tmp/imr/r_{start}{ini}'
        if not os.path.exists(f'{run}/run_model.star'):
            continue
        g = starfile.read(f'{run}/run_model.star')['model_general']
        gs = float(g['rlnCurrentResolution'].iloc[0]); it = int(g['rlnCurrentIteration'].iloc[0])
        vol, _ = read_map(f'{run}/run_class001.mrc')
        est = starfile.read(f'{run}/run_data.star')['particles']
        al, how, _ = align_to_truth(vol, truth, ang(est), ang(true))
        rows[f'{start}{ini}'] = {'ini_high': ini, 'start': 'initial model' if start == 'im' else 'truth',
                                 'gold_standard_A': gs, 'final_iteration': it,
                                 'map_vs_truth_A': resolution_to_truth(al, truth, apix), 'hand': how}
    if f'im{ini}' in rows and f'tr{ini}' in rows:
        rows[f'ratio{ini}'] = rows[f'im{ini}']['gold_standard_A'] / rows[f'tr{ini}']['gold_standard_A']
print(json.dumps(rows, indent=1))
json.dump(rows, open('/tmp/imr/refine.json', 'w'), indent=1)
