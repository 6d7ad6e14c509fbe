"""PNG figures: FSC curves and class-average montages (matplotlib, Agg backend, written atomically)."""
from __future__ import annotations

import numpy as np

from .io import atomic_path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def preload() -> None:
    """Import matplotlib's pyplot (Agg) now: the EM jobs' background writer calls this once in the rank's process,
    so that the writer processes forked from it each iteration find it imported (0.65 s per iteration on 2 CPU
    cores otherwise)."""
    _plt()


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


TILE_PX = (96, 192)  # a montage's tiles are enlarged (pixel repeat) below 96 px and binned above 192 px
LABEL_PX = 14  # the band above each tile that holds its label
GAP_PX = 4


def tile_scale(box: int) -> tuple[int, int]:
    """(repeat, bin): the integer factors that bring a box-``box`` image into TILE_PX's range for display."""
    if box < TILE_PX[0]:
        return -(-TILE_PX[0] // box), 1
    return 1, -(-box // TILE_PX[1])


def montage_array(images, ncols: int | None = None, label_px: int = 0):
    """The montage as one float image (white = 1 between tiles) and each tile's top-left corner (row, column):
    every image scaled to [0, 1] on its own (min to max) and shown at the integer scale of :func:`tile_scale`
    (pixel repeat or bin mean, no interpolation)."""
    images = np.asarray(images, dtype=np.float64)
    n, h, w = images.shape
    rep, bn = tile_scale(max(h, w))
    if bn > 1:
        h2, w2 = h // bn, w // bn
        images = images[:, :h2 * bn, :w2 * bn].reshape(n, h2, bn, w2, bn).mean(axis=(2, 4))
    lo = images.min(axis=(1, 2), keepdims=True)
    span = images.max(axis=(1, 2), keepdims=True) - lo
    tiles = (images - lo) / np.where(span > 0, span, 1.0)
    if rep > 1:
        tiles = tiles.repeat(rep, axis=1).repeat(rep, axis=2)
    th, tw = tiles.shape[1:]
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    ch, cw = label_px + th + GAP_PX, tw + GAP_PX
    mosaic = np.ones((nrows * ch + GAP_PX, ncols * cw + GAP_PX))
    corners = [(GAP_PX + (i // ncols) * ch + label_px, GAP_PX + (i % ncols) * cw) for i in range(n)]
    for t, (r, c) in zip(tiles, corners):
        mosaic[r:r + th, c:c + tw] = t
    return mosaic, corners


def _label_font():
    """Pillow's bundled font at 10 px (FreeType), or its bitmap font where Pillow is older or built without it."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=10)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def montage_png(path, images, labels=None, ncols: int | None = None) -> None:
    """Class averages (or any images) side by side, one label above each, as an 8-bit grey PNG whose pixels are
    :func:`montage_array`'s rounded to 1/255 (no resampling), the labels drawn in the bands above the tiles.
    Written with Pillow (matplotlib's image library) directly: no figure to render, a third of the bytes of
    RGBA (class2d, K = 50 at box 256: ~0.05 s instead of ~0.55 s through a matplotlib figure)."""
    from PIL import Image, ImageDraw

    label_px = LABEL_PX if labels is not None else 0
    mosaic, corners = montage_array(images, ncols, label_px)
    img = Image.fromarray(np.rint(np.clip(mosaic, 0.0, 1.0) * 255.0).astype(np.uint8))  # 2-D uint8: mode L
    if labels is not None:
        draw, font = ImageDraw.Draw(img), _label_font()
        for lab, (r, c) in zip(labels, corners):
            draw.text((c, r - label_px + 1), str(lab), fill=0, font=font)
    with atomic_path(path) as tmp:  # zlib's fastest level: noisy class averages barely compress at any level
        img.save(tmp, format="PNG", compress_level=1)


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
