"""The Pareto module against brute force on random 2-D and 3-D points (ties, duplicates, mixed directions),
and hypervolumes against hand-computed values and cell counts."""
import itertools
import random

import pytest

from search.pareto import dominates, hypervolume, pareto_front


def brute_front(points, directions):
    """Written apart from the module: compare every pair, objective by objective."""
    def better_or_equal(x, y, d):
        return x >= y if d == "max" else x <= y

    def strictly_better(x, y, d):
        return x > y if d == "max" else x < y

    def dom(p, q):
        return (all(better_or_equal(a, b, d) for a, b, d in zip(p, q, directions))
                and any(strictly_better(a, b, d) for a, b, d in zip(p, q, directions)))

    return sorted(i for i, p in enumerate(points) if not any(dom(q, p) for q in points))


DIRECTIONS = [("max", "min"), ("min", "min"), ("max", "max"), ("max", "min", "min"), ("min", "max", "max"),
              ("max", "max", "max")]


@pytest.mark.parametrize("seed", range(60))
@pytest.mark.parametrize("directions", DIRECTIONS, ids="-".join)
def test_front_matches_brute_force(seed, directions):
    rng = random.Random(seed)
    # Coarse grids make ties in each objective, and exact duplicates, common.
    points = [tuple(rng.randint(0, 5) / 2 for _ in directions) for _ in range(rng.randint(0, 30))]
    assert sorted(pareto_front(points, directions)) == brute_front(points, directions)


def test_front_is_sorted_by_gflops_with_known_answer():
    points = [(0.5, 2.0), (0.3, 1.0), (0.4, 3.0), (0.5, 2.0), (0.6, 4.0), (0.2, 1.0)]
    assert pareto_front(points) == [1, 0, 3, 4]


def test_dominates_is_strict_in_each_direction():
    assert dominates((0.5, 1.0), (0.4, 1.0))
    assert dominates((0.5, 1.0), (0.5, 2.0))
    assert not dominates((0.5, 1.0), (0.5, 1.0))
    assert not dominates((0.6, 2.0), (0.5, 1.0))
    assert dominates((1, 1, 5), (1, 2, 4), ("min", "min", "max"))
    assert not dominates((1, 1, 5), (1, 2, 6), ("min", "min", "max"))


def test_a_bad_direction_is_named():
    with pytest.raises(ValueError, match="'up'"):
        pareto_front([(1, 2)], ("up", "min"))


def test_hypervolume_known_values():
    # Front (0.2 @ 1), (0.5 @ 2) against reference (0, 4): 0.2*3 + 0.3*2; (0.1 @ 3) is dominated.
    assert hypervolume([(0.2, 1.0), (0.5, 2.0), (0.1, 3.0)], (0.0, 4.0)) == pytest.approx(1.2)
    # Beyond the reference adds nothing; nothing at all is 0.
    assert hypervolume([(0.5, 5.0)], (0.0, 4.0)) == 0.0 and hypervolume([], (0.0, 4.0)) == 0.0
    # 3-D, all minimised against (4, 4, 4): three boxes of 3x1x1 (in turn along each axis) whose pairwise and
    # triple overlaps are all the same unit cube [3, 4]^3: 3 * 3 - 3 * 1 + 1 = 7.
    assert hypervolume([(1, 3, 3), (3, 1, 3), (3, 3, 1)], (4, 4, 4), ("min", "min", "min")) == pytest.approx(7)
    # Mixed: AP up, GFLOPs down, params down; one point (0.5, 2, 3) against (0, 4, 5): 0.5 x 2 x 2.
    assert hypervolume([(0.5, 2, 3)], (0, 4, 5), ("max", "min", "min")) == pytest.approx(2.0)


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("directions", [("max", "min"), ("max", "min", "min")], ids="-".join)
def test_hypervolume_matches_a_cell_count(seed, directions):
    """On an integer grid, the volume is the number of unit cells some point dominates."""
    rng = random.Random(seed)
    size = 6
    points = [tuple(rng.randint(0, size) for _ in directions) for _ in range(rng.randint(1, 10))]
    reference = tuple(0 if d == "max" else size for d in directions)

    def covers(point, cell):  # the cell spans [c, c+1] in each objective
        return all(p >= c + 1 if d == "max" else p <= c for p, c, d in zip(point, cell, directions))

    cells = sum(1 for cell in itertools.product(range(size), repeat=len(directions))
                if any(covers(point, cell) for point in points))
    assert hypervolume(points, reference, directions) == pytest.approx(cells)


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("directions", DIRECTIONS[:4], ids="-".join)
def test_front_ranks_peel_brute_force_fronts(seed, directions):
    from search.pareto import front_ranks

    rng = random.Random(seed)
    points = [tuple(rng.randint(0, 4) / 2 for _ in directions) for _ in range(rng.randint(0, 25))]
    expected, left, front = [None] * len(points), list(range(len(points))), 0
    while left:
        for i in brute_front([points[j] for j in left], directions):
            expected[left[i]] = front
        left = [j for j in left if expected[j] is None]
        front += 1
    assert front_ranks(points, directions) == expected


def test_crowding_distance_by_hand():
    from search.pareto import crowding_distances

    # One front of (AP, GFLOPs), AP range 0.5 and GFLOPs range 3.5: the two extremes are infinite; each inner
    # point adds its neighbours' gaps over each range.
    points = [(0.1, 0.5), (0.3, 1.0), (0.5, 2.0), (0.6, 4.0)]
    distances = crowding_distances(points)
    assert distances[0] == distances[3] == float("inf")
    assert distances[1] == pytest.approx(0.4 / 0.5 + 1.5 / 3.5)
    assert distances[2] == pytest.approx(0.3 / 0.5 + 3.0 / 3.5)
    assert crowding_distances([]) == []


def test_pareto_order_puts_a_fronts_two_extremes_first_then_its_middle_then_the_next_front():
    from search.pareto import pareto_order

    # Fronts: {0, 1, 2} (0 cheapest, 2 most accurate), then {3}, then {4}. Both extremes have an infinite crowding
    # distance, so they tie, and the tie goes by index: the listed order of the extremes is not a ranking.
    points = [(0.10, 0.05), (0.30, 0.10), (0.50, 0.20), (0.25, 0.12), (0.20, 0.30)]
    assert pareto_order(points) == [0, 2, 1, 3, 4]
    swapped = [points[2], points[1], points[0], points[3], points[4]]  # the most accurate listed first
    assert pareto_order(swapped) == [0, 2, 1, 3, 4]
