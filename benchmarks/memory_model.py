"""The memory model's figures per rank (mpi_em/memory.py) for real box sizes, next to RELION's estimate for a GPU
rank (1.1e-8 x (2N)^3 GB, src/error.h). Nothing is allocated: the model is arithmetic, so this runs anywhere.

    python benchmarks/memory_model.py --json model.json > table.txt
    python benchmarks/memory_model.py --before ../model-2026-12-01/model.json > before_after.txt

refine3d: K = 1, pad 2, --folds' default for the box, batch 64, 20 000 particles, GPU ranks, the largest pose grid
of the defaults (HEALPix order 3 global search, 36 864 orientations, up to 49 coarse translations) at the full
image size (r = box/2 - 1): the model's upper bound for a run. class3d: the standard benchmark's shape (box 360,
K = 6, order 2 global, 105 247 particles). reconstruct: known poses, full accumulators and owned planes only.
'owned' rows: the EM jobs with --owned-accumulators on (each rank accumulates only its kz planes); 'single':
--accumulate single (complex64 / float32 accumulators, complex64 references) with a batch of 16. Measured peaks at
box 512 and 768: benchmarks/large_box_memory.py.
--before: the peaks of an earlier model.json beside this model's, row by row (same job names).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), ".."))

from mpi_em.jobs.em import default_folds  # noqa: E402
from mpi_em.memory import EMInputs, ReconstructInputs, estimate, relion_gpu_bytes  # noqa: E402

GB = 1e9
COLS = ("references", "accumulators", "cached_images", "batch_workspace", "fft_plans", "reconstruction")


def rows(boxes, ranks):
    out = []
    for box in boxes:
        for P in ranks:
            cases = [
                ("refine3d", EMInputs("refine3d", box, pad=2, K=1, folds=default_folds(box, 2), batch=64, ranks=P,
                                      device="gpu", n_particles=20000, coarse_poses=36864, translations=49)),
                ("refine3d owned", EMInputs("refine3d", box, pad=2, K=1, folds=default_folds(box, 2), batch=64,
                                            ranks=P, device="gpu", n_particles=20000, coarse_poses=36864,
                                            translations=49, owned_accumulators=True)),
                ("refine3d local", EMInputs("refine3d", box, pad=2, K=1, folds=default_folds(box, 2), batch=64,
                                            ranks=P, device="gpu", n_particles=20000, coarse_poses=0,
                                            translations=49)),
                ("refine3d local owned", EMInputs("refine3d", box, pad=2, K=1, folds=default_folds(box, 2),
                                                  batch=64, ranks=P, device="gpu", n_particles=20000,
                                                  coarse_poses=0, translations=49, owned_accumulators=True)),
                ("refine3d local single", EMInputs("refine3d", box, pad=2, K=1, folds=default_folds(box, 2),
                                                   batch=16, ranks=P, device="gpu", n_particles=20000,
                                                   coarse_poses=0, translations=49, accumulate="single")),
                ("refine3d local owned single", EMInputs("refine3d", box, pad=2, K=1,
                                                         folds=default_folds(box, 2), batch=16, ranks=P,
                                                         device="gpu", n_particles=20000, coarse_poses=0,
                                                         translations=49, accumulate="single",
                                                         owned_accumulators=True)),
                ("reconstruct", ReconstructInputs(box, pad=2, batch=256, ranks=P, device="gpu", n_particles=20000)),
                ("reconstruct owned", ReconstructInputs(box, pad=2, batch=16, ranks=P, device="gpu",
                                                        n_particles=20000, stream=True)),
            ]
            out += [(name, inp) for name, inp in cases]
    for P in ranks:
        out.append(("class3d K=6", EMInputs("class3d", 360, pad=2, K=6, batch=64, ranks=P, device="gpu",
                                            n_particles=105247, coarse_poses=4608, translations=9)))
        out.append(("class3d K=6 owned", EMInputs("class3d", 360, pad=2, K=6, batch=64, ranks=P, device="gpu",
                                                  n_particles=105247, coarse_poses=4608, translations=9,
                                                  owned_accumulators=True)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--boxes", type=int, nargs="+", default=[128, 256, 384, 512, 768, 1024])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--json", help="write every row (inputs, phases, terms) to this file")
    p.add_argument("--before", help="an earlier --json file: print its peak per rank beside this model's")
    a = p.parse_args(argv)
    if a.before:
        return before_after(a.before, a.boxes, a.ranks)
    head = f"{'job':20s} {'box':>5s} {'P':>2s} {'peak GB':>8s} {'phase':>14s} " + \
        " ".join(f"{c[:12]:>12s}" for c in COLS) + f" {'RELION GB':>9s}"
    print("GB = 1e9 bytes per rank; refine3d: order-3 global search at the full image size (upper bound); "
          "'refine3d local': the local searches of the last iterations")
    print(head)
    out = []
    for name, inp in rows(a.boxes, a.ranks):
        e = estimate(inp)
        t = e.terms
        print(f"{name:20s} {inp.box:5d} {inp.ranks:2d} {e.total / GB:8.1f} {e.peak_phase:>14s} "
              + " ".join(f"{t[c] / GB:12.2f}" for c in COLS) + f" {relion_gpu_bytes(inp.box) / GB:9.1f}")
        out.append(dict(e.as_dict(), job=name, inputs=dict(asdict(inp), mode=inp.mode)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


def before_after(path, boxes, ranks):
    before = {(r["job"], r["inputs"]["box"], r["inputs"]["ranks"]): r for r in json.load(open(path))}
    print(f"GB = 1e9 bytes per rank; before: {path}")
    print(f"{'job':20s} {'box':>5s} {'P':>2s} {'before GB':>9s} {'phase':>14s} {'after GB':>9s} {'phase':>14s}")
    for name, inp in rows(boxes, ranks):
        e = estimate(inp)
        old = before.get((name, inp.box, inp.ranks)) or before.get((name.replace(" owned", ""), inp.box, inp.ranks))
        o = f"{old['peak_bytes'] / GB:9.1f} {old['peak_phase']:>14s}" if old else f"{'':9s} {'':>14s}"
        print(f"{name:20s} {inp.box:5d} {inp.ranks:2d} {o} {e.total / GB:9.1f} {e.peak_phase:>14s}")


if __name__ == "__main__":
    main()
