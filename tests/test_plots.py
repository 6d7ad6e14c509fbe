"""The PNG figures (mpi_em/plots.py): the class montage's pixels are the class images, each scaled on its own."""
import matplotlib.image
import numpy as np
import pytest

from mpi_em.plots import GAP_PX, LABEL_PX, montage_array, montage_png, tile_scale


def _images(n, box, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, box, box)) * rng.uniform(0.1, 10, (n, 1, 1)) + rng.uniform(-5, 5, (n, 1, 1))


@pytest.mark.parametrize("box", [32, 128, 400])
def test_montage_tiles_are_the_images(box):
    """Each tile is its image scaled to [0, 1] on its own, repeated (small boxes) or bin-averaged (large ones),
    at its place in the grid; white between tiles."""
    imgs = _images(7, box)
    mosaic, corners = montage_array(imgs, ncols=3, label_px=LABEL_PX)
    rep, bn = tile_scale(box)
    assert (rep > 1) == (box < 96) and (bn > 1) == (box > 192)
    for img, (r, c) in zip(imgs, corners):
        b = img[:box // bn * bn, :box // bn * bn].reshape(box // bn, bn, box // bn, bn).mean(axis=(1, 3))
        want = np.kron((b - b.min()) / (b.max() - b.min()), np.ones((rep, rep)))
        t = want.shape[0]
        np.testing.assert_allclose(mosaic[r:r + t, c:c + t], want, atol=1e-12)
        assert mosaic[r - 1, c:c + t].min() == 1.0 and mosaic[r:r + t, c + t].min() == 1.0  # the gaps
    assert corners[3] == (corners[0][0] + LABEL_PX + t + GAP_PX, corners[0][1])  # the second row
    assert mosaic.shape == (3 * (LABEL_PX + t + GAP_PX) + GAP_PX, 3 * (t + GAP_PX) + GAP_PX)


def test_montage_png_pixels(tmp_path):
    """The PNG is 8-bit grey with the montage's pixels (no resampling) inside the tiles, each rounded to the
    nearest 1/255; labels only in the bands above them."""
    from PIL import Image

    imgs = _images(50, 128, seed=1)
    path = tmp_path / "classes.png"
    montage_png(path, imgs, labels=[f"{k + 1}: {2.0:.1f}%" for k in range(50)])
    assert Image.open(path).mode == "L"
    gray = matplotlib.image.imread(path)
    mosaic, corners = montage_array(imgs, label_px=LABEL_PX)
    assert gray.shape == mosaic.shape
    t = 128
    for r, c in corners:
        np.testing.assert_allclose(gray[r:r + t, c:c + t], mosaic[r:r + t, c:c + t], atol=0.5 / 255 + 1e-7)
        assert gray[r - LABEL_PX:r, c:c + t].min() < 0.5  # a label is drawn in the band
    assert gray[corners[-1][0]:, corners[-1][1] + t + GAP_PX:].min() == 1.0  # white beyond the last tile
