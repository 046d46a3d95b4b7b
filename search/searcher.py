"""Ray's OptunaSearch with each proposal checked in the driver: one over the budget (GFLOPs, parameters), or one
already trained in this search, never starts a trial.

Written here because neither library has it: Ray's searcher has no hook between a proposal and a trial start,
and Optuna's samplers only learn a constraint from a trial that was told. Every proposal gets its cost over
each limit as an Optuna constraint (`Trial.set_constraint`: feasible at <= 0), and an over-budget one is
told at once, as PRUNED, so TPE, NSGA-II and GP rank it infeasible and steer away from it. Optuna gets its
own state and the true cost, never a made-up objective value. Then the searcher asks again.

A proposal whose configuration (model spec, and searched training settings) equals one already trained in the
study (in this search, an earlier search of the job, or a warm start) is told to Optuna with that trial's own
results (COMPLETE, tagged with the trial it repeats) and is not trained again, if that trial trained under the
same data and job settings (`trained_under`); a trial of other data or other epochs only informs the sampler.
A proposal equal to a configuration still training does not start either (Optuna 5's TPE only discourages that,
by its constant liar); it is told PRUNED, without values.

A space whose parameters are all discrete is finite: once each of its parameter sets has been turned away for
good (over the budget, or trained), the search ends at once instead of after MAX_PROPOSALS proposals.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Optional

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from search.states import FULL_BUDGET_KEY, INFEASIBLE, PRUNED, STATE_TAG
from trainers.cost import ModelShape, model_cost, model_shape
from trainers.spec import ModelSpec

GFLOPS_ATTR = "gflops"
PARAMS_ATTR = "params_m"
REPEATS_ATTR = "effsearch.repeats_trial"  # on a repeated proposal: the Optuna number of the trial it repeats
# On a proposal of a configuration that was still training: the Optuna number of the trial training it.
REPEATS_RUNNING_ATTR = "effsearch.repeats_running_trial"
# On a trial that trains: the data and job settings it trained under (search.lineage.training_key).
TRAINED_UNDER_ATTR = "effsearch.trained_under"
# Proposals in a row over budget before the search gives up on the space.
MAX_PROPOSALS = 500
# Over-budget configurations recorded as runs per search, each once: a search whose budget nothing meets would
# otherwise leave 500 runs (the parent's infeasible_proposals metric counts them all).
MAX_INFEASIBLE_RUNS = 50


@dataclass(frozen=True)
class Budget:
    """search.max_gflops and search.max_params_m; each set limit is one Optuna constraint."""

    max_gflops: float | None = None
    max_params_m: float | None = None

    def constraints(self, cost: ModelShape) -> dict[str, float]:
        """Optuna constraint name -> how far over that limit the cost is (feasible at <= 0)."""
        return self.constraints_of(getattr(cost, "gflops", None), cost.params_m)

    def describe(self) -> str:
        named = (("max_gflops", self.max_gflops), ("max_params_m", self.max_params_m))
        limits = [f"search.{key} {value:g}" for key, value in named if value is not None]
        return ", ".join(limits) or "none set"

    def explain(self, cost: ModelShape) -> str:
        """Why a configuration is over budget, in one line."""
        over = []
        gflops = getattr(cost, "gflops", None)
        if self.max_gflops is not None and gflops is not None and gflops > self.max_gflops:
            over.append(f"{gflops:.3f} GFLOPs > search.max_gflops {self.max_gflops:g}")
        if self.max_params_m is not None and cost.params_m > self.max_params_m:
            over.append(f"{cost.params_m:.3f}M params > search.max_params_m {self.max_params_m:g}")
        return "over budget: " + "; ".join(over)

    def constraints_of(self, gflops: float | None, params_m: float | None) -> dict[str, float]:
        """As constraints(), from recorded figures (a copied trial's user attributes); a figure not recorded
        leaves its constraint out."""
        found = {}
        if self.max_gflops is not None and gflops is not None:
            found["gflops_over_budget"] = gflops - self.max_gflops
        if self.max_params_m is not None and params_m is not None:
            found["params_m_over_budget"] = params_m - self.max_params_m
        return found


class CostCounter:
    """The architecture and parameters of a proposed spec dict, and its GFLOPs when `count_flops` (a GFLOPs budget
    to check), each configuration counted once (a count builds the model on meta, and the GFLOPs run it there:
    about 0.3 and 0.5 s for a D0, on the search's event loop). A class, not a closure: Tune pickles the searcher
    with its controller's checkpoints."""

    def __init__(self, num_classes: int, *, count_flops: bool = True):
        self.num_classes, self.count_flops = num_classes, count_flops
        self.counted: dict[str, ModelShape] = {}

    def __call__(self, spec: dict) -> ModelShape:
        # The loss settings change no cost: configurations that differ only there are counted once.
        key = json.dumps({k: v for k, v in spec.items() if not k.startswith("focal_")}, sort_keys=True)
        if key not in self.counted:
            built = ModelSpec.from_dict({**spec, "num_classes": self.num_classes}, where="proposed spec")
            self.counted[key] = model_cost(built) if self.count_flops else model_shape(built)
        return self.counted[key]


# What a space returns, and what trains: a proposal also carries the raw parameters at its top level (Ray's
# OptunaSearch merges them in), which are not part of what trains.
TRAINED_SECTIONS = ("spec", "train")


# The spec fields that only scale the backbone: specs that differ in them alone but build the same network
# (ModelCost.architecture) train the same configuration.
BACKBONE_MULTIPLIERS = ("backbone_width", "backbone_depth")


def parameter_sets(distributions: dict[str, set[BaseDistribution]], fixed: dict) -> int | None:
    """How many parameter sets a space can propose, from the distributions its proposals used (a parameter held
    by search.fixed has one value): None where a parameter is continuous, or its distribution changed between
    proposals (the count would not be sure). For a space with branches it is a bound, never an undercount."""
    count = 1
    for name, seen in distributions.items():
        if name in fixed:
            continue
        if len(seen) != 1:
            return None
        (distribution,) = seen
        if isinstance(distribution, CategoricalDistribution):
            count *= len(distribution.choices)
        elif getattr(distribution, "step", None) is None:  # a float without a step
            return None
        else:
            count *= int(round((distribution.high - distribution.low) / distribution.step)) + 1
    return count


def configuration_key(config: dict, architecture: str) -> str:
    """One string per trained configuration: the network it builds, the rest of its spec and any searched
    training settings."""
    trained = {section: config[section] for section in TRAINED_SECTIONS if section in config}
    trained["spec"] = {k: v for k, v in trained["spec"].items() if k not in BACKBONE_MULTIPLIERS}
    return json.dumps({**trained, "architecture": architecture}, sort_keys=True)


class BudgetedOptunaSearch(OptunaSearch):
    """OptunaSearch whose suggest() only returns in-budget configurations not trained before; `proposals`
    keeps (gflops, feasible) of every proposal in order. If MAX_PROPOSALS in a row are turned away, or every
    parameter set of a finite space is turned away for good, it ends the search (Searcher.FINISHED) and says why
    in `exhausted`. `fixed` is search.fixed, which the sampler holds."""

    # Why the search was stopped from outside (halt), if it was. A class default, not set in __init__: a search
    # interrupted under an earlier version is resumed from a pickle of this object that has no such attribute.
    halted = ""

    def __init__(self, space, *, cost_of: Callable[[dict], ModelShape], budget: Budget = Budget(),
                 enqueued_labels: tuple[str, ...] = (), trained_under: str = "", fixed: dict | None = None,
                 **kwargs):
        self._cost_of, self._budget, self._trained_under = cost_of, budget, trained_under
        self._fixed = dict(fixed or {})
        # search.enqueue's entries (rule:1, d0), one per point of points_to_evaluate, to name the trials they start.
        self._enqueued = list(zip(enqueued_labels, kwargs.get("points_to_evaluate") or ()))
        # Told of each over-budget proposal (its Optuna number, config, GFLOPs, params, reason): the run logger.
        self.on_infeasible: Callable[[int, dict, float | None, float, str], None] | None = None
        self._infeasible_told: set[str] = set()  # configurations already told to on_infeasible
        self.proposals: list[tuple[float | None, bool]] = []  # GFLOPs are None where none were counted
        self.repeats = 0  # proposals answered with an earlier trial's results
        self.repeats_of_running = 0  # proposals of a configuration that was training at the time
        self.exhausted = ""
        self._key_of: dict[str, str] = {}  # Tune trial id -> its model spec's key, while it trains
        self._distributions: dict[str, set[BaseDistribution]] = {}  # parameter -> the distributions proposed with
        self._settled: set[str] = set()  # parameter sets whose proposal is turned away for good
        self._trained: dict[str, tuple[list[float], int]] = {}  # key -> (objective values, Optuna trial number)
        super().__init__(space, **kwargs)  # sets up the study, which fills _trained from it

    def _setup_study(self, mode):
        super()._setup_study(mode)
        # The study may already hold trained configurations (a warm start, an earlier search of the same job):
        # a proposal equal to one of them reuses its results too.
        for trial in self._ot_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            # Results of other data, epochs or settings are not this search's: such a configuration trains again.
            if REPEATS_ATTR in trial.user_attrs or trial.user_attrs.get(TRAINED_UNDER_ATTR) != self._trained_under:
                continue
            try:
                config = self._space(optuna.trial.FixedTrial(trial.params))
            except Exception:  # parameters of another space: nothing to match
                continue
            key = configuration_key(config, self._cost_of(config["spec"]).architecture)
            self._trained.setdefault(key, (list(trial.values), trial.number))

    def halt(self, reason: str) -> None:
        """Propose no more trials (the ones running go on); the first reason is kept."""
        self.halted = self.halted or reason

    def suggest(self, trial_id: str) -> Optional[dict]:
        if self.halted:
            return Searcher.FINISHED
        if self._only_training_left():
            return None  # Tune asks again; by then a trial has ended, and its set is trained or free again
        for _ in range(MAX_PROPOSALS):
            config = super().suggest(trial_id)
            ot_trial = self._ot_trials[trial_id]
            for name, distribution in ot_trial.distributions.items():
                self._distributions.setdefault(name, set()).add(distribution)
            params = json.dumps(ot_trial.params, sort_keys=True)
            cost = self._cost_of(config["spec"])
            gflops = getattr(cost, "gflops", None)  # counted only under a GFLOPs budget
            if gflops is not None:
                ot_trial.set_user_attr(GFLOPS_ATTR, gflops)
            ot_trial.set_user_attr(PARAMS_ATTR, cost.params_m)
            constraints = self._budget.constraints(cost)
            for name, over in constraints.items():
                ot_trial.set_constraint(name, over)
            feasible = all(over <= 0 for over in constraints.values())
            self.proposals.append((gflops, feasible))
            # What trains is the configuration, not the parameters: ones that do not change it (alpha and beta at
            # phi 0, a backbone width within one channel rounding) make no new trial.
            key = configuration_key(config, cost.architecture)
            training = {k: n for n, k in self._key_of.items()}
            if feasible and key not in self._trained and key not in training:
                self._key_of[trial_id] = key
                ot_trial.set_user_attr(TRAINED_UNDER_ATTR, self._trained_under)
                return config
            ot_trial = self._ot_trials.pop(trial_id)
            if feasible and key in training:
                # Its results are not in yet, and the trial training it may still fail: not turned away for good.
                # (Ray's OptunaSearch keeps every trial it asked for in _ot_trials.)
                ot_trial.set_user_attr(REPEATS_RUNNING_ATTR, self._ot_trials[training[key]].number)
                self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
                self.repeats_of_running += 1
                if self._only_training_left():
                    return None
                continue
            self._settled.add(params)
            if not feasible:
                ot_trial.set_user_attr(STATE_TAG, INFEASIBLE)
                self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
                if self.on_infeasible is not None and key not in self._infeasible_told \
                        and len(self._infeasible_told) < MAX_INFEASIBLE_RUNS:
                    self._infeasible_told.add(key)
                    self.on_infeasible(ot_trial.number, config, gflops, cost.params_m, self._budget.explain(cost))
            else:
                values, number = self._trained[key]
                ot_trial.set_user_attr(REPEATS_ATTR, number)
                self._ot_study.tell(ot_trial, values)
                self.repeats += 1
            sets = parameter_sets(self._distributions, self._fixed)
            if sets is not None and len(self._settled) >= sets:
                return self._finish(f"all of the space's parameter sets ({sets})")
        return self._finish(f"{MAX_PROPOSALS} proposals in a row")

    def _only_training_left(self) -> bool:
        """Every parameter set of a finite space is either turned away for good or training now."""
        sets = parameter_sets(self._distributions, self._fixed) if self._key_of else None
        training = {json.dumps(self._ot_trials[trial_id].params, sort_keys=True) for trial_id in self._key_of}
        return sets is not None and len(self._settled | training) >= sets

    def _finish(self, what: str) -> str:
        counted = [g for g, _ in self.proposals[-MAX_PROPOSALS:] if g is not None]
        cheapest = f"{min(counted):.3f} GFLOPs" if counted else ""
        budget = self._budget.describe()
        if self._budget == Budget():
            self.exhausted = f"{what} were already trained: widen the space, or ask for fewer trials"
        elif not self._trained:  # nothing was trained, so every one was over the budget
            least = f"; the cheapest needs {cheapest}" if cheapest else ""
            self.exhausted = f"{what} were over the budget ({budget}{least}): raise the budget or widen the space"
        else:
            least = f" (the cheapest {cheapest})" if cheapest else ""
            self.exhausted = (f"{what} were over the budget ({budget}) or already trained{least}: raise the budget, "
                              "widen the space, or ask for fewer trials")
        return Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        key = self._key_of.pop(trial_id, None)  # trained or not, it no longer holds its configuration
        if ot_trial is not None and not error and result and result.get(FULL_BUDGET_KEY) != 1:
            # Stopped early by the scheduler: Ray's OptunaSearch would tell its low-budget values as COMPLETE,
            # and they would sit on the study's front. Optuna gets PRUNED, and no values.
            ot_trial.set_user_attr(STATE_TAG, PRUNED)
            self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result, error)
        values = [result.get(metric) for metric in self.metric] if result and not error else []
        if ot_trial is not None and key is not None and values and None not in values:
            self._trained[key] = (values, ot_trial.number)
            self._settled.add(json.dumps(ot_trial.params, sort_keys=True))

    def enqueued_label(self, trial_id: str) -> Optional[str]:
        """The search.enqueue entry a running Tune trial was proposed from, if it was."""
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None:
            return None
        for label, point in self._enqueued:
            if point and all(ot_trial.params.get(key) == value for key, value in point.items()):
                return label
        return None

    def optuna_number(self, trial_id: str) -> Optional[int]:
        """The Optuna trial number of a Tune trial this searcher proposed, while it runs."""
        ot_trial = self._ot_trials.get(trial_id)
        return ot_trial.number if ot_trial is not None else None

    def feasible_share(self) -> tuple[float, float] | None:
        """The share of feasible proposals in the first and the second half of the search."""
        if len(self.proposals) < 2:
            return None
        half = len(self.proposals) // 2
        first, second = self.proposals[:half], self.proposals[half:]
        return (sum(ok for _, ok in first) / len(first), sum(ok for _, ok in second) / len(second))
