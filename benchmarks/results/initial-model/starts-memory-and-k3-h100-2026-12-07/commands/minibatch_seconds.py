"""Seconds per 1 000 mini-batch particles from the per-iteration seconds the job logs (to 0.01 s): K = 3 before
the consensus split (iterations 2-45) and after it (47-150); one class: each start's iterations 2-150.

usage: python minibatch_seconds.py RUN_LOG..."""
import re
import sys

for path in sys.argv[1:]:
    text = open(path).read()
    its = [(int(m.group(1)), float(m.group(2)), float(m.group(3)))
           for m in re.finditer(r"iteration (\d+): (\d+) particles.*?, ([\d.]+) s", text)]

    def per(a, b):
        sel = [x for x in its if a <= x[0] <= b]
        return 1000.0 * sum(x[2] for x in sel) / sum(x[1] for x in sel)

    split = re.search(r"iteration (\d+): the consensus split", text)
    if split:
        s = int(split.group(1))
        print(f"{path}: K = 1 before the split (2-{s - 1}) {per(2, s - 1):.3f}, K = 3 after it ({s + 1}-150) "
              f"{per(s + 1, 150):.3f} s per 1 000")
    else:
        print(f"{path}: start by start " + " ".join(f"{per(k * 150 + 2, (k + 1) * 150):.3f}"
                                                     for k in range(len(its) // 150)) + " s per 1 000")
