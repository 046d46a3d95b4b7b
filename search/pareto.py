"""The Pareto front and hypervolume of (AP up, GFLOPs down) points; pure, with no Ray or MLflow."""
from __future__ import annotations

from typing import Sequence


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a dominates b when a's AP is no lower, its GFLOPs no higher, and it is strictly better in one."""
    (ap_a, flops_a), (ap_b, flops_b) = a, b
    return ap_a >= ap_b and flops_a <= flops_b and (ap_a > ap_b or flops_a < flops_b)


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the non-dominated (ap, gflops) points, sorted by GFLOPs; exact duplicates all stay.

    Sorts by GFLOPs ascending (AP descending on ties) and sweeps once, O(n log n).
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][1], -points[i][0]))
    front: list[int] = []
    best_ap = float("-inf")
    best_at_flops: tuple[float, float] | None = None
    for i in order:
        ap, flops = points[i]
        if ap > best_ap:
            front.append(i)
            best_ap, best_at_flops = ap, (ap, flops)
        elif (ap, flops) == best_at_flops:
            front.append(i)  # an exact duplicate of a front point is not dominated by it
    return front


def hypervolume(points: Sequence[Sequence[float]], reference: tuple[float, float]) -> float:
    """Area dominated by the points and bounded by reference (ap_ref, gflops_ref), e.g. (0, max GFLOPs)."""
    ap_ref, flops_ref = reference
    front = sorted((points[i] for i in pareto_front(points)), key=lambda p: p[1])
    area, prev_ap = 0.0, ap_ref
    for ap, flops in front:
        if flops >= flops_ref or ap <= prev_ap:
            continue
        area += (ap - prev_ap) * (flops_ref - flops)
        prev_ap = ap
    return area
