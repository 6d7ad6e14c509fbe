"""The box-256 class3d row from the files in this folder (the side-by-side script was stopped before it wrote its
JSON; see ../README.md): RELION's iteration ends from its data STARs' modification times (mtimes.txt, as the script
takes them), ours from run.log. Prints the figures quoted in the README."""
import datetime as dt
import json
import os
import re
import statistics as st

here = os.path.dirname(os.path.abspath(__file__))
mt = dict(line.split() for line in open(os.path.join(here, "mtimes.txt")))
ends = {int(re.search(r"it(\d+)_data", n).group(1)): float(t) for n, t in mt.items()
        if re.fullmatch(r"relion/run_it\d+_data.star", n)}
# RELION's launch: its iteration-0 data STAR 4.66 s after it, and its exit 3.2 s after the last one, as in the
# 5-iteration box-256 class3d job of ../h100-classes-refine3d-2026-12-05/box256/side_by_side.json
relion_wall = 4.66 + (ends[25] - ends[0]) + 3.2
relion_it = st.median(ends[i] - ends[i - 1] for i in range(2, 26))
ts = {}
for line in open(os.path.join(here, "mpi_em", "run.log")):
    m = re.match(r"(\S+ \S+),(\d+) iteration (\d+): E-step", line)
    if m:
        ts[int(m.group(3))] = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1e3
ours = [ts[i] - ts[i - 1] for i in range(2, 26)]
reseeded = sorted({int(m.group(1)) for m in re.finditer(r"iteration (\d+): re-seeded", open(os.path.join(here, "mpi_em", "run.log")).read())})
ours_wall = 30.1  # the script's wall clock of our job (mpirun to exit), printed in its log before it was stopped
rows = {"relion_wall_s_estimated": relion_wall, "relion_s_per_iteration": relion_it,
        "relion_iteration_range_s": [min(ends[i] - ends[i - 1] for i in range(2, 26)), max(ends[i] - ends[i - 1] for i in range(2, 26))],
        "ours_wall_s": ours_wall, "ours_s_per_iteration": st.median(ours),
        "ours_s_per_iteration_without_reseeding": st.median(ours[i - 2] for i in range(2, 26) if i not in reseeded),
        "ours_reseeding_iterations": reseeded,
        "ours_extra_s_in_reseeding_iterations": sum(ours[i - 2] for i in reseeded if i >= 2) - len([i for i in reseeded if i >= 2]) * st.median(ours[i - 2] for i in range(2, 26) if i not in reseeded),
        "ratio_wall": relion_wall / ours_wall, "ratio_per_iteration": relion_it / st.median(ours)}
print(json.dumps(rows, indent=1))
