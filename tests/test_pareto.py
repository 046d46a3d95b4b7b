"""The Pareto module against brute force on random points, ties and duplicates included."""
import random

import pytest

from search.pareto import dominates, hypervolume, pareto_front


def brute_front(points):
    return sorted(i for i, p in enumerate(points) if not any(dominates(q, p) for q in points))


@pytest.mark.parametrize("seed", range(200))
def test_front_matches_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(0, 30)
    # Coarse grids make ties in AP, in GFLOPs, and exact duplicates common.
    points = [(rng.randint(0, 6) / 10, rng.randint(1, 6) / 2) for _ in range(n)]
    assert sorted(pareto_front(points)) == brute_front(points)


def test_front_is_sorted_by_gflops_with_known_answer():
    points = [(0.5, 2.0), (0.3, 1.0), (0.4, 3.0), (0.5, 2.0), (0.6, 4.0), (0.2, 1.0)]
    assert pareto_front(points) == [1, 0, 3, 4]


def test_dominates_is_strict():
    assert dominates((0.5, 1.0), (0.4, 1.0))
    assert dominates((0.5, 1.0), (0.5, 2.0))
    assert not dominates((0.5, 1.0), (0.5, 1.0))
    assert not dominates((0.6, 2.0), (0.5, 1.0))


def test_hypervolume_known_value():
    # Front (0.2 @ 1), (0.5 @ 2) against reference (0, 4): 0.2*3 + 0.3*2.
    assert hypervolume([(0.2, 1.0), (0.5, 2.0), (0.1, 3.0)], (0.0, 4.0)) == pytest.approx(1.2)


@pytest.mark.parametrize("seed", range(50))
def test_hypervolume_matches_grid_count(seed):
    rng = random.Random(seed)
    points = [(rng.randint(0, 10) / 10, rng.randint(0, 10)) for _ in range(rng.randint(1, 12))]
    ref = (0.0, 10.0)
    # Count unit cells (AP step 0.1, GFLOPs step 1) dominated by some point.
    cells = sum(
        1 for a in range(10) for f in range(10)
        if any(p[0] >= (a + 1) / 10 - 1e-9 and p[1] <= f for p in points))
    assert hypervolume(points, ref) == pytest.approx(cells * 0.1)
