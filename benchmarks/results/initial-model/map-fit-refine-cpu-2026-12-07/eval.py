"""Map vs truth of the initial models and refinements of commands/run.sh: FSC 0.5 after the pose-based alignment
(every earlier record's figure) and after fitting from there (mpi_em.align.align_to_truth(refine=True)); the
refinements' gold-standard figure from their run_model.star. usage: python eval.py DATA WORK -> table, eval.json"""
import json
import os
import sys

import starfile

from mpi_em.align import align_to_truth, resolution_to_truth
from mpi_em.io import read_map

HERE = os.path.dirname(os.path.abspath(__file__))
d, w = sys.argv[1:3]
truth, apix = read_map(os.path.join(d, "truth.mrc"))
true = starfile.read(os.path.join(d, "particles.star"))["particles"]


def ang(df):
    return [df[c].values for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")]


rows = {}
print("| run | gold-standard | map vs truth, pose-based alignment | fitted | moved by the fit (cc) |")
print("|---|---|---|---|---|")
for name in ("s3", "s3o2", "s21", "r_s3", "r_s21", "r_truth"):
    path = os.path.join(w, name)
    if not os.path.exists(os.path.join(path, "run_class001.mrc")):
        continue
    vol, _ = read_map(os.path.join(path, "run_class001.mrc"))
    est = starfile.read(os.path.join(path, "run_data.star"))["particles"]
    row = {}
    for refine in (False, True):
        al, how, cc = align_to_truth(vol, truth, ang(est), ang(true), refine=refine)
        row["fit" if refine else "poses"] = {"fsc05_A": resolution_to_truth(al, truth, apix), "hand": how, "cc": cc}
    if name.startswith("r_"):
        gen = starfile.read(os.path.join(path, "run_model.star"))["model_general"]
        row["gold_standard_A"] = float(gen["rlnCurrentResolution"].iloc[0])
    rows[name] = row
    gs = f"{row['gold_standard_A']:.2f} Å" if "gold_standard_A" in row else "-"
    print(f"| {name} | {gs} | {row['poses']['fsc05_A']:.2f} Å ({row['poses']['hand']}) | {row['fit']['fsc05_A']:.2f} Å "
          f"| cc {row['poses']['cc']:.4f} -> {row['fit']['cc']:.4f} |")
json.dump(rows, open(os.path.join(HERE, "eval.json"), "w"), indent=1)
