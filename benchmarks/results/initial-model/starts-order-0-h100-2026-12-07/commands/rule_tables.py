"""The keep-the-likeliest rule of --starts over the 64 seeds of seeds-h100/select.json: for N = 1..4, every N-subset
of the seeds and the consecutive seed triples a job with --starts 3 forms (s, s + 1, s + 2), the fraction whose kept
seed's own job ended at or below 20, 21 and 25 Å against the truth, and the fraction holding such a seed.

usage: python rule_tables.py RESULTS_FOLDER"""
import itertools
import json
import os
import sys

d = json.load(open(os.path.join(sys.argv[1], "seeds-h100", "select.json")))
final = {int(k): v for k, v in d["final_fsc05_A"].items()}
ll = {int(k): v for k, v in d["select"]["150"]["loglike"].items()}
print("| threshold | N | subsets | kept at or below | a seed at or below among them |")
print("|---|---|---|---|---|")
for thr in (20.0, 21.0, 25.0):
    for n in (1, 2, 3, 4):
        subs = list(itertools.combinations(sorted(final), n))
        kept = [max(c, key=lambda s: ll[s]) for c in subs]
        k = sum(final[x] <= thr for x in kept)
        a = sum(any(final[s] <= thr for s in c) for c in subs)
        print(f"| {thr:g} Å | {n} | {len(subs)} | {k} ({100 * k / len(subs):.0f}%) | {a} ({100 * a / len(subs):.0f}%) |")
trip = [(s, s + 1, s + 2) for s in sorted(final) if s + 2 in final and s + 1 in final]
kept = [max(c, key=lambda s: ll[s]) for c in trip]
for thr in (20.0, 25.0):
    k = sum(final[x] <= thr for x in kept)
    single = sum(final[c[0]] <= thr for c in trip)
    print(f"consecutive triples (s, s + 1, s + 2), {len(trip)}: kept at or below {thr:g} Å {k}, "
          f"the single start s {single}")
