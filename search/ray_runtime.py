"""Which Ray a search runs on: the cluster that --address or RAY_ADDRESS names, else a new local Ray."""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass

import ray

ADDRESS_VARIABLE = "RAY_ADDRESS"
REACH_TIMEOUT_S = 5.0


class RayUnreachable(Exception):
    """The cluster a search was pointed at cannot be used; the message names the address and where it came from."""


@dataclass(frozen=True)
class ClusterAddress:
    address: str
    source: str  # "--address" or "RAY_ADDRESS", for messages


def cluster_address(explicit: str | None) -> ClusterAddress | None:
    """--address, else RAY_ADDRESS; None when neither names a cluster, and the search starts its own Ray.

    Checked here, before any MLflow run exists: ray.init() against a host that does not answer waits minutes
    for its GCS (measured here: still waiting after 200 s), so a port that does not answer fails in seconds.
    """
    if explicit:
        found = ClusterAddress(explicit, "--address")
    elif os.environ.get(ADDRESS_VARIABLE):
        found = ClusterAddress(os.environ[ADDRESS_VARIABLE], ADDRESS_VARIABLE)
    else:
        return None
    if found.address == "local":
        return None
    if found.address == "auto":  # Ray's own discovery of a cluster started on this machine
        return found
    scheme, _, rest = found.address.rpartition("://")
    if scheme in ("http", "https"):
        raise RayUnreachable(f"{found.source} {found.address} is a Ray Jobs API (dashboard) address; "
                             f"`effsearch search` joins a cluster at its GCS address (HEAD:6379)")
    if scheme == "ray":
        # Under Ray Client, Tune runs its controller, and with it the searcher, in an actor on the head: the
        # driver's searcher (proposals, repeats) and the environment set here would not be the ones in use.
        raise RayUnreachable(f"{found.source} {found.address}: Ray Client addresses are not supported; run "
                             f"effsearch on a node of the cluster with its GCS address (HEAD:6379)")
    if scheme:
        raise RayUnreachable(f"{found.source} {found.address}: expected HOST:PORT, auto or local")
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise RayUnreachable(f"{found.source} {found.address}: expected HOST:PORT, auto or local")
    check_reachable(host, int(port), f"the Ray cluster at {found.address} (from {found.source})",
                    f"is its head running? Unset {ADDRESS_VARIABLE} to search on a local Ray")
    return found


def check_reachable(host: str, port: int, what: str, hint: str) -> None:
    """A TCP connection within REACH_TIMEOUT_S, or RayUnreachable naming `what`."""
    try:
        socket.create_connection((host, port), timeout=REACH_TIMEOUT_S).close()
    except OSError as err:
        raise RayUnreachable(f"cannot reach {what}: {err.strerror or err}; {hint}") from None


def trials_the_cluster_holds(per_worker: dict[str, float], workers_per_trial: int) -> int:
    """How many trials of `workers_per_trial` workers, each reserving `per_worker` ({"CPU": 2, "GPU": 1}), fit at
    once on the alive nodes, counting whole workers per node (a trial's workers may spread when no node holds them
    all). At least 1: on an autoscaling cluster whose GPU nodes are not up yet, the first trial's demand starts one.
    """
    slots = 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        slots += min(int(have.get(key, 0) // amount) for key, amount in per_worker.items() if amount > 0)
    return max(1, slots // workers_per_trial)


def start_ray(address: ClusterAddress | None) -> None:
    """Joins the cluster at `address`, or starts a local Ray sized to this machine."""
    # Trials report every epoch but are scored (map) only every train.eval_every epochs; Tune's strict check
    # would kill the search at the first unscored report. The searcher reads only a trial's final result,
    # and the last epoch is always scored.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Ctrl-C must stop the search, not ask Tune to wind it down and then report success: with Tune's
    # handler off it raises KeyboardInterrupt here, the runs are ended KILLED, and the command exits 130.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    # Tune adds a TensorBoard logger to every run. After a Ctrl-C pressed twice, the driver hung at exit for good
    # (seen here): the logger's atexit close waited on its writer thread, whose queue never delivered the stop.
    # MLflow holds the metrics; search/run.py adds back Tune's CSV and JSON loggers, which its analysis reads.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    # Tune snapshots its trials and searcher at most every 10 s by default; a driver killed in that window would,
    # on --resume, run a trial again that had already finished. Every 2 s narrows the window; a snapshot of
    # a search's state takes milliseconds.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    # Tune logs every failed trial's whole traceback (about 45 lines, most of them Ray's own frames) and then
    # the list of trials that did not complete. The progress line says what went wrong and where the traceback
    # is, and the trial's MLflow run holds it; TUNE_PRINT_ALL_TRIAL_ERRORS=1 brings Tune's back.
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    # Trials of epochs shorter than a few seconds checkpoint faster than Tune's 5 s threshold for snapshots of
    # its experiment state, and Tune then printed a 3-line warning between the progress lines (seen in a 3-epoch
    # search of about 1 s an epoch). A snapshot of a search takes milliseconds: there is nothing to act on.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    logging.getLogger("ray.tune.tune").addFilter(_drop_incomplete_trials_list)
    # A resumed search's results include the trials that never reported (interrupted before their first epoch,
    # or turned away); Tune warns that it found no result file for each. The search counts them itself.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    if ray.is_initialized():
        return
    # ray.init sets SIGTERM to sys.exit: a SIGTERM then killed the search by SIGABRT instead of ending it as Ctrl-C
    # does (seen in tests/test_search.py's Ctrl-C test). The caller's handler (the CLI's) is put back.
    main_thread = threading.current_thread() is threading.main_thread()
    on_sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        _connect(address)
    finally:
        if on_sigterm is not None:
            signal.signal(signal.SIGTERM, on_sigterm)


def _drop_incomplete_trials_list(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Trials did not complete")


def _connect(address: ClusterAddress | None) -> None:
    logging.getLogger("ray").setLevel(logging.WARNING)
    # Tune's own console tables would interleave with ProgressPrinter's lines; with the legacy output
    # engine, verbose=0 is silent.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if address is not None:
        try:
            ray.init(address=address.address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise RayUnreachable(f"cannot join the Ray cluster at {address.address} (from {address.source}): "
                                 f"{first_line}") from None
        return
    # Ray turns token authentication on for a new local cluster (good) and warns about it on every start,
    # which a user can do nothing about; the README says it once.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # Each trial runs several small actors (its driver, a report queue, Train's controller, the workers), so
    # on a 2-core machine the raylet warns that "8 PYTHON worker processes have been started", with no way
    # to silence it (ray-project/ray#63800). Its threshold is the startup concurrency, which defaults to
    # the CPU count; a search's expected process count is above that by design.
    os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(max(16, 4 * (os.cpu_count() or 1))))
    # One logical CPU beyond the cores: Tune's own actors and a multi-worker trial's small helpers (its Train
    # controller, report queue) start beside workers that reserve whole cores.
    # address="local": with no address, ray.init() would join whatever cluster RAY_ADDRESS or the address file
    # of an earlier `ray start` (even a stopped one) names, and refuse num_cpus there.
    ray.init(address="local", num_cpus=(os.cpu_count() or 1) + 1, include_dashboard=False, log_to_driver=False,
             configure_logging=True, logging_level=logging.WARNING)
