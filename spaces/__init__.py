"""What can be searched: define-by-run spaces, presets D0..D7x, the FLOPs budget and the objectives."""
from spaces.objectives import METRICS, MODES, OBJECTIVES, OverBudget, check_budget
from spaces.presets import PRESETS, preset
from spaces.search_spaces import (MODEL_SPACES, SPACES, enqueued_params, fixed_value_problems, make_space, space_label,
                                  space_names, space_parameters, warmup_bound)

__all__ = ["METRICS", "MODEL_SPACES", "MODES", "OBJECTIVES", "OverBudget", "PRESETS", "SPACES", "check_budget",
           "enqueued_params", "fixed_value_problems", "make_space", "preset", "space_label", "space_names",
           "space_parameters", "warmup_bound"]
