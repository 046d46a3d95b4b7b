"""Pareto fronts and hypervolumes over any number of objectives, each maximised or minimised; pure, no Ray or MLflow.

The front is written here: a direct comparison of every pair, since a search has hundreds of trials, not
millions. The hypervolume is Optuna's (its exact WFG implementation, the one its hypervolume plot uses).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from optuna._hypervolume import compute_hypervolume

# The search's objectives: COCO AP up, GFLOPs down.
AP_GFLOPS = ("max", "min")


def _losses(points: Sequence[Sequence[float]], directions: Sequence[str]) -> np.ndarray:
    """Every objective turned into one to minimise."""
    if any(d not in ("max", "min") for d in directions):
        raise ValueError(f"directions must be 'max' or 'min', got {list(directions)}")
    signs = np.array([-1.0 if d == "max" else 1.0 for d in directions])
    return np.asarray(points, dtype=float).reshape(-1, len(directions)) * signs


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str] = AP_GFLOPS) -> bool:
    """a dominates b when it is no worse in every objective and strictly better in one."""
    la, lb = _losses([a, b], directions)
    return bool(np.all(la <= lb) and np.any(la < lb))


def pareto_front(points: Sequence[Sequence[float]], directions: Sequence[str] = AP_GFLOPS) -> list[int]:
    """Indices of the non-dominated points; exact duplicates of a front point all stay.

    Sorted best-first by the last objective, then the ones before it (for AP and GFLOPs: cheapest first, and
    the higher AP first among equal GFLOPs).
    """
    losses = _losses(points, directions)
    no_worse = np.all(losses[:, None, :] <= losses[None, :, :], axis=2)  # [i, j]: i is no worse than j
    better = np.any(losses[:, None, :] < losses[None, :, :], axis=2)
    dominated = np.any(no_worse & better, axis=0) if len(losses) else np.zeros(0, bool)
    front = [i for i in range(len(losses)) if not dominated[i]]
    return sorted(front, key=lambda i: (*losses[i][::-1], i))


def hypervolume(points: Sequence[Sequence[float]], reference: Sequence[float],
                directions: Sequence[str] = AP_GFLOPS) -> float:
    """The volume the points dominate, bounded by `reference` (for AP and GFLOPs: (0, a GFLOPs ceiling)).

    Points no better than the reference in every objective add nothing.
    """
    losses = _losses(points, directions)
    ref = _losses([reference], directions)[0]
    inside = losses[np.all(losses < ref, axis=1)]
    return float(compute_hypervolume(inside, ref)) if len(inside) else 0.0


def front_ranks(points: Sequence[Sequence[float]], directions: Sequence[str] = AP_GFLOPS) -> list[int]:
    """Each point's non-dominated front: 0 for the Pareto front, 1 for the front of what is left, and so on."""
    ranks = [-1] * len(points)
    left = list(range(len(points)))
    front = 0
    while left:
        for i in pareto_front([points[j] for j in left], directions):
            ranks[left[i]] = front
        left = [j for j in left if ranks[j] < 0]
        front += 1
    return ranks


def crowding_distances(points: Sequence[Sequence[float]], directions: Sequence[str] = AP_GFLOPS) -> list[float]:
    """NSGA-II's crowding distance of each point among `points` (one front): infinite at each objective's
    extremes, else the sum over objectives of the gap between its neighbours, over that objective's range."""
    losses = _losses(points, directions)
    count = len(losses)
    if not count:
        return []
    distance = np.zeros(count)
    for column in losses.T:
        order = np.argsort(column, kind="stable")
        span = column[order[-1]] - column[order[0]]
        distance[order[0]] = distance[order[-1]] = np.inf
        if span > 0:
            for k in range(1, count - 1):
                distance[order[k]] += (column[order[k + 1]] - column[order[k - 1]]) / span
    return distance.tolist()


def pareto_keys(points: Sequence[Sequence[float]], directions: Sequence[str] = AP_GFLOPS) -> list[tuple[int, float]]:
    """Each point's rank as successive halving sorts a rung, smaller first: (front, minus its crowding distance
    inside that front). Each objective's extremes in a front (such as its cheapest point) lead it, tied."""
    ranks = front_ranks(points, directions)
    keys: list[tuple[int, float]] = [(0, 0.0)] * len(points)
    for front in set(ranks):
        members = [i for i, r in enumerate(ranks) if r == front]
        for i, d in zip(members, crowding_distances([points[i] for i in members], directions)):
            keys[i] = (front, -d)
    return keys


def pareto_order(points: Sequence[Sequence[float]], directions: Sequence[str] = AP_GFLOPS) -> list[int]:
    """Indices best-first by pareto_keys, ties by index."""
    keys = pareto_keys(points, directions)
    return sorted(range(len(points)), key=lambda i: (keys[i], i))
