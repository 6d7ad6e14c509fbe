"""STAR tables the jobs write besides the particles (:mod:`mpi_em.io.star`): an FSC curve, and the EM jobs' model
STAR (RELION's ``model_general``, ``model_classes``, noise and per-class tau^2 / FSC tables). Written atomically."""
from __future__ import annotations

import numpy as np

from .atomic import atomic_path


def write_fsc_star(path, freqs, curve) -> None:
    """An FSC curve as RELION's ``fsc`` table (spectral index, resolution in 1/Å and Å, FSC)."""
    import pandas as pd
    import starfile

    with np.errstate(divide="ignore"):
        ang = np.where(freqs > 0, 1.0 / np.where(freqs > 0, freqs, 1), 999.0)
    df = pd.DataFrame({"rlnSpectralIndex": np.arange(len(curve)), "rlnResolution": freqs,
                       "rlnAngstromResolution": ang, "rlnFourierShellCorrelation": np.asarray(curve)})
    with atomic_path(path) as tmp:
        starfile.write({"fsc": df}, tmp, float_format=None)


def write_model_star(path, general: dict, classes: dict, freqs, sigma2, tau2, fsc=None, ssnr=None) -> None:
    """An EM iteration's model STAR: ``general`` (rlnCurrentIteration, ...: one value each) and ``classes``
    (one column per label, one row per class) as RELION names them; per shell up to Nyquist (``freqs``) the noise
    spectrum ``sigma2`` and per reference its tau^2 (``tau2``: (V, shells)) with the gold-standard ``fsc`` and
    the data-vs-prior SSNR ``ssnr`` ((V, shells), RELION's rlnSsnrMap, from which a classification's resolution
    is read)."""
    import pandas as pd
    import starfile

    n_sh = len(freqs)
    blocks = {"model_general": pd.DataFrame({k: [v] for k, v in general.items()}),
              "model_classes": pd.DataFrame(classes)}
    blocks["model_optics_group_1"] = pd.DataFrame({"rlnSpectralIndex": np.arange(n_sh), "rlnResolution": freqs,
                                                   "rlnSigma2Noise": sigma2[:n_sh]})
    for v in range(tau2.shape[0]):
        cols = {"rlnSpectralIndex": np.arange(n_sh), "rlnResolution": freqs, "rlnReferenceTau2": tau2[v][:n_sh]}
        if ssnr is not None:
            cols["rlnSsnrMap"] = ssnr[v][:n_sh]
        if fsc is not None:
            cols["rlnGoldStandardFsc"] = fsc[:n_sh]
        blocks[f"model_class_{v + 1}"] = pd.DataFrame(cols)
    with atomic_path(path) as tmp:
        starfile.write(blocks, tmp, float_format=None)
