"""Ray's OptunaSearch with each proposal checked in the driver: one over the FLOPs budget, or one already trained
in this search, never starts a trial.

Written here because neither library has it: Ray's searcher has no hook between a proposal and a trial start,
and Optuna's samplers only learn a constraint from a trial that was told. Every proposal gets its GFLOPs over
the budget as an Optuna constraint (`Trial.set_constraint`: feasible at <= 0), and an over-budget one is
told at once, as PRUNED, so TPE, NSGA-II and GP rank it infeasible and steer away from it. Optuna gets its
own state and the true cost, never a made-up objective value. Then the searcher asks again.

A proposal whose model spec equals one already trained in the study (in this search, an earlier search of the
job, or a warm start) is told to Optuna with that trial's own results (COMPLETE, tagged with the trial it
repeats) and is not trained again.
"""
from __future__ import annotations

import json
from typing import Callable, Optional

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from search.states import FULL_BUDGET_KEY, INFEASIBLE, PRUNED, STATE_TAG
from trainers.cost import model_cost
from trainers.spec import ModelSpec

GFLOPS_ATTR = "gflops"
REPEATS_ATTR = "effsearch.repeats_trial"  # on a repeated proposal: the Optuna number of the trial it repeats
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
    """OptunaSearch whose suggest() only returns in-budget configurations not trained before; `proposals`
    keeps (gflops, feasible) of every proposal in order. If MAX_PROPOSALS in a row are turned away it ends
    the search (Searcher.FINISHED) and says why in `exhausted`."""

    def __init__(self, space, *, gflops_of: Callable[[dict], float], max_gflops: float | None, **kwargs):
        self._gflops_of, self._max_gflops = gflops_of, max_gflops
        self.proposals: list[tuple[float, bool]] = []
        self.repeats = 0  # proposals answered with an earlier trial's results
        self.exhausted = ""
        self._key_of: dict[str, str] = {}  # Tune trial id -> its model spec's key
        self._trained: dict[str, tuple[list[float], int]] = {}  # key -> (objective values, Optuna trial number)
        super().__init__(space, **kwargs)  # sets up the study, which fills _trained from it

    def _setup_study(self, mode):
        super()._setup_study(mode)
        # The study may already hold trained configurations (a warm start, an earlier search of the same job):
        # a proposal equal to one of them reuses its results too.
        for trial in self._ot_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if REPEATS_ATTR in trial.user_attrs:
                continue
            try:
                spec = self._space(optuna.trial.FixedTrial(trial.params))["spec"]
            except Exception:  # parameters of another space: nothing to match
                continue
            self._trained.setdefault(json.dumps(spec, sort_keys=True), (list(trial.values), trial.number))

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
            # The model is what trains: parameters that do not change it (alpha and beta at phi 0) make no new trial.
            key = json.dumps(config["spec"], sort_keys=True)
            if feasible and key not in self._trained:
                self._key_of[trial_id] = key
                return config
            ot_trial = self._ot_trials.pop(trial_id)
            if not feasible:
                ot_trial.set_user_attr(STATE_TAG, INFEASIBLE)
                self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
            else:
                values, number = self._trained[key]
                ot_trial.set_user_attr(REPEATS_ATTR, number)
                self._ot_study.tell(ot_trial, values)
                self.repeats += 1
        self.exhausted = (f"{MAX_PROPOSALS} proposals in a row were above search.max_gflops or already trained "
                          f"(the cheapest {min(g for g, _ in self.proposals[-MAX_PROPOSALS:]):.3f} GFLOPs): "
                          f"raise the budget, widen the space, or ask for fewer trials")
        return Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and not error and result and result.get(FULL_BUDGET_KEY) != 1:
            # Stopped early by the scheduler: Ray's OptunaSearch would tell its low-budget values as COMPLETE,
            # and they would sit on the study's front. Optuna gets PRUNED, and no values.
            ot_trial.set_user_attr(STATE_TAG, PRUNED)
            self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result, error)
        values = [result.get(metric) for metric in self.metric] if result and not error else []
        if ot_trial is not None and trial_id in self._key_of and values and None not in values:
            self._trained[self._key_of[trial_id]] = (values, ot_trial.number)

    def feasible_share(self) -> tuple[float, float] | None:
        """The share of feasible proposals in the first and the second half of the search."""
        if len(self.proposals) < 2:
            return None
        half = len(self.proposals) // 2
        first, second = self.proposals[:half], self.proposals[half:]
        return (sum(ok for _, ok in first) / len(first), sum(ok for _, ok in second) / len(second))
