"""The frontier of complete trials that may be compared (same data, same epoch budget): tags, table and artifacts."""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from search.lineage import Comparable
from search.pareto import hypervolume, pareto_front
from search.states import COMPLETE, STATE_TAG
from search.tracking import ENQUEUED_TAG, ERROR_TAG, FRONTIER_TAG, PARENT_TAG, REASON_TAG
from trainers.errors import InputError
from trainers.words import counted

SEARCH_KIND_FILTER = "tags.`effsearch.kind` = 'search'"


@dataclass(frozen=True)
class TrialPoint:
    run_id: str
    run_name: str
    map: float  # nan where the trial reported none (infeasible, or failed before its first evaluation)
    map50: float
    gflops: float  # nan where not counted
    params_m: float
    state: str = COMPLETE
    enqueued: str = ""  # the search.enqueue entry it is (rule:1, d0), if any
    reason: str = ""  # why it did not complete
    parent_run_id: str = ""  # its search

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class FrontierError(InputError, LookupError):
    """An experiment, run or frontier the command cannot use; the message names it."""


def _point(run) -> TrialPoint:
    m, tags = run.data.metrics, run.data.tags
    return TrialPoint(run.info.run_id, run.info.run_name, m.get("map", math.nan), m.get("map50", math.nan),
                      m.get("gflops", math.nan), m.get("params_m", math.nan), tags.get(STATE_TAG, ""),
                      tags.get(ENQUEUED_TAG, ""), tags.get(REASON_TAG) or tags.get(ERROR_TAG, ""), tags.get(PARENT_TAG, ""))


def _search(client: MlflowClient, experiment_id: str, filter_string: str, order_by=None):
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000, page_token=token,
                                  order_by=order_by)
        yield from page
        token = page.token
        if not token:
            return


def complete_trials(client: MlflowClient, experiment_id: str, among: Comparable | None = None) -> list[TrialPoint]:
    """Trial runs that trained every epoch and logged their model: the only ones a frontier is made of. With
    `among`, only those of that data and epoch budget."""
    where = f"tags.`{STATE_TAG}` = '{COMPLETE}' and attributes.status = 'FINISHED'"
    if among is not None:
        where += f" and {among.filter()}"
    points = [_point(run) for run in _search(client, experiment_id, where)]
    return [p for p in points if not math.isnan(p.map) and not math.isnan(p.gflops)]


def search_trials(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list[TrialPoint]:
    """Every trial run of one search, in any state."""
    return [_point(run) for run in _search(client, experiment_id, f"tags.`{PARENT_TAG}` = '{parent_run_id}'")]


def experiment_id_for(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        known = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise FrontierError(f"no experiment named {name!r} in {client.tracking_uri} (known: {known})")
    return experiment.experiment_id


def compute_frontier(points: list[TrialPoint]) -> list[TrialPoint]:
    return [points[i] for i in pareto_front([(p.map, p.gflops) for p in points])]


@dataclass(frozen=True)
class ExperimentFrontier:
    """The experiment-wide frontier: over the complete runs of one data and epoch budget, by default those of the
    latest search."""

    among: Comparable | None
    compared: list[TrialPoint]
    front: list[TrialPoint]
    searches: int  # how many searches the compared runs came from
    left_out: int  # complete runs of other data or epoch budgets

    def describe(self) -> str:
        if not self.compared and not self.left_out:
            return "no trial of this experiment has finished training"
        where = self.among.describe() if self.among else "runs recorded before data hashes"
        text = (f"compared {counted(len(self.compared), 'complete run')} of {counted(self.searches, 'search')} "
                f"({where})")
        if self.left_out:
            text += (f"; {counted(self.left_out, 'complete run')} of other data or epoch budgets "
                     f"{'is' if self.left_out == 1 else 'are'} not compared")
        return text


def latest_comparable(client: MlflowClient, experiment_id: str) -> Comparable | None:
    """The data and epoch budget of the experiment's most recent search."""
    for run in _search(client, experiment_id, SEARCH_KIND_FILTER, order_by=["attributes.start_time DESC"]):
        found = Comparable.from_tags(run.data.tags)
        if found is not None:
            return found
    return None


def experiment_frontier(client: MlflowClient, experiment_id: str, among: Comparable | None = None
                        ) -> ExperimentFrontier:
    among = among or latest_comparable(client, experiment_id)
    every = complete_trials(client, experiment_id)
    compared = complete_trials(client, experiment_id, among) if among else every
    searches = len({p.parent_run_id for p in compared})
    return ExperimentFrontier(among, compared, compute_frontier(compared), searches, len(every) - len(compared))


# The hypervolume's reference point is (AP 0, REFERENCE_GFLOPS): the search's max_gflops when it has one, else
# this factor times the costliest finished trial (then logged beside it, since it moves as trials finish).
REFERENCE_SLACK = 1.1


def reference_gflops(points: list[TrialPoint], max_gflops: float | None) -> float:
    return max_gflops if max_gflops else REFERENCE_SLACK * max((p.gflops for p in points), default=0.0)


def record_frontier(client: MlflowClient, experiment_id: str, parent_run_id: str, among: Comparable | None,
                    max_gflops: float | None = None) -> list[TrialPoint]:
    """Tag frontier=true/false on the complete runs comparable with this search (any search of the experiment on
    the same data and epoch budget), and attach this search's own artifacts (its trials in every state, and its
    own frontier) and metrics to its parent run. Returns the search's own frontier."""
    group = complete_trials(client, experiment_id, among) if among else []
    on_group_front = {p.run_id for p in compute_frontier(group)}
    for p in group:
        client.set_tag(p.run_id, FRONTIER_TAG, "true" if p.run_id in on_group_front else "false")
    trials = search_trials(client, experiment_id, parent_run_id)
    complete = [p for p in trials if p.state == COMPLETE and not math.isnan(p.map) and not math.isnan(p.gflops)]
    front = compute_frontier(complete)
    from search.frontier_artifacts import write_artifacts  # matplotlib and plotly, only when drawing

    with tempfile.TemporaryDirectory() as folder:
        paths = write_artifacts(Path(folder), trials, front, experiment_id,
                                title=f"{client.get_run(parent_run_id).info.run_name}"
                                      f"{' (' + among.describe() + ')' if among else ''}")
        for path in paths:
            client.log_artifact(parent_run_id, str(path))
    if front:
        step, reference = len(complete), reference_gflops(complete, max_gflops)
        client.log_metric(parent_run_id, "frontier_size", len(front), step=step)
        client.log_metric(parent_run_id, "best_map", max(p.map for p in front), step=step)
        client.log_metric(parent_run_id, "hypervolume",
                          hypervolume([(p.map, p.gflops) for p in front], (0.0, reference)), step=step)
        client.log_metric(parent_run_id, "hypervolume_reference_gflops", reference, step=step)
    return front


def format_table(front: list[TrialPoint]) -> str:
    width = max([24] + [len(p.run_name) for p in front])
    lines = [f"{'run':<{width}} {'run_id':<32} {'AP':>6} {'GFLOPs':>8} {'params M':>8}"]
    for p in sorted(front, key=lambda p: p.gflops):
        lines.append(f"{p.run_name:<{width}} {p.run_id:<32} {p.map:>6.3f} {p.gflops:>8.3f} {p.params_m:>8.2f}")
    return "\n".join(lines)
