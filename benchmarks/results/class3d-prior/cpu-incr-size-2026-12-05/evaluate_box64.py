"""class3d on one structure: each run's last iteration -- reported resolution, current size, class distribution,
the largest class's map against the truth (FSC 0.5), median angular error of the particles' poses."""
import json, os, sys
import numpy as np, mrcfile, starfile
from mpi_em.fsc import fsc, resolution_at
d = sys.argv[1]
truth = mrcfile.read(f"{d}/truth.mrc").astype(np.float64)
rows = {}
for name, out, it in [(a.split(":")[0], a.split(":")[1], int(a.split(":")[2])) for a in sys.argv[2:]]:
    m = starfile.read(f"{out}_it{it:03d}_model.star", always_dict=True)
    g = m["model_general"]
    dist = [float(x) for x in m["model_classes"]["rlnClassDistribution"]]
    k = int(np.argmax(dist))
    res = []
    for j in range(len(dist)):
        v = mrcfile.read(f"{out}_it{it:03d}_class{j + 1:03d}.mrc").astype(np.float64)
        res.append(resolution_at(fsc(v, truth), truth.shape[0], 3.0, 0.5))
    sizes = []
    for i in range(1, it + 1):
        gi = starfile.read(f"{out}_it{i:03d}_model.star", always_dict=True)["model_general"]
        one = (lambda x: x.iloc[0]) if hasattr(gi, "iloc") else (lambda x: x)
        sizes.append((round(float(one(gi["rlnCurrentResolution"])), 2), int(one(gi["rlnCurrentImageSize"]))))
    rows[name] = {"resolution_and_size_per_iteration": sizes, "class_distribution": dist,
                  "largest_class_vs_truth_05": res[k], "classes_vs_truth_05": res}
    print(name, json.dumps(rows[name]))
json.dump(rows, open(os.environ.get("OUT_JSON", "class3d_incr_size.json"), "w"), indent=1)
