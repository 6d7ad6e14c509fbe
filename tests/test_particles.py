import numpy as np
import pytest

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


@pytest.mark.parametrize("size,folds,sets_per_rank", [(2, 1, 1), (4, 1, 1), (4, 2, 1), (8, 2, 1), (3, 1, 2),
                                                      (2, 2, 2), (2, 4, 4), (4, 4, 2), (3, 4, 4)])
def test_plan_by_set_gives_each_rank_its_own_sets(small_dataset, size, folds, sets_per_rank):
    """refine3d's plan (by_set): where the ranks divide evenly among the 2 x folds reference sets, each rank holds
    the particles of one set only (2 ranks: one half set each), split evenly within the set; where the sets divide
    evenly among the ranks, sets / ranks whole sets each; otherwise the balanced blocks of the set-ordered
    particles (at most ceil(sets / ranks) + 1 sets per rank). Every particle on
    exactly one rank, the half sets unchanged; each rank's references (:func:`reference_volumes`) are its sets'."""
    from mpi_em.distributed import assign_halves, reference_group
    from mpi_em.em.steps import reference_volumes

    star = read_particles(small_dataset / "particles.star")
    halves = assign_halves(star.n, star.random_subset, 0)
    plans = make_plan(star, size, seed=0, halves=halves, folds=folds, by_set=True)
    rows = np.concatenate([p["row"] for p in plans])
    assert len(plans) == size and np.array_equal(np.sort(rows), np.arange(star.n))
    counts = np.bincount(reference_group(halves, np.arange(star.n), folds))
    for p in plans:
        assert np.array_equal(p["half"], halves[p["row"]])
        g = np.unique(reference_group(p["half"], p["row"], folds))
        assert len(g) <= sets_per_rank
        assert np.array_equal(reference_volumes(p, 1, folds), g)
        assert np.array_equal(reference_volumes(p, 3, folds), (g[:, None] * 3 + np.arange(3)).ravel())
        if sets_per_rank == 1:  # the set's particles split evenly over its ranks
            assert abs(len(p["row"]) - counts[g[0]] / (size // (2 * folds))) <= 1
        elif (2 * folds) % size == 0:  # whole sets
            assert len(g) == sets_per_rank and len(p["row"]) == counts[g].sum()
    empty = {"half": np.zeros(0, np.int64), "row": np.zeros(0, np.int64)}
    assert np.array_equal(reference_volumes(empty, 2, 1), [0, 1])  # no particles: the first set (projects nothing)
