"""Promotion: register a frontier model with its lineage, point `production` at it and `previous` at the one before."""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from search.frontier import FrontierError, experiment_frontier, experiment_id_for
from search.job import model_name_problems
from search.lineage import DATA_HASH_TAG, EPOCHS_TAG, SPLIT_HASH_TAG, Comparable
from search.states import COMPLETE, PRUNED, STATE_TAG
from search.tracking import ERROR_TAG, MODEL_URI_TAG, PARENT_TAG, REASON_TAG

PRODUCTION, PREVIOUS = "production", "previous"
RUN_ID_TAG = "run_id"  # on a model version: the trial run it was trained in (idempotence reads it)
SPLITS = ("train", "val")


class PromotionRefused(FrontierError):
    """A run that may not be promoted, or nothing within the budget: one line for the user."""


@dataclass(frozen=True)
class Promotion:
    model_name: str
    version: str
    run_id: str
    run_name: str
    map: float
    gflops: float
    previous_version: str | None
    changed: bool = True  # False: the run already held production, nothing was done

    @property
    def uri(self) -> str:
        return f"models:/{self.model_name}@{PRODUCTION}"


def promote(client: MlflowClient, experiment: str, *, max_gflops: float | None = None,
            max_params_m: float | None = None, run_id: str | None = None, force: bool = False,
            model_name: str | None = None) -> Promotion:
    """The best-AP run on the experiment's frontier within the budgets, or `run_id`, as the production version of
    `model_name` (the experiment's name by default). Running it again for the same run changes nothing."""
    for problem in model_name_problems(*(("promote --model-name", model_name) if model_name else
                                         ("promote EXPERIMENT", experiment, "; give --model-name"))):
        raise PromotionRefused(problem)
    experiment_id = experiment_id_for(client, experiment)
    if run_id:
        run = _checked_run(client, experiment, experiment_id, run_id, force)
    else:
        run = client.get_run(_best_within(client, experiment, experiment_id, max_gflops, max_params_m))
    metrics = run.data.metrics
    for limit, key, unit in ((max_gflops, "gflops", "GFLOPs"), (max_params_m, "params_m", "M params")):
        if run_id and limit is not None and metrics.get(key, float("inf")) > limit:
            raise PromotionRefused(f"run {run_id} needs {metrics.get(key, float('nan')):.3f} {unit}, over the "
                                   f"budget of {limit:g}")
    name = model_name or experiment
    current = _version_by_alias(client, name, PRODUCTION)
    if current is not None and current.tags.get(RUN_ID_TAG) == run.info.run_id:
        previous = _version_by_alias(client, name, PREVIOUS)
        return _promotion(name, current.version, run, previous.version if previous else None, changed=False)
    version = _version_of_run(client, name, run.info.run_id) or _register(client, experiment, name, run)
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS, current.version)
    client.set_registered_model_alias(name, PRODUCTION, version)
    return _promotion(name, version, run, current.version if current else None)


def rollback(client: MlflowClient, model_name: str) -> Promotion:
    """Swap `production` and `previous`: the version before the last promotion serves again."""
    current = _version_by_alias(client, model_name, PRODUCTION)
    previous = _version_by_alias(client, model_name, PREVIOUS)
    if current is None:
        raise PromotionRefused(f"model {model_name!r} has no production version to roll back")
    if previous is None:
        raise PromotionRefused(f"model {model_name!r} has no previous version to roll back to "
                               f"(production is version {current.version})")
    client.set_registered_model_alias(model_name, PRODUCTION, previous.version)
    client.set_registered_model_alias(model_name, PREVIOUS, current.version)
    run = client.get_run(previous.tags[RUN_ID_TAG]) if RUN_ID_TAG in previous.tags else None
    return Promotion(model_name, str(previous.version), run.info.run_id if run else "",
                     run.info.run_name if run else "", float(previous.tags.get("map", "nan")),
                     float(previous.tags.get("gflops", "nan")), str(current.version))


def _best_within(client, experiment, experiment_id, max_gflops, max_params_m) -> str:
    found = experiment_frontier(client, experiment_id)
    if not found.front:
        raise PromotionRefused(f"experiment {experiment!r} has no complete trial to promote ({found.describe()})")
    eligible = [p for p in found.front if (max_gflops is None or p.gflops <= max_gflops)
                and (max_params_m is None or p.params_m <= max_params_m)]
    if not eligible:
        cheapest = min(found.front, key=lambda p: p.gflops)
        limits = " and ".join(text for text in (max_gflops is not None and f"{max_gflops:g} GFLOPs",
                                                max_params_m is not None and f"{max_params_m:g}M params") if text)
        raise PromotionRefused(f"no frontier run of {experiment!r} fits within {limits}; the cheapest frontier "
                               f"model needs {cheapest.gflops:.3f} GFLOPs and {cheapest.params_m:.3f}M params")
    return max(eligible, key=lambda p: (p.map, -p.gflops)).run_id


def _checked_run(client, experiment, experiment_id, run_id, force):
    """The run named by --run-id, if it may be promoted; else one line saying why not."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise PromotionRefused(f"no run {run_id} in {client.tracking_uri}") from None
    tags, label = run.data.tags, f"run {run_id} ({run.info.run_name})"
    if run.info.experiment_id != experiment_id:
        raise PromotionRefused(f"{label} is not a run of experiment {experiment!r}")
    if PARENT_TAG not in tags:  # the search's own run, which holds the frontier: it trained nothing itself
        raise PromotionRefused(f"{label} is a search's run, not a trial's; `effsearch frontier {experiment}` lists "
                               f"the trials' run ids")
    state = tags.get(STATE_TAG)
    why = tags.get(REASON_TAG) or tags.get(ERROR_TAG)
    if run.info.status != "FINISHED" or state not in (COMPLETE, PRUNED):
        raise PromotionRefused(f"{label} did not finish (status {run.info.status}, state {state or 'none'})"
                               + (f": {why}" if why else ""))
    if state != COMPLETE:
        raise PromotionRefused(f"{label} was pruned" + (f" ({why})" if why else "") + "; only complete runs are "
                               "promoted")
    if not force:
        _check_on_frontier(client, experiment_id, run, label)
    if not tags.get(MODEL_URI_TAG):
        raise PromotionRefused(f"{label} has no logged model (tag {MODEL_URI_TAG} is missing)")
    return run


def _check_on_frontier(client: MlflowClient, experiment_id: str, run, label: str) -> None:
    """The run is on the frontier that `effsearch frontier` and a promotion by budget use: the latest search's data
    and epochs. (Its frontier tag says only whether it leads its own data and epochs, which may be older.)"""
    found = experiment_frontier(client, experiment_id)
    if run.info.run_id in {p.run_id for p in found.front}:
        return
    own = Comparable.from_tags(run.data.tags)
    if found.among is not None and own != found.among:
        trained = own.describe() if own else "no data hash"
        raise PromotionRefused(f"{label} was trained on other data or another epoch budget ({trained}) than the "
                               f"latest search ({found.among.describe()}), whose frontier promotion uses; "
                               f"--force promotes it anyway")
    raise PromotionRefused(f"{label} is not on the frontier; --force promotes it anyway")


def _register(client: MlflowClient, experiment: str, name: str, run) -> str:
    model_uri = run.data.tags.get(MODEL_URI_TAG)
    if not model_uri:
        raise PromotionRefused(f"run {run.info.run_id} ({run.info.run_name}) has no logged model "
                               f"(tag {MODEL_URI_TAG} is missing)")
    # MLflow prints "Successfully registered model ..." and "Created version ..." to stderr; the command says
    # what it did in its own words, on stdout.
    with contextlib.redirect_stderr(io.StringIO()):
        version = str(mlflow.register_model(model_uri, name).version)
    for key, value in _lineage(client, experiment, run).items():
        client.set_model_version_tag(name, version, key, value)
    return version


def _lineage(client: MlflowClient, experiment: str, run) -> dict[str, str]:
    """Where a model version came from: its experiment, search, run, scores, spec and data."""
    tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
    parent_id = tags.get(PARENT_TAG, "")
    parent_tags = client.get_run(parent_id).data.tags if parent_id else {}
    spec = {key: value for key, value in params.items() if "." not in key}  # train.* and search.* are not the spec
    lineage = {"experiment": experiment, "experiment_id": run.info.experiment_id, "parent_run_id": parent_id,
               RUN_ID_TAG: run.info.run_id, "run_name": run.info.run_name, "map": f"{metrics.get('map', 0):.4f}",
               "gflops": f"{metrics.get('gflops', 0):.4f}", "params_m": f"{metrics.get('params_m', 0):.4f}",
               "spec": json.dumps(spec, sort_keys=True)}
    for key in (DATA_HASH_TAG, EPOCHS_TAG):
        if key in tags:
            lineage[key] = tags[key]
    for split in SPLITS:
        key = SPLIT_HASH_TAG.format(split=split)
        if key in parent_tags:
            lineage[f"data.{split}.sha256"] = parent_tags[key]
    return lineage


def _version_by_alias(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _version_of_run(client: MlflowClient, name: str, run_id: str) -> str | None:
    """A version of `name` already registered from this run (promoted before, then moved off): reuse it."""
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    for version in versions:
        if version.tags.get(RUN_ID_TAG) == run_id:
            return str(version.version)
    return None


def _promotion(name, version, run, previous, changed=True) -> Promotion:
    metrics = run.data.metrics
    return Promotion(name, str(version), run.info.run_id, run.info.run_name, metrics.get("map", float("nan")),
                     metrics.get("gflops", float("nan")), str(previous) if previous else None, changed)
