"""The two search objectives and the FLOPs budget that rejects a configuration before it trains."""
from __future__ import annotations

from trainers.spec import ModelSpec

# (metric, mode): COCO AP up, FLOPs down.
OBJECTIVES = (("map", "max"), ("gflops", "min"))
METRICS = [name for name, _ in OBJECTIVES]
MODES = [mode for _, mode in OBJECTIVES]


class OverBudget(Exception):
    """A configuration costs more FLOPs than the job allows; it is rejected without training."""


def check_budget(spec: ModelSpec, max_gflops: float | None, max_params_m: float | None = None) -> float:
    """Returns the spec's GFLOPs (multiply-adds, meta device), raising OverBudget if above max_gflops or with
    more than max_params_m million parameters."""
    from trainers.cost import model_cost  # torch, effdet and timm: reading a job file should not wait for them

    cost = model_cost(spec)
    if max_gflops is not None and cost.gflops > max_gflops:
        raise OverBudget(f"{cost.gflops:.3f} GFLOPs exceeds the budget of {max_gflops:g} GFLOPs")
    if max_params_m is not None and cost.params_m > max_params_m:
        raise OverBudget(f"{cost.params_m:.3f}M parameters exceed the budget of {max_params_m:g}M")
    return cost.gflops
