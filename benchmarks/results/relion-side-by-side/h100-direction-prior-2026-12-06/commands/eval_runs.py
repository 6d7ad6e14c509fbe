"""Each run folder: wall seconds, final class shares, each class map's FSC-0.5 resolution vs the truth."""
import glob, json, os, re, sys
sys.path.insert(0, "benchmarks")
from relion_side_by_side import Truth
t = Truth(sys.argv[1])
out = {}
for d in sys.argv[2:]:
    log = open(os.path.join(d, "run.log")).read()
    sizes = re.findall(r"iteration (\d+): E-step.*?resolution ([0-9.]+) Å.*?classes ([0-9./]+)%", log)
    maps = sorted(glob.glob(os.path.join(d, "run_class0*.mrc")))
    res = [t.res05(m) for m in maps]
    wall = float(open(d + ".wall").read()) if os.path.exists(d + ".wall") else None
    out[os.path.basename(d)] = {"wall_s": wall, "map_vs_truth_05": res, "per_iteration": sizes}
    last = sizes[-1] if sizes else None
    print(f"{os.path.basename(d):40s} wall {wall} s  final classes {last[2] if last else '?'}  res {last[1] if last else '?'} Å  "
          f"maps vs truth {[round(x, 2) for x in res]}")
json.dump(out, open(os.environ.get("EVAL_JSON", "eval.json"), "w"), indent=1)
