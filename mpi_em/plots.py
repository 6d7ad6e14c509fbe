"""PNG figures: FSC curves and class-average montages (matplotlib, Agg backend, written atomically)."""
from __future__ import annotations

import numpy as np

from .io import atomic_path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fsc_png(path, freqs, curves: dict, title: str = "", threshold: float = 0.143) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, c in curves.items():
        ax.plot(freqs[1:], np.asarray(c)[1:], label=label)
    ax.axhline(threshold, color="grey", ls="--", lw=0.8, label=f"FSC = {threshold}")
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.05)
    ax.set_title(title)
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)


def montage_png(path, images, labels=None, ncols: int | None = None) -> None:
    plt = _plt()
    images = np.asarray(images)
    n = len(images)
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.6 * ncols, 1.6 * nrows), dpi=100, squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i], cmap="gray")
            if labels is not None:
                ax.set_title(str(labels[i]), fontsize=7)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)


def class_sizes_png(path, history, title: str = "") -> None:
    """Class distribution over iterations: ``history`` (iterations, K) fractions, one line per class."""
    plt = _plt()
    h = np.atleast_2d(np.asarray(history, dtype=np.float64))
    it = np.arange(1, h.shape[0] + 1)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for k in range(h.shape[1]):
        ax.plot(it, 100.0 * h[:, k], marker="o", ms=3, label=f"class {k + 1}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("particles in class (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    if h.shape[1] <= 12:
        ax.legend(loc="upper right", fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)


def guinier_png(path, x, curves: dict, fit=None, title: str = "") -> None:
    """Guinier plot: ln(amplitude) against resolution^2 (1/Å^2), one line per curve (points at -99, RELION's
    'no amplitude', left out); ``fit`` = (slope, intercept, x_low, x_high) draws the fitted line over its range."""
    plt = _plt()
    x = np.asarray(x)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, y in curves.items():
        y = np.asarray(y)
        ok = y > -99
        ax.plot(x[ok], y[ok], marker=".", ms=3, label=label)
    if fit is not None:
        slope, intercept, x0, x1 = fit
        xx = np.array([x0, x1])
        ax.plot(xx, intercept + slope * xx, color="black", ls="--", lw=1, label="fit")
    ax.set_xlabel("resolution$^2$ (1/Å$^2$)")
    ax.set_ylabel("ln(amplitude)")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
