"""Continuing searches: the record that lets `--resume` find an interrupted search, and `--warm-start`, which seeds
a new study with another search's complete trials.

Both lean on what the libraries keep: Tune's experiment folder (Tuner.restore continues it, with its trials, its
searcher and its scheduler) and the Optuna JournalStorage, which holds every trial of every search in the store.
What is written here is only the bookkeeping between them: which parent run and Tune folder a job's search
uses, and the copy of trials from one study into another.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from search.job import JobError
from search.searcher import GFLOPS_ATTR, PARAMS_ATTR, REPEATS_ATTR, Budget

# How Trial.set_constraint names a constraint in a trial's system attributes; a copied trial is built whole with
# create_trial, so it gets its constraints this way (tests/test_search.py reads them back through the sampler's view).
_CONSTRAINTS_PREFIX = optuna.study._constrained_optimization._CONSTRAINTS_KEY

WARM_START_ATTR = "effsearch.warm_start"  # on a copied trial: "<study>#<number>" of the trial it copies


@dataclass(frozen=True)
class SearchRecord:
    """Where a job's latest search lives: its MLflow parent run and its Tune experiment folder."""

    parent_run_id: str
    tune_path: str
    finished: bool = False


def _record_path(store: Path, job_name: str) -> Path:
    return store / "searches" / f"{job_name}.json"


def save_record(store: Path, job_name: str, record: SearchRecord) -> None:
    path = _record_path(store, job_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(record)))
    tmp.replace(path)  # atomic: a driver killed mid-write leaves the previous record


def record_to_resume(store: Path, job_name: str) -> SearchRecord:
    """The job's interrupted search, or a JobError that says why there is none."""
    path = _record_path(store, job_name)
    if not path.is_file():
        raise JobError(f"--resume: no search of job {job_name!r} was started in {store}")
    record = SearchRecord(**json.loads(path.read_text()))
    if record.finished:
        raise JobError(f"--resume: the last search of job {job_name!r} finished (parent run {record.parent_run_id}); "
                       f"run it again without --resume for a new search")
    if not (Path(record.tune_path) / "tuner.pkl").is_file():
        raise JobError(f"--resume: the search's Tune folder {record.tune_path} is gone or incomplete")
    return record


def check_warm_start(storage, source: str, study_name: str,
                     distributions: dict[str, optuna.distributions.BaseDistribution]) -> list:
    """The complete trials of study `source` that a warm start of `study_name` would copy; a JobError naming
    --warm-start if there are none, or if they searched another space."""
    if source == study_name:
        raise JobError(f"--warm-start {source}: a search already continues its own job's study; name another job")
    try:
        old = optuna.load_study(study_name=source, storage=storage)
    except KeyError:
        known = ", ".join(optuna.get_all_study_names(storage)) or "none"
        raise JobError(f"--warm-start {source}: no search of that name in this store (known: {known})") from None
    complete = [t for t in old.trials if t.state == TrialState.COMPLETE and REPEATS_ATTR not in t.user_attrs]
    if not complete:
        raise JobError(f"--warm-start {source}: that search has no complete trial to start from")
    for trial in complete:
        for name, distribution in trial.distributions.items():
            if distributions.get(name) != distribution:
                raise JobError(f"--warm-start {source}: its trials searched {name} over {distribution}, this job's "
                               f"space {'over ' + str(distributions[name]) if name in distributions else 'not at all'}"
                               f"; a warm start needs the same space and bounds")
    return complete


def warm_start(storage, source: str, study_name: str, directions: list[str],
               distributions: dict[str, optuna.distributions.BaseDistribution], budget: Budget, *,
               checked: list | None = None) -> int:
    """Copy the complete trials of study `source` (both objectives, their parameters) into `study_name`, which
    must search the same space; returns how many were copied. Copying twice adds nothing. Under a budget each
    copy carries its own constraints (its GFLOPs and parameters over the limits), as the new search's own trials
    do. `checked` is what check_warm_start returned, when the caller has checked already."""
    complete = checked if checked is not None else check_warm_start(storage, source, study_name, distributions)
    new = optuna.create_study(study_name=study_name, storage=storage, load_if_exists=True,
                              directions=["maximize" if d == "max" else "minimize" for d in directions])
    copied = {t.user_attrs.get(WARM_START_ATTR) for t in new.trials}
    fresh = [optuna.trial.create_trial(
        params=t.params, distributions=t.distributions, values=t.values,
        user_attrs={**t.user_attrs, WARM_START_ATTR: f"{source}#{t.number}"},
        system_attrs={f"{_CONSTRAINTS_PREFIX}:{name}": over for name, over in
                      budget.constraints_of(t.user_attrs.get(GFLOPS_ATTR), t.user_attrs.get(PARAMS_ATTR)).items()})
        for t in complete if f"{source}#{t.number}" not in copied]
    new.add_trials(fresh)
    return len(fresh)
