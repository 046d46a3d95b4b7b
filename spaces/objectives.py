"""The two search objectives and the FLOPs budget that rejects a configuration before it trains."""
from __future__ import annotations

from trainers.cost import model_cost
from trainers.spec import ModelSpec

# (metric, mode): COCO AP up, FLOPs down.
OBJECTIVES = (("map", "max"), ("gflops", "min"))
METRICS = [name for name, _ in OBJECTIVES]
MODES = [mode for _, mode in OBJECTIVES]


class OverBudget(Exception):
    """A configuration costs more FLOPs than the job allows; it is rejected without training."""


def check_budget(spec: ModelSpec, max_gflops: float | None) -> float:
    """Returns the spec's GFLOPs (multiply-adds, meta device), raising OverBudget if above max_gflops."""
    gflops = model_cost(spec).gflops
    if max_gflops is not None and gflops > max_gflops:
        raise OverBudget(f"{gflops:.3f} GFLOPs exceeds the budget of {max_gflops:g} GFLOPs")
    return gflops
