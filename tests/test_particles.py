import numpy as np

from mpi_em import particles
from mpi_em.distributed import make_plan
from mpi_em.io import read_particles


def test_image_cache_reads_once_and_yields_the_same_batches(small_dataset, monkeypatch):
    """An enabled cache reads the stacks on the first complete pass only and then yields the same batches; a
    disabled one reads every pass; a pass left unfinished is not kept (its batches would be missing)."""
    plan = make_plan(read_particles(small_dataset / "particles.star"), 1, seed=0)[0]
    reads = []
    real = particles.read_rows
    monkeypatch.setattr(particles, "read_rows", lambda *a, **k: reads.append(1) or real(*a, **k))
    want = [(sl, imgs.copy()) for sl, imgs in particles.iter_batches(plan, 128, prefetch=False)]
    n_batches = len(reads)
    assert n_batches == 5   # 600 particles in batches of 128
    for enabled, reads_per_pass in ((True, (n_batches, 0, 0)), (False, (n_batches,) * 3)):
        c = particles.ImageCache(np, enabled)
        for expected in reads_per_pass:
            before = len(reads)
            got = list(c.batches(plan, 128))
            assert len(reads) - before == expected
            assert [g[0] for g in got] == [w[0] for w in want]
            assert all(np.array_equal(g[1], w[1]) for g, w in zip(got, want))
    c = particles.ImageCache(np, True)
    it = c.batches(plan, 128)
    next(it)
    it.close()
    assert not c.full


def test_cache_wanted_modes():
    assert particles.cache_wanted("on", np, 10, 32) and not particles.cache_wanted("off", np, 10, 32)
    assert not particles.cache_wanted("auto", np, 10, 32)   # CPU ranks: the page cache


def test_plan_groups_particles_by_reference_set(small_dataset):
    """refine3d --folds F: the plan orders the particles by reference set ((half - 1) x F + row mod F), then by
    stack, before the balanced split, so every row is on exactly one rank and a rank holds a contiguous block of
    sets (3 ranks, 8 sets: at most 4 each, not all 8); without folds, stack order as before."""
    from mpi_em.distributed import reference_group

    star = read_particles(small_dataset / "particles.star")
    plans = make_plan(star, 3, seed=0, folds=4)
    rows = np.concatenate([p["row"] for p in plans])
    assert np.array_equal(np.sort(rows), np.arange(star.n))
    for p in plans:
        g = reference_group(p["half"], p["row"], 4)
        assert np.all(np.diff(g) >= 0) and len(np.unique(g)) <= 4
    plain = make_plan(star, 3, seed=0)
    def half(ps):
        return np.concatenate([p["half"] for p in ps])[np.argsort(np.concatenate([p["row"] for p in ps]))]

    assert np.array_equal(half(plain), half(plans))  # the same half sets
    assert np.array_equal(np.concatenate([p["row"] for p in plain]), np.lexsort((star.index, star.stack)))
