"""Rank the eight seeds' maps at each compared iteration J by the summed log-likelihood of their pass, and the
keep-the-likeliest rule over every N-subset of seeds: how often the start kept ends <= 20 Å (its own job's final map)."""
import itertools, json, re, sys
final = {s: json.load(open(f"/tmp/ims/seed{s}.json"))["fsc05_A"][0] for s in range(8)}
print("final maps (Å):", {s: round(v, 1) for s, v in final.items()})
out = {"final_fsc05_A": final, "compare": {}}
for J in sys.argv[1:]:
    txt = open(f"/tmp/ims/cmp{J}/run.log").read()
    ll = {int(m.group(1)) - 1: float(m.group(2)) for m in
          re.finditer(r"start (\d+) of 8: a pass .*? summed log-likelihood (-?[\d.]+)", txt)}
    if len(ll) < 8:
        print(J, "incomplete", ll); continue
    best = max(ll.values())
    order = sorted(ll, key=lambda s: -ll[s])
    print(f"J={J}: order {order}; ll - best:", " ".join(f"{s}:{ll[s]-best:+.0f}" for s in range(8)))
    row = {"loglike": ll, "order": order}
    for N in (1, 2, 3, 4):
        subs = list(itertools.combinations(range(8), N))
        kept = [max(c, key=lambda s: ll[s]) for c in subs]
        ok = sum(final[k] <= 20.05 for k in kept)
        anyok = sum(any(final[s] <= 20.05 for s in c) for c in subs)
        print(f"   N={N}: kept <= 20 Å {ok}/{len(subs)} ({100*ok/len(subs):.0f}%), a <= 20 Å start among them {anyok}")
        row[f"N{N}"] = [ok, len(subs), anyok]
    out["compare"][J] = row
json.dump(out, open("/tmp/ims/early_selection.json", "w"), indent=1)
