"""Ray's OptunaSearch with the FLOPs budget applied to each proposal, so an over-budget one never starts a trial.

Written here because neither library has it: Ray's searcher has no hook between a proposal and a trial start,
and Optuna's samplers only learn a constraint from a trial that was told. Every proposal gets its GFLOPs over
the budget as an Optuna constraint (`Trial.set_constraint`: feasible at <= 0), and an over-budget one is
told at once, as PRUNED, so TPE, NSGA-II and GP rank it infeasible and steer away from it. Optuna gets its
own state and the true cost, never a made-up objective value. Then the searcher asks again.
"""
from __future__ import annotations

import json
from typing import Callable, Optional

from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from trainers.cost import model_cost
from trainers.spec import ModelSpec

GFLOPS_ATTR = "gflops"
STATE_ATTR = "effsearch.state"
BUDGET_CONSTRAINT = "gflops_over_budget"
# Proposals in a row over budget before the search gives up on the space.
MAX_PROPOSALS = 500


class GflopsCounter:
    """GFLOPs of a proposed spec dict, each configuration counted once (a count builds the model on meta).
    A class, not a closure: Tune pickles the searcher with its controller's checkpoints."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.counted: dict[str, float] = {}

    def __call__(self, spec: dict) -> float:
        key = json.dumps(spec, sort_keys=True)
        if key not in self.counted:
            self.counted[key] = model_cost(ModelSpec.from_dict({**spec, "num_classes": self.num_classes},
                                                               where="proposed spec")).gflops
        return self.counted[key]


class BudgetedOptunaSearch(OptunaSearch):
    """OptunaSearch whose suggest() only returns configurations within max_gflops; `proposals` keeps
    (gflops, feasible) of every proposal in order. If MAX_PROPOSALS in a row are over budget it ends the
    search (Searcher.FINISHED) and says why in `exhausted`."""

    def __init__(self, space, *, gflops_of: Callable[[dict], float], max_gflops: float | None, **kwargs):
        super().__init__(space, **kwargs)
        self._gflops_of, self._max_gflops = gflops_of, max_gflops
        self.proposals: list[tuple[float, bool]] = []
        self.exhausted = ""

    def suggest(self, trial_id: str) -> Optional[dict]:
        for _ in range(MAX_PROPOSALS):
            config = super().suggest(trial_id)
            ot_trial = self._ot_trials[trial_id]
            gflops = self._gflops_of(config["spec"])
            ot_trial.set_user_attr(GFLOPS_ATTR, gflops)
            feasible = self._max_gflops is None or gflops <= self._max_gflops
            if self._max_gflops is not None:
                ot_trial.set_constraint(BUDGET_CONSTRAINT, gflops - self._max_gflops)
            self.proposals.append((gflops, feasible))
            if feasible:
                return config
            ot_trial.set_user_attr(STATE_ATTR, "infeasible")
            self._ot_study.tell(self._ot_trials.pop(trial_id), state=TrialState.PRUNED)
        cheapest = min(gflops for gflops, _ in self.proposals[-MAX_PROPOSALS:])
        self.exhausted = (f"{MAX_PROPOSALS} proposals in a row were above search.max_gflops {self._max_gflops:g} "
                          f"(the cheapest {cheapest:.3f} GFLOPs): raise the budget or narrow the space")
        return Searcher.FINISHED

    def feasible_share(self) -> tuple[float, float] | None:
        """The share of feasible proposals in the first and the second half of the search."""
        if len(self.proposals) < 2:
            return None
        half = len(self.proposals) // 2
        first, second = self.proposals[:half], self.proposals[half:]
        return (sum(ok for _, ok in first) / len(first), sum(ok for _, ok in second) / len(second))
