"""Measure `mpi-em initial-model` on simulated data with known truth: seconds, seconds per 1 000 particles of
mini-batch, map vs truth FSC(0.5) (each class against its conformation, either hand) and class accuracy.

usage: python benchmarks/initial_model.py --work DIR [--data SIM_DIR] [--box 64 --n 20000 --snr 0.05 --apix 2.5
                                          --conformations 1 --sim-seed 1 --domains ...] [--K 1] [--ranks 1]
                                          [--device auto] [--json OUT.json] [--fit] [-- initial-model options ...]
       python benchmarks/initial_model.py --work DIR --data SIM_DIR --relion PATH/relion_refine
                                          [--relion-mode sgd|vdam] [--threads T] [-- more relion_refine options]

With --relion the same data go through RELION's initial model instead (the reference implementation, same
measures): `sgd` = RELION 3.1's stochastic gradient descent (`--sgd`, its GUI's defaults: 50 + 200 + 50 iterations,
35 -> 15 Å, mini-batches 100 -> 500), `vdam` = RELION 4/5's gradient-driven VDAM (`--grad --iter 200`, its GUI's
defaults; add `--gpu ""` after `--` for its GPU code). Both with HEALPix order 1, oversampling 1, offsets 6 / 2
px, `--flatten_solvent --zero_mask`, C1, the particle diameter mpi-em uses (80% of the box); an option given after
`--` replaces the one set here. Its last iteration's map and particle poses are measured.

Without --data, `mpi-em simulate` writes the data set into WORK/data (reused when its particles.star is there).
The run goes to WORK/run (replaced). Options after `--` are passed to `mpi-em initial-model` as they are
(e.g. `-- --iter 60 --batch-size 500 --healpix-order 2`). Maps are put onto the truth with mpi_em.align (the
rotation from the particles' poses against the true ones, the mirrored hand tried too; `fsc05_A`), and then
fitted to the truth from there (a local search of the rotation and of a shift below a pixel; `fsc05_fit_A`, as a
fit in a map viewer: the poses' mean rotation is several degrees off when many poses are wrong); with --conformations 2
each truth conformation is compared with the class holding most of its particles. Class accuracy: the best
one-to-one assignment of classes to conformations when K equals their number, else each class to the
conformation most of its particles have.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import starfile

from mpi_em.align import align_to_truth, refine_alignment, resolution_to_truth
from mpi_em.evaluate import class_accuracy
from mpi_em.io import read_map

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the scripts' shared parts
from gpu_memory import GpuSampler  # noqa: E402


def best_accuracy(assigned, truth) -> float:
    """Class accuracy: best one-to-one matching of classes to labels when their numbers agree, else majority."""
    assigned, truth = np.asarray(assigned), np.asarray(truth)
    classes, labels = np.unique(assigned), np.unique(truth)
    if len(classes) != len(labels) or len(classes) > 6:
        return float(class_accuracy(assigned, truth))
    best = 0.0
    for perm in itertools.permutations(labels):
        m = dict(zip(classes, perm))
        best = max(best, float(np.mean(np.vectorize(m.get)(assigned) == truth)))
    return best


def angles(df):
    return df.rlnAngleRot.values, df.rlnAngleTilt.values, df.rlnAnglePsi.values


def evaluate(data: str, run: str, K: int, fit: bool = False) -> dict:
    """FSC(0.5) of each truth conformation against its class (``fsc05_A``: put onto the truth by the poses, as
    every earlier record; ``fsc05_fit_A``: then fitted, with ``fit``; empty without), class accuracy (rows in the same order)."""
    est = starfile.read(os.path.join(run, "run_data.star"))["particles"]
    true = starfile.read(os.path.join(data, "particles.star"))["particles"]
    assert len(est) == len(true)
    if "rlnImageName" in est and "rlnImageName" in true:  # rows in the truth's order (RELION may reorder them)
        def key(names):  # "N@folder/stack.mrcs" -> "N@stack.mrcs": the folders differ between programs
            return [f"{int(x.split('@')[0])}@{os.path.basename(x.split('@')[1])}" for x in names]

        order = dict(zip(key(est.rlnImageName.values), range(len(est))))
        est = est.iloc[[order[k] for k in key(true.rlnImageName.values)]].reset_index(drop=True)
    cls = est.rlnClassNumber.values.astype(int)
    conf = true.rlnClassNumber.values.astype(int) if "rlnClassNumber" in true else np.ones(len(true), int)
    n_conf = int(conf.max())
    out = {"class_counts": np.bincount(cls, minlength=K + 1)[1:].tolist(), "fsc05_A": [], "hand": [],
           "fsc05_fit_A": []}
    if n_conf > 1:
        out["class_accuracy"] = best_accuracy(cls, conf)
    for c in range(1, n_conf + 1):
        truth_path = os.path.join(data, "truth.mrc" if n_conf == 1 else f"truth_class{c:03d}.mrc")
        truth, apix = read_map(truth_path)
        members = conf == c
        k = int(np.bincount(cls[members], minlength=K + 1)[1:].argmax()) + 1  # the class most of them are in
        vol, _ = read_map(os.path.join(run, f"run_class{k:03d}.mrc"))
        sel = members & (cls == k)
        if sel.sum() < 3:
            sel = members
        aligned, how, _, M = align_to_truth(vol, truth, [a[sel] for a in angles(est)],
                                            [a[sel] for a in angles(true)], rotation=True)
        out["fsc05_A"].append(resolution_to_truth(aligned, truth, apix))
        out["hand"].append(how)
        if fit:  # then fitted to the truth from there (a local search of the rotation and a shift below a pixel)
            out["fsc05_fit_A"].append(resolution_to_truth(refine_alignment(vol, truth, M)[0], truth, apix))
    return out


def relion_command(a, star: str, run: str, extra: list) -> list:
    """RELION's initial-model job as its GUI writes it (3.1: SGD; 4/5: VDAM), on the particles of ``star``."""
    first = starfile.read(star, always_dict=True)
    optics = first.get("optics")
    apix = float(optics.rlnImagePixelSize.iloc[0]) if optics is not None else 1.0
    box = int(optics.rlnImageSize.iloc[0]) if optics is not None else 64
    exe = os.path.join(a.relion, "relion_refine") if os.path.isdir(a.relion) else a.relion
    cmd = [exe, "--i", star, "--o", os.path.join(run, "run"), "--denovo_3dref", "--ctf", "--K", str(a.K),
           "--sym", "C1", "--flatten_solvent", "--zero_mask", "--dont_combine_weights_via_disc", "--pool", "3",
           "--pad", "1", "--particle_diameter", f"{0.8 * box * apix:.1f}", "--oversampling", "1",
           "--healpix_order", "1", "--offset_range", "6", "--offset_step", "2", "--j", str(a.threads)]
    if a.relion_mode == "sgd":
        cmd += ["--sgd", "--sgd_ini_iter", "50", "--sgd_inbetween_iter", "200", "--sgd_fin_iter", "50",
                "--sgd_write_iter", "20", "--sgd_ini_resol", "35", "--sgd_fin_resol", "15", "--sgd_ini_subset", "100",
                "--sgd_fin_subset", "500", "--skip_gridding"]
    else:
        cmd += ["--grad", "--iter", "200", "--grad_write_iter", "10", "--auto_sampling", "--tau2_fudge", "4"]
    # options after -- replace the same option's value above (RELION reads an option's first occurrence), or are added
    extra = list(extra)
    while extra:
        opt = extra.pop(0)
        val = [extra.pop(0)] if extra and not extra[0].startswith("--") else []
        if opt in cmd and val:
            cmd[cmd.index(opt) + 1] = val[0]
        elif opt not in cmd:
            cmd += [opt] + val
    return cmd


def relion_outputs(run: str, K: int) -> None:
    """RELION's last iteration as run_data.star (rows in the input's order) and run_classKKK.mrc."""
    last = max(int(m.group(1)) for f in os.listdir(run) if (m := re.match(r"run_it(\d+)_data\.star$", f)))
    stem = os.path.join(run, f"run_it{last:03d}")
    shutil.copy(stem + "_data.star", os.path.join(run, "run_data.star"))
    for k in range(1, K + 1):
        shutil.copy(f"{stem}_class{k:03d}.mrc", os.path.join(run, f"run_class{k:03d}.mrc"))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = []
    if "--" in argv:
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True)
    p.add_argument("--data", help="a `mpi-em simulate` output to use instead of simulating")
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--snr", type=float, default=0.05)
    p.add_argument("--apix", type=float, default=2.5)
    p.add_argument("--conformations", type=int, default=1, choices=[1, 2])
    p.add_argument("--sim-seed", type=int, default=1)
    p.add_argument("--domains", type=int, default=None, help="passed to simulate (lumpy phantoms)")
    p.add_argument("--domain-spread", type=float, default=None)
    p.add_argument("--domain-distance", type=float, default=None)
    p.add_argument("--K", type=int, default=1)
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    p.add_argument("--json", help="write the row here (default WORK/initial_model.json)")
    p.add_argument("--fit", action="store_true",
                   help="also fit each map to the truth after the pose-based alignment (fsc05_fit_A; ~20-50 s a "
                        "map at box 64 on one core)")
    p.add_argument("--relion", metavar="RELION_REFINE",
                   help="run RELION's initial model with this relion_refine (or relion_refine_mpi) instead of mpi-em's")
    p.add_argument("--relion-mode", choices=["sgd", "vdam"], default="sgd")
    p.add_argument("--threads", type=int, default=1, help="RELION's --j (default 1)")
    a = p.parse_args(argv)
    os.makedirs(a.work, exist_ok=True)
    py = [sys.executable, "-m", "mpi_em"]
    data = a.data or os.path.join(a.work, "data")
    if not a.data and not os.path.exists(os.path.join(data, "particles.star")):
        sim = ["simulate", "--out", data, "--box", a.box, "--n", a.n, "--snr", a.snr, "--apix", a.apix,
               "--seed", a.sim_seed, "--conformations", a.conformations, "--device", a.device]
        for k in ("domains", "domain_spread", "domain_distance"):
            if getattr(a, k) is not None:
                sim += ["--" + k.replace("_", "-"), getattr(a, k)]
        subprocess.run(py + [str(x) for x in sim], check=True)
    run = os.path.join(a.work, "run")
    shutil.rmtree(run, ignore_errors=True)
    star = os.path.abspath(os.path.join(data, "particles_unaligned.star"))
    if a.relion:
        run = os.path.abspath(run)
        cmd = relion_command(a, star, run, passthrough)
        os.makedirs(run)
    else:
        cmd = py + ["initial-model", "--i", star, "--o", run, "--K", str(a.K), "--device", a.device] + passthrough
    if a.ranks > 1:
        cmd = [shutil.which("mpirun") or "mpirun", "-n", str(a.ranks)] + cmd
    with GpuSampler(a.device == "gpu" or bool(a.relion)) as gpu:
        t0 = time.time()
        # RELION opens the images relative to its working folder (its project folder): the data set's
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=data if a.relion else None)
        seconds = time.time() - t0
    with open(os.path.join(a.work, "run.log"), "w") as f:
        f.write(r.stdout + r.stderr)
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-3000:])
        return r.returncode
    if a.relion:
        relion_outputs(run, a.K)
    its = re.findall(r"iteration \d+: (\d+) particles .* ([\d.]+) s(?:; checkpoint)?\n", r.stdout + r.stderr)
    batch_n = sum(int(n) for n, _ in its)
    batch_s = sum(float(s) for _, s in its)
    fin = re.findall(r"final pass \d+ of \d+ over all \d+ particles .*: ([\d.]+) s", r.stdout + r.stderr)
    n_data = len(starfile.read(os.path.join(data, "particles.star"))["particles"])
    truth1 = os.path.join(data, "truth.mrc")
    box = read_map(truth1 if os.path.exists(truth1) else os.path.join(data, "truth_class001.mrc"))[0].shape[0]
    row = {"program": f"RELION {a.relion_mode} ({a.relion})" if a.relion else "mpi-em initial-model",
           "command": cmd, "box": box, "n": n_data, "snr": None if a.data else a.snr, "K": a.K, "ranks": a.ranks,
           "device": a.device, "options": passthrough, "seconds": seconds,
           "seconds_per_1000_minibatch": 1000.0 * batch_s / batch_n if batch_n else None,
           "seconds_final_pass": sum(map(float, fin)) if fin else None, "data": data,
           "peak_gpu_mib": gpu.peak_mib}
    row.update(evaluate(data, run, a.K, fit=a.fit))
    model_star = os.path.join(run, "run_model.star")
    tables = starfile.read(model_star, always_dict=True) if os.path.exists(model_star) else {}
    if "model_starts" in tables:  # --starts / several --start maps: each start's log-likelihood, the one kept
        t = tables["model_starts"]
        row["starts"] = {"seeds": t["rlnRandomSeed"].tolist(), "loglike": t["rlnLogLikelihood"].tolist(),
                         "chosen": int(np.flatnonzero(t["rlnSelected"].values == 1)[0]) + 1}
    row["conformations"] = len(row["fsc05_A"])
    print("| box | n | SNR | K | conf | ranks | device | s | s / 1000 mini-batch | final pass s | FSC 0.5 vs truth (Å) "
          "| class accuracy | options |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    fsc_txt = ", ".join(f"{x:.1f} ({h})" for x, h in zip(row["fsc05_A"], row["hand"]))
    if row["fsc05_fit_A"]:
        fsc_txt += "; fitted " + ", ".join(f"{x:.1f}" for x in row["fsc05_fit_A"])
    acc = f"{row['class_accuracy']:.3f}" if "class_accuracy" in row else "-"
    per = f"{row['seconds_per_1000_minibatch']:.2f}" if row["seconds_per_1000_minibatch"] else "-"
    print(f"| {box} | {n_data} | {a.snr if not a.data else '-'} | {a.K} | {len(row['fsc05_A'])} | {a.ranks} | {a.device} | {seconds:.1f} | {per} "
          f"| {row['seconds_final_pass'] or '-'} | {fsc_txt} | {acc} | {' '.join(passthrough)} |")
    with open(a.json or os.path.join(a.work, "initial_model.json"), "w") as f:
        json.dump(row, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
