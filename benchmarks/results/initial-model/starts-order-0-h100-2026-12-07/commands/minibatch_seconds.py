"""Seconds per 1 000 mini-batch particles from the job logs' timestamps (whole seconds): for each start, the time
from its first to its last mini-batch line over the particles of the mini-batches in between (the per-iteration
seconds the logs print were rounded to 0.1 s, of iterations of ~0.05 s).

usage: python minibatch_seconds.py RESULTS_FOLDER"""
import glob
import os
import re
import sys


def seconds(t):
    h, m, s = map(int, t.split(":"))
    return 3600 * h + 60 * m + s


for path in sorted(glob.glob(os.path.join(sys.argv[1], "whole-job-*", "*_run.log"))):
    its = [(seconds(line[:8]), int(re.search(r": (\d+) particles", line).group(1)))
           for line in open(path).read().splitlines() if re.search(r"iteration \d+: \d+ particles", line)]
    per = []
    for s in range(0, len(its), 150):  # 150 mini-batches per start
        blk = its[s:s + 150]
        dt, n = blk[-1][0] - blk[0][0], sum(p for _, p in blk[1:])
        per.append(f"{1000.0 * dt / n:.3f}")
    print(f"{os.path.relpath(path, sys.argv[1])}: s per 1 000 mini-batch particles, start by start: {' '.join(per)}")
