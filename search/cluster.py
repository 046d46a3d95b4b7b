"""Searches on a Ray cluster through its Jobs API: `effsearch submit`, and `effsearch jobs list|status|logs|stop`.

Ray's JobSubmissionClient does the work. What is written here: the job's runtime_env (the job file, the project's
own packages, the tracking URI and the driver's store), a check that the job's paths exist on the cluster before
the job is submitted, and one-line errors in place of the client's tracebacks.
"""
from __future__ import annotations

import asyncio
import json
import os
import shlex
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import yaml

from search.job import STORAGE_VARIABLE, Job, load_job
from search.job_yaml import read_yaml
from search.ray_runtime import ADDRESS_VARIABLE, RayUnreachable, check_reachable
from search.tracking import STORE_VARIABLE
from trainers.errors import InputError

JOB_FILE = "job.yaml"
EXPERIMENT_KEY = "effsearch.experiment"  # in a Ray job's metadata
TRACKING_KEY = "effsearch.tracking_uri"
# On the head node, where a job's driver runs: outlives the job, so that a killed submission can --resume.
DEFAULT_CLUSTER_STORE = "~/.effsearch"
# `jobs stop` interrupts the search as Ctrl-C does, so that it ends its MLflow runs KILLED; Ray's default is
# SIGTERM, then SIGKILL after 3 s, which would leave them RUNNING.
STOP_SIGNAL = "SIGINT"
STOP_WAIT_S = 60
PATH_CHECK_TIMEOUT_S = 120
AGENT_WAIT_S = 60
_MISSING_MARK = "effsearch-missing:"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# The project's packages, sent with every job: the cluster runs the submitter's code, whatever it has installed.
PACKAGES = ("search", "spaces", "trainers")


class ClusterError(InputError):
    """A submission or job request that cannot go ahead; the message names the key, path or job."""


@dataclass(frozen=True)
class Submission:
    job_id: str
    experiment: str
    tracking_uri: str
    address: str


def jobs_address(explicit: str | None) -> str:
    """--address, else RAY_ADDRESS: the Jobs API of the cluster's head, http://HEAD:8265."""
    address, source = (explicit, "--address") if explicit else (os.environ.get(ADDRESS_VARIABLE), ADDRESS_VARIABLE)
    if not address:
        raise ClusterError(f"no cluster named: pass --address http://HEAD:8265 or set {ADDRESS_VARIABLE}")
    parsed = urlparse(address)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ClusterError(f"{source} {address}: submit and jobs talk to a cluster's Jobs API, http://HEAD:8265 "
                           f"(a HOST:6379 address is for `effsearch search` on a node of the cluster)")
    return address.rstrip("/")


def connect(address: str):
    """A JobSubmissionClient, or RayUnreachable within seconds (the client itself waits on a silent host)."""
    from ray.job_submission import JobSubmissionClient

    parsed = urlparse(address)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    check_reachable(parsed.hostname, port, f"the Ray Jobs API at {address}", "is the cluster's head up, with its "
                    "dashboard (ray start --head --dashboard-host 0.0.0.0)?")
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError) as err:
        raise RayUnreachable(f"the Ray Jobs API at {address} did not answer: {_first_line(err)}") from None


def submit(job_file: Path, address: str, *, tracking_uri: str | None, store: str = DEFAULT_CLUSTER_STORE,
           resume: bool = False, say: Callable[[str], None] = print) -> Submission:
    """Check the job here and its paths on the cluster, then submit `effsearch search` of it as a Ray job."""
    job = load_job(job_file, paths_here=False)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ClusterError("no tracking store for the cluster's search: set MLFLOW_TRACKING_URI (or --tracking-uri) "
                           "to the MLflow server the cluster writes to, http://HEAD:5000 with cluster.yaml")
    client = connect(address)
    _check_paths_on_cluster(client, job, uri, say)
    with tempfile.TemporaryDirectory(prefix="effsearch-submit-") as folder:
        Path(folder, JOB_FILE).write_text(yaml.safe_dump(_job_for_cluster(job_file, job), sort_keys=False))
        env = {"MLFLOW_TRACKING_URI": uri, STORE_VARIABLE: store, "RAY_JOB_STOP_SIGNAL": STOP_SIGNAL,
               "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_S), "HF_HUB_OFFLINE": "1"}
        if os.environ.get(STORAGE_VARIABLE) and not job.storage_path:
            env[STORAGE_VARIABLE] = os.environ[STORAGE_VARIABLE]
        runtime_env = {"working_dir": folder, "py_modules": [_package_dir(name) for name in PACKAGES],
                       "excludes": ["__pycache__", "*.pyc"], "env_vars": env}
        command = f"python -m search.cli search {JOB_FILE}" + (" --resume" if resume else "")
        try:
            job_id = _submit_job(client, entrypoint=command, runtime_env=runtime_env,
                                 metadata={EXPERIMENT_KEY: job.name, TRACKING_KEY: uri})
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise ClusterError(f"the cluster at {address} refused the job: {_first_line(err)}") from None
    return Submission(job_id, job.name, uri, address)


def _job_for_cluster(job_file: Path, job: Job) -> dict:
    """The user's job file with its paths absolute, as they were checked on the cluster."""
    raw = read_yaml(job_file.read_text())  # as load_job read it: `amp: off` stays the string
    for split in ("train", "val"):
        raw["data"][split] = {"annotations": getattr(job.data, split).annotations,
                              "images": getattr(job.data, split).images}
    if job.storage_path:
        raw["storage_path"] = job.storage_path
    if job.model.backbone_weights:
        raw["model"]["backbone_weights"] = job.model.backbone_weights
    return raw


def _paths_to_check(job: Job, tracking_uri: str) -> dict[str, str]:
    """Each path the search will read or write on the cluster, under the key that names it."""
    paths = {}
    for split in ("train", "val"):
        paths[f"job.data.{split}.annotations"] = getattr(job.data, split).annotations
        paths[f"job.data.{split}.images"] = getattr(job.data, split).images
    if job.model.backbone_weights:
        paths["job.model.backbone_weights"] = job.model.backbone_weights
    if job.storage_path and "://" not in job.storage_path:
        paths["job.storage_path (its parent folder)"] = str(Path(job.storage_path).parent)
    for scheme in ("sqlite:///", "file://"):
        if tracking_uri.startswith(scheme):
            local = tracking_uri[len(scheme):]
            if not local.startswith("/"):
                raise ClusterError(f"tracking URI {tracking_uri}: a relative path would land in the job's own "
                                   f"temporary folder on the cluster; give an absolute one, or the server's URI")
            paths["the tracking store's folder"] = str(Path(local).parent)
    return paths


def _check_paths_on_cluster(client, job: Job, tracking_uri: str, say: Callable[[str], None]) -> None:
    """Runs a one-line Python job on the cluster (its head, where the search's driver will run) that lists which
    of the paths do not exist there: a path only this machine has is an error here, not a failed job later."""
    paths = _paths_to_check(job, tracking_uri)
    script = (f"import json, os, sys; print({_MISSING_MARK!r} + json.dumps("
              f"[p for p in sys.argv[1:] if not os.path.exists(p)]))")
    command = " ".join(["python", "-c", shlex.quote(script), *map(shlex.quote, paths.values())])
    say(f"checking the job's {len(paths)} paths on the cluster")
    job_id = _submit_job(client, entrypoint=command, metadata={"effsearch.check": job.name})
    try:
        status = _wait(client, job_id, PATH_CHECK_TIMEOUT_S)
        logs = client.get_job_logs(job_id)
        if status != "SUCCEEDED":
            info = client.get_job_info(job_id)
            raise ClusterError(f"could not check the job's paths on the cluster (a Python job there ended "
                               f"{status}): {_first_line(info.message or logs)}")
    finally:
        _delete_when_done(client, job_id)
    found = [line for line in logs.splitlines() if line.startswith(_MISSING_MARK)]
    missing = set(json.loads(found[-1][len(_MISSING_MARK):])) if found else set()
    for key, path in paths.items():
        if path in missing:
            raise ClusterError(f"{key}: {path} does not exist on the cluster (checked on its head node); put it "
                               f"on storage that every node mounts, under the same path")


def _submit_job(client, **job) -> str:
    """client.submit_job, waiting out a head that has no job agent ready yet: right after a cluster starts, the
    Jobs API answers "No available agent to submit job" for some seconds (seen here)."""
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(1)


def _wait(client, job_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while (status := str(client.get_job_status(job_id).value)) not in TERMINAL:
        if time.monotonic() > deadline:
            return status
        time.sleep(0.5)
    return status


def _delete_when_done(client, job_id: str) -> None:
    """The path check is not the user's job: it is removed from `jobs list` once it has ended."""
    try:
        if str(client.get_job_status(job_id).value) not in TERMINAL:
            client.stop_job(job_id)
            _wait(client, job_id, 10)
        client.delete_job(job_id)
    except (RuntimeError, ConnectionError):
        pass  # a leftover check job costs nothing; the submission's own error matters more


def _package_dir(name: str) -> str:
    import importlib

    return str(Path(importlib.import_module(name).__file__).parent)


def _first_line(err) -> str:
    text = str(err).strip()
    # The client's errors carry the server's whole response; its last non-empty line says what went wrong.
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:500] if lines else type(err).__name__


@dataclass(frozen=True)
class JobView:
    job_id: str
    status: str
    experiment: str
    tracking_uri: str
    started: str
    message: str


def _view(details) -> JobView:
    metadata = details.metadata or {}
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(details.start_time / 1000)) \
        if details.start_time else "-"
    return JobView(details.submission_id or details.job_id or "-", str(details.status.value),
                   metadata.get(EXPERIMENT_KEY, "-"), metadata.get(TRACKING_KEY, "-"), started,
                   (details.message or "").strip())


def list_jobs(client) -> list[JobView]:
    """Every submitted job, newest first; Ray's own drivers (no submission id) are left out."""
    views = [_view(d) for d in client.list_jobs() if d.submission_id]
    return sorted(views, key=lambda v: v.started, reverse=True)


def job_status(client, job_id: str) -> JobView:
    try:
        return _view(client.get_job_info(job_id))
    except RuntimeError as err:
        raise ClusterError(f"job {job_id}: {_first_line(err)}") from None


def job_logs(client, job_id: str, *, follow: bool, write: Callable[[str], None]) -> None:
    job_status(client, job_id)  # an unknown id is one line, not the client's traceback
    if not follow:
        write(client.get_job_logs(job_id))
        return

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            write(lines)

    asyncio.run(tail())


def stop_job(client, job_id: str) -> JobView:
    """Interrupts the job's search (it ends its MLflow runs KILLED) and waits for it to end."""
    view = job_status(client, job_id)
    if view.status in TERMINAL:
        return view
    client.stop_job(job_id)
    _wait(client, job_id, STOP_WAIT_S + 10)
    return job_status(client, job_id)
