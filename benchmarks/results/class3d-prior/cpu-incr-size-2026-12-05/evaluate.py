import sys, json, glob, numpy as np, mrcfile, starfile
from mpi_em.fsc import fsc, resolution_at
from mpi_em.evaluate import class_accuracy
d, out, it = sys.argv[1], sys.argv[2], int(sys.argv[3])
truths = [mrcfile.read(f"{d}/truth_class{k:03d}.mrc").astype(np.float64) for k in (1, 2)]
true = starfile.read(f"{d}/particles.star")
true = true["particles"] if isinstance(true, dict) else true
data = starfile.read(f"{out}/run_it{it:03d}_data.star")
data = data["particles"] if isinstance(data, dict) else data
col = [c for c in true.columns if "Class" in c or "Conformation" in c]
acc = class_accuracy(data["rlnClassNumber"].to_numpy(), true[col[0]].to_numpy()) if col else None
res = {}
for k in (1, 2):
    m = mrcfile.read(f"{out}/run_it{it:03d}_class{k:03d}.mrc").astype(np.float64)
    res[k] = min(resolution_at(fsc(m, t), 32, 4.0, 0.5) for t in truths)
model = starfile.read(f"{out}/run_it{it:03d}_model.star", always_dict=True)
rs = [float(starfile.read(f"{out}/run_it{i:03d}_model.star", always_dict=True)["model_general"]["rlnCurrentResolution"].iloc[0]) for i in range(1, it + 1)]
sz = [int(starfile.read(f"{out}/run_it{i:03d}_model.star", always_dict=True)["model_general"]["rlnCurrentImageSize"].iloc[0]) for i in range(1, it + 1)]
print(json.dumps({"out": out, "class_col": col, "accuracy": acc, "maps_vs_truth_05": res, "reported": rs, "size": sz}))
