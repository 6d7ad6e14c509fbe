"""The 32 seeds of the three sets in one table: final maps (seedS.json), summed log-likelihoods of their maps'
passes after iterations 20 and 150 (every pass on the same particles, grid and noise spectrum, so sums from different
comparison jobs compare: seeds 0-7 gave the same sums within 0.1 nat on the 2-core VM and on the H100), and the
keep-the-likeliest rule over every N-subset (benchmarks/initial_model_select.py's rule_table).

usage: python merge.py RESULTS_FOLDER  (the folder holding seeds0-7/, seeds8-15/, seeds16-31/)"""
import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), *[".."] * 5, "benchmarks"))
from initial_model_select import rule_table  # noqa: E402

root = sys.argv[1]
final = {}
for path in glob.glob(os.path.join(root, "seeds*", "seed*.json")):
    final[int(re.findall(r"seed(\d+)\.json$", path)[0])] = json.load(open(path))["fsc05_A"][0]
lls = {20: {}, 150: {}}
for path in glob.glob(os.path.join(root, "seeds*", "select*.json")):
    for j, r in json.load(open(path))["select"].items():
        if int(j) in lls:
            lls[int(j)].update({int(s): v for s, v in r["loglike"].items()})
out = {"final_fsc05_A": final, "loglike": lls, "rule": {}}
print(f"{len(final)} seeds; <= 20 Å: {sum(v <= 20 for v in final.values())}, <= 21 Å: "
      f"{sum(v <= 21 for v in final.values())}")
print("| compared after iteration J | N | mini-batch iterations | kept <= 20 Å | a <= 20 Å start among them | kept <= 21 Å "
      "| a <= 21 Å start among them |")
print("|---|---|---|---|---|---|---|")
for j in (20, 150):
    assert sorted(lls[j]) == sorted(final), (j, sorted(set(final) - set(lls[j])))
    r20, r21 = rule_table(final, lls[j], 20.0, 4), rule_table(final, lls[j], 21.0, 4)
    out["rule"][j] = {"20": r20, "21": r21}
    for n in range(1, 5):
        a, b = r20[n], r21[n]
        print(f"| {j} | {n} | {n * j + 150 - j} | {a['kept_good']} / {a['subsets']} ({100 * a['kept_good'] / a['subsets']:.0f}%) "
              f"| {a['any_good']} ({100 * a['any_good'] / a['subsets']:.0f}%) | {b['kept_good']} ({100 * b['kept_good'] / b['subsets']:.0f}%) "
              f"| {b['any_good']} ({100 * b['any_good'] / b['subsets']:.0f}%) |")
for j in (20, 150):
    order = sorted(lls[j], key=lambda s: -lls[j][s])
    print(f"J = {j}, seeds by log-likelihood (final Å): " + ", ".join(f"{s} ({final[s]:.1f})" for s in order))
json.dump(out, open(os.path.join(root, "merged.json"), "w"), indent=1)
