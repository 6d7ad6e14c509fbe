"""Per shell, mpi-em's and RELION's data-vs-prior SSNR (rlnSsnrMap, mean over classes), reference tau^2 and noise
power (rlnSigma2Noise) of one iteration's model STAR files in models/; the two programs' tau^2 and sigma^2 are in
different Fourier normalisations (RELION's transform is divided by N^2 in 2D), the SSNR is unitless.

    python compare_ssnr.py 1      # iteration 1
"""
import os
import sys

import numpy as np
import starfile

HERE = os.path.dirname(os.path.abspath(__file__))


def load(path):
    m = starfile.read(path, always_dict=True)
    cls = m["model_classes"]
    K = len(cls)
    ssnr = np.array([m[f"model_class_{k + 1}"]["rlnSsnrMap"].to_numpy() for k in range(K)])
    tau2 = np.array([m[f"model_class_{k + 1}"]["rlnReferenceTau2"].to_numpy() for k in range(K)])
    sigma2 = next(m[b]["rlnSigma2Noise"].to_numpy() for b in m
                  if b.startswith(("model_optics_group", "model_group_")) and "rlnSigma2Noise" in m[b])
    g = m["model_general"]
    res = float(g["rlnCurrentResolution"].iloc[0] if hasattr(g, "iloc") else g["rlnCurrentResolution"])
    return ssnr, tau2, sigma2, cls["rlnClassDistribution"].to_numpy(), res


def main(it: int) -> None:
    a = load(os.path.join(HERE, "models", f"mpi_em_run_it{it:03d}_model.star"))
    b = load(os.path.join(HERE, "models", f"relion_run_it{it:03d}_model.star"))
    print(f"iteration {it}: resolution mpi-em {a[4]:.2f} Å, RELION {b[4]:.2f} Å; class shares "
          f"{np.round(a[3], 3).tolist()} / {np.round(b[3], 3).tolist()}")
    print(f"{'shell':>5} {'SSNR mpi-em':>12} {'SSNR RELION':>12} {'ratio':>8} {'sigma2 mpi-em':>14} "
          f"{'sigma2 RELION':>14} {'ratio / N^4':>12}")
    n4 = float(64 ** 4)
    for s in range(min(a[0].shape[1], b[0].shape[1], 20)):
        so, sr = a[0][:, s].mean(), b[0][:, s].mean()
        print(f"{s:>5} {so:>12.4g} {sr:>12.4g} {so / sr if sr else float('nan'):>8.3f} {a[2][s]:>14.4g} "
              f"{b[2][s]:>14.4g} {a[2][s] / b[2][s] / n4 if b[2][s] else float('nan'):>12.3f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
