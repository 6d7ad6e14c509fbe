"""Is the likelihood's ranking of the starts an overfit of each map to the particles it was built from? Per-particle
log-likelihoods of each seed's comparison pass (its map after mini-batch 150 alone, `initial-model --iter 0 --start
MAP --ini-high 15 --final-high 15 --final-passes 1`: run_data.star's rlnLogLikeliContribution), and each particle's
weight in that seed's final running sums (mini-batch rows and decays are pure functions of the seed:
mpi_em.initial.schedule): (1) each map's mean advantage over the other maps on the particles that built it against
the rest; (2) the keep-the-likeliest order with the sums restricted to particles of weight <= w in every seed's sums
(held out from all the maps compared).

usage: python heldout_rule.py [PASS_FOLDER]   (PASS_FOLDER/pS/run_data.star for S = 16..21; else ll_per_particle.npz
beside this script: the log-likelihoods less their per-particle mean over the six maps, float32)"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), *[".."] * 4))
from mpi_em.initial.schedule import minibatch_rows, sums_decay  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SEEDS = [16, 17, 18, 19, 20, 21]
FSC = {16: 33.4, 17: 35.5, 18: 32.4, 19: 22.3, 20: 20.1, 21: 19.3}  # seedS.json, FSC 0.5 vs truth (Å)
N, ITER, BATCH = 20000, 150, 350

if len(sys.argv) > 1:
    import starfile

    L = np.stack([starfile.read(os.path.join(sys.argv[1], f"p{s}", "run_data.star"))["particles"]
                  ["rlnLogLikeliContribution"].to_numpy() for s in SEEDS])
    np.savez_compressed(os.path.join(HERE, "ll_per_particle.npz"), seeds=SEEDS,
                        ll_less_mean=(L - L.mean(axis=0)).astype(np.float32))
else:
    L = np.load(os.path.join(HERE, "ll_per_particle.npz"))["ll_less_mean"].astype(np.float64)


def weights(seed):
    """Each particle's weight in the seed's running sums after its last mini-batch (S <- d S + S_batch)."""
    w = np.zeros(N)
    for j in range(1, ITER + 1):
        if j > 1:
            w *= sums_decay(j, ITER, 0.5, 0.9)
        w[minibatch_rows(N, BATCH, seed, j)] += 1.0
    return w


W = np.stack([weights(s) for s in SEEDS])
print("(1) mean log-likelihood advantage of each map over the other five, per particle:")
for i, s in enumerate(SEEDS):
    own = W[i] > 0.05
    adv = L[i] - np.delete(L, i, axis=0).mean(axis=0)
    print(f"  seed {s} ({FSC[s]} Å): on the {own.sum()} particles of weight > 0.05 in its sums {adv[own].mean():+.3f}, "
          f"on the other {(~own).sum()} {adv[~own].mean():+.3f}")
print("(2) order by summed log-likelihood (seed: FSC vs truth: sum less the best's), best first:")
for thr in (None, 0.3, 0.1, 0.03, 0.01):
    held = np.ones(N, bool) if thr is None else (W <= thr).all(axis=0)
    tot = L[:, held].sum(axis=1)
    order = np.argsort(-tot)
    label = "all particles" if thr is None else f"weight <= {thr} in every seed's sums"
    print(f"  {label} ({held.sum()}): " + ", ".join(f"{SEEDS[i]}: {FSC[SEEDS[i]]} Å: {tot[i] - tot.max():+.0f}"
                                                     for i in order))
