import json, re, glob, starfile, numpy as np
rows=[]
for f in sorted(glob.glob('/tmp/fr/r*/run.json'), key=lambda p:int(re.findall(r'r(\d+)/',p)[0])):
    s=int(re.findall(r'r(\d+)/',f)[0])
    d=json.load(open(f'/tmp/fr/seed{s}.json')); r=json.load(open(f))
    t=starfile.read(f'/tmp/fr/r{s}/fsc.star'); t=t if not isinstance(t,dict) else list(t.values())[0]
    fsc=t['rlnFourierShellCorrelation'].values
    ll=float(re.findall(r"summed log-likelihood (\S+)", open(f'/tmp/fr/p{s}/run.log').read())[0]) if re.findall(r"summed log-likelihood (\S+)", open(f'/tmp/fr/p{s}/run.log').read()) else None
    rows.append((s, d['fsc05_A'][0], ll, fsc[8:12].mean(), fsc[12:20].mean(), fsc[12:32].mean()))
for r in sorted(rows, key=lambda r:r[1]): print("seed %d truth %.1f  ll %s  fsc8-11 %.3f  fsc12-19 %.3f fsc12-31 %.3f"%(r[0],r[1],r[2],r[3],r[4],r[5]))
