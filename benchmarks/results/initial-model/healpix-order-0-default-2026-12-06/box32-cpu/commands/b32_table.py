import json, glob, os, shutil, sys
B = '/tmp/b32/res'; F = sys.argv[1]
os.makedirs(F, exist_ok=True)
rows = {}
for f in sorted(glob.glob(B + '/*.json')):
    v, rest = os.path.basename(f)[:-5].split('_', 1)
    rows.setdefault(rest, {})[v] = json.load(open(f))
    shutil.copy(f, F)
def key(r):
    s, seed = r.rsplit('_s', 1); return (s, int(seed))
print('| data, `--seed` | order 1 throughout (the default before) | order 0, passes at order 1 (the default) |')
print('|---|---|---|')
single = [r for r in rows if not r.startswith('k32b')]
for r in sorted(single, key=key):
    d = rows[r]
    cell = lambda v: f"{d[v]['fsc05_A'][0]:.1f} Å, {d[v]['seconds']:.0f} s" if v in d else '-'
    s, seed = key(r); print(f"| {s}, {seed} | {cell('def')} | {cell('o0')} |")
k = sorted([r for r in rows if r.startswith('k32b') and len(rows[r]) == 2], key=key)
summary = {}
for v in ('def', 'o0'):
    acc = [rows[r][v]['class_accuracy'] for r in k]
    fs = [x for r in k for x in rows[r][v]['fsc05_A']]
    secs = [rows[r][v]['seconds'] for r in k]
    fails = [(key(r)[1], round(rows[r][v]['class_accuracy'], 3)) for r in k if rows[r][v]['class_accuracy'] < 0.9]
    summary[v] = dict(n=len(k), ge090=sum(a >= 0.9 for a in acc), below097=sum(a < 0.97 for a in acc), fails=fails,
                      acc_min_of_ok=min(a for a in acc if a >= 0.9), acc_max=max(acc),
                      maps_A=(min(fs), max(fs)), seconds=(min(secs), max(secs)))
    print(v, summary[v])
json.dump({'single': {r: {v: rows[r][v]['fsc05_A'] for v in rows[r]} for r in single},
           'k32b': {r: {v: [rows[r][v]['class_accuracy'], rows[r][v]['fsc05_A']] for v in rows[r]} for r in k},
           'summary': summary}, open(F + '/summary.json', 'w'), indent=1)
