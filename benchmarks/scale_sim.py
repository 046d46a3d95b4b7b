"""A simulated GPU cluster on this machine: 16 nodes x 8 fake GPUs (ray.cluster_utils.Cluster, one raylet a node,
a head with no CPU), 200 trials of a stand-in trainable through the project's own search path (`run_search`: the
BudgetedOptunaSearch on the job's default space, the Pareto successive-halving scheduler, the MLflow trial logger
and the progress printer). Goal: >= 95% of the GPUs busy in the steady state, and a driver RSS < 2 GB.

The stand-in (`stand_in`) sleeps a drawn time per epoch (uniform in EPOCH_S, drawn once per trial from an RNG
seeded by its configuration) and reports what the real trainer reports (epoch, loss, epoch_s, gflops, map on the
evaluated epochs, full_budget on the last), plus its own clock readings. Its process imports nothing heavier than
ray.tune. The job is the default one (compound space at GPU bounds, multivariate TPE, pareto scheduler) with
EPOCHS epochs, 1 worker x 1 GPU x 1 CPU a trial, and max_concurrent_trials set to the cluster's GPU count.

Estimator, fixed before the first full-size result was seen (the window's opening was redefined once, after the
development runs at 2 and 4 nodes, from "the 128th trial begins": with slow process starts, early GPUs take their
second trial before the last GPU gets its first):
- A GPU is busy while a trial's stand-in "trains" on it: from the moment its function begins (read in the trial's
  process) to its last report (stamped in the trial's process). Process start, Tune's scheduling, the searcher,
  MLflow and the actor reset between trials all count as idle GPU time.
- Steady state is the window in which the cluster should be full and trials are still waiting to start: it opens
  when the last GPU to get a trial gets its first (every GPU has had a trial begin on it, so the first wave of
  process starts is behind) and closes when the last of the TRIALS trials begins (after that nothing waits, and
  the tail drains). The headline `gpu_busy` is the busy GPU-seconds inside that window over GPUS x its length.
  Also printed: the same share per 10-s bin of the window (median, p10-p90), the share of GPUs merely reserved
  by a running trial (Tune's trial start to its completion, as the driver sees them), and the share over the
  whole run from the cluster being ready to the last trial's end.
- Scheduling latency per trial: on each GPU (node id, GPU id, as the trial's process sees them), the gap from
  the previous trial's last report to the next trial's begin; median, p10-p90 and max over every trial that
  followed another on its GPU. Its parts, medians: last report -> the driver handles it, -> Tune's
  on_trial_complete, -> the next trial's on_trial_start, -> the stand-in begins. Trials of the first wave are
  reported apart: the time from the search's first on_trial_start to their begin.
- Driver peak memory: the driver process's RSS sampled every 0.25 s (psutil), its peak, and ru_maxrss.
- What limited it: the driver's main thread is sampled every 50 ms and each sample is charged to what it was
  doing (proposing, MLflow, the scheduler, Tune's own work, waiting on Ray); the machine's memory is sampled
  every 5 s and the cluster's processes (their USS) every 30 s. Node start-up is timed, and is outside the window.

Changed after the first full-size result (BENCHMARKS.md), which counted a trial as busy while its process
waited in ray.tune.report() for the driver to take the result, which is not training: since then the headline
`gpu_busy` is the share of the window spent in the stand-in's sleeps alone (each epoch's [report - epoch_s,
report]), and the per-bin figures are of that too. The first run's figure, from a trial's begin to its last
report, is printed above it as `busy, begin to last report`.

Simulation settings, not the project's: the nodes' object stores are 96 MiB each, the head runs no dashboard, and
each raylet starts one worker process at a time with 10 minutes to register (with 8 at once a node and Ray's 60 s,
the first full-size run's 128 processes on 2 cores never registered: each raylet killed and restarted them, and no
trial began in 5 minutes).

Guards, so that a run cannot take the shared machine down: the search is interrupted (and the run reported as
cut short) when the machine's available memory falls below MEMORY_FLOOR_GIB or the run passes DEADLINE_S.

Run: .venv/bin/python benchmarks/scale_sim.py   (--small: 2 nodes, 20 trials, short epochs, for development)
"""
from __future__ import annotations

import _thread
import json
import math
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
from ray import tune  # noqa: E402

NODES = 16
GPUS_PER_NODE = 8
TRIALS = 200
EPOCHS = 3
EPOCH_S = (20.0, 60.0)  # a trial's seconds per epoch, drawn uniformly once per trial
GPUS = NODES * GPUS_PER_NODE
CAPACITY = GPUS  # one GPU a trial
OBJECT_STORE_BYTES = 96 * 2**20  # per node: the stand-in moves no data; Ray's default (30% of RAM) x 17 would not fit
MEMORY_FLOOR_GIB = 2.5
CENSUS_S = 30  # how often the cluster's processes are counted (reading every process's smaps costs CPU)
DEADLINE_S = 13.5 * 60  # the search is interrupted here; winding it down and the report take the rest of 15 min
SMALL = {"NODES": 2, "TRIALS": 20, "EPOCH_S": (3.0, 6.0)}  # --small, for development only

if "--small" in sys.argv:
    globals().update(SMALL)
    GPUS = NODES * GPUS_PER_NODE
    CAPACITY = GPUS


class _SimSetup:
    """What a stand-in trial receives in place of search.trainable.TrialSetup (see `light_setup`)."""

    def __init__(self, epochs: int, eval_every: int, epoch_s: tuple[float, float]):
        self.epochs, self.eval_every, self.epoch_s = epochs, eval_every, epoch_s


def _sim_setup(epochs: int, eval_every: int, epoch_s: tuple[float, float]) -> _SimSetup:
    return _SimSetup(epochs, eval_every, epoch_s)


def light_setup() -> None:
    """Pickle the search's TrialSetup as a _SimSetup. TrialSetup lives in search/trainable.py, which imports torch
    and Ray Train at its top: unpickled in a trial's process it costs about 850 MB and 9 s there (measured with
    `import search.trainable`), which x 128 trial processes is far beyond this machine. The stand-in needs only
    the epochs; everything the driver does with the job is unchanged."""
    import copyreg

    from search.trainable import TrialSetup

    copyreg.pickle(TrialSetup, lambda setup: (_sim_setup, (setup.job.train.epochs, setup.job.train.eval_every,
                                                            EPOCH_S)))


def stand_in(config: dict, *, setup) -> None:
    """The trial: EPOCHS epochs of sleep, reporting as the real trainer does, with its process's clock readings."""
    import ray
    import ray.tune

    began = time.time()
    context = ray.get_runtime_context()
    gpu = f"{context.get_node_id()[:12]}/{','.join(context.get_accelerator_ids()['GPU'])}"
    spec = config["spec"]
    rng = random.Random(zlib.crc32(json.dumps(config, sort_keys=True, default=str).encode()))
    epoch_s = rng.uniform(*setup.epoch_s)
    # A cheap stand-in for the FLOPs, monotone in the sizes; AP grows with it, with noise.
    gflops = (2.5 * (spec["image_size"] / 512) ** 2 * spec["backbone_width"] ** 2 * spec["backbone_depth"]
              * (1 + spec["fpn_channels"] * spec["fpn_repeats"] / 400))
    final_map = min(0.8, max(0.05, 0.35 + 0.08 * math.log(gflops) + rng.gauss(0, 0.03)))
    for epoch in range(1, setup.epochs + 1):
        time.sleep(epoch_s)
        metrics = {"epoch": epoch, "loss": 1.5 / epoch, "epoch_s": epoch_s, "gflops": gflops,
                   "sim_began": began, "sim_gpu": gpu, "sim_torch": "torch" in sys.modules}
        if epoch % setup.eval_every == 0 or epoch == setup.epochs:
            metrics["map"] = final_map * (1 - 0.5 ** epoch) / (1 - 0.5 ** setup.epochs)
        if epoch == setup.epochs:
            metrics["full_budget"] = 1
        metrics["sim_reported"] = time.time()
        ray.tune.report(metrics)


class TrialTimes(tune.Callback):
    """The driver's record of every trial: its own clock readings (from its reports) and the driver's events."""

    def __init__(self):
        self.trials: dict[str, dict] = {}
        self.first_start: float | None = None

    def _of(self, trial) -> dict:
        return self.trials.setdefault(trial.trial_id, {})

    def on_trial_start(self, iteration, trials, trial, **info):
        now = time.time()
        self.first_start = self.first_start or now
        self._of(trial).setdefault("driver_start", now)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        record = self._of(trial)
        record.update(began=result["sim_began"], gpu=result["sim_gpu"], last_report=result["sim_reported"],
                      seen=time.time(), epochs=result["epoch"], torch=result["sim_torch"])
        # The epoch's sleep ended at its report: [reported - epoch_s, reported] is time spent training.
        record.setdefault("epoch_spans", []).append((result["sim_reported"] - result["epoch_s"],
                                                     result["sim_reported"]))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._of(trial)["driver_end"] = time.time()

    def on_trial_error(self, iteration, trials, trial, **info):
        record = self._of(trial)
        record["driver_end"], record["error"] = time.time(), True


# What the driver's main thread is doing, by the first frame (outermost first) that names it.
_ACTIVITIES = (
    ("searcher: propose (cost on meta, TPE)", ("suggest",), "searcher.py"),
    ("searcher: tell", ("on_trial_complete", "on_trial_result"), "searcher.py"),
    ("MLflow: frontier", ("record_frontier",), ""),
    ("MLflow: trial runs", ("on_trial_start", "on_trial_result", "on_trial_complete", "on_trial_error"),
     "trial_runs.py"),
    ("scheduler", ("on_trial_result", "on_trial_complete", "choose_trial_to_run"), "scheduler.py"),
    ("progress printer", ("on_trial_start", "on_trial_result", "on_trial_complete"), "progress.py"),
    ("Tune: experiment snapshot", ("checkpoint", "save_to_dir", "_checkpoint"), "experiment_state.py"),
)
_WAITING = ("wait", "get", "select", "poll", "sleep", "_wait", "get_objects", "wait_objects", "epoll")


def _activity(frame) -> str:
    stack = []
    while frame is not None:
        stack.append(frame)
        frame = frame.f_back
    stack.reverse()
    for name, functions, file in _ACTIVITIES:
        for f in stack:
            if f.f_code.co_name in functions and f.f_code.co_filename.endswith(file):
                return name
    innermost = stack[-1].f_code if stack else None
    if innermost is not None and (innermost.co_name in _WAITING or "ray/_private/worker.py" in innermost.co_filename):
        return "waiting on Ray (event loop)"
    if any("ray/tune" in f.f_code.co_filename or "ray/air" in f.f_code.co_filename for f in stack):
        return "Tune: other"
    return "other"


class Watch:
    """Samples in threads: the driver's RSS (0.25 s), its main thread's activity (50 ms), and every 5 s the
    machine's memory and the cluster's processes; interrupts the search past the memory floor or the deadline."""

    def __init__(self, started: float):
        self.started = started
        self.process = psutil.Process()
        self.peak_rss = 0
        self.activity: dict[str, int] = {}
        self.timeline: list[tuple[float, str]] = []  # (time, activity) of every sample of the main thread
        self.search_from: float | None = None
        self.peak_used = 0
        self.lowest_available = psutil.virtual_memory().available
        self.census: list[tuple[float, int, int, int]] = []  # (time, worker processes, their USS, the cluster's)
        self.peak_kinds: dict[str, list[int]] = {}  # at the most workers: kind -> [processes, USS]
        self.stopped_for = ""
        self._interrupted = 0.0
        self._main = threading.main_thread().ident
        self._done = threading.Event()
        self._threads = [threading.Thread(target=f, daemon=True) for f in (self._rss, self._stacks, self._machine)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._done.set()
        for thread in self._threads:
            thread.join()

    def _rss(self) -> None:
        while not self._done.wait(0.25):
            self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)

    def _stacks(self) -> None:
        while not self._done.wait(0.05):
            if self.search_from is None:
                continue
            frame = sys._current_frames().get(self._main)
            if frame is not None:
                name = _activity(frame)
                self.activity[name] = self.activity.get(name, 0) + 1
                self.timeline.append((time.time(), name))

    def _machine(self) -> None:
        last_census = 0.0
        while not self._done.wait(5):
            memory = psutil.virtual_memory()
            self.peak_used = max(self.peak_used, memory.total - memory.available)
            self.lowest_available = min(self.lowest_available, memory.available)
            if time.time() - last_census >= CENSUS_S:
                last_census = time.time()
                self._census()
            if self.stopped_for:
                continue
            if memory.available < MEMORY_FLOOR_GIB * 2**30:
                self.stopped_for = (f"memory: {memory.available / 2**30:.1f} GiB left on the machine with "
                                    f"{self.census[-1][1] if self.census else '?'} Ray workers up at the last count")
            elif time.time() - self.started > DEADLINE_S:
                self.stopped_for = f"deadline: {DEADLINE_S:.0f} s"
            if self.stopped_for and self.search_from is not None and time.time() - self._interrupted > 45:
                # Again if the first did not end the search: Tune's clean-up waits on actors still starting.
                self._interrupted = time.time()
                _thread.interrupt_main()

    def _census(self) -> None:
        """The cluster's processes by kind, with their unique memory (USS: the shared libraries they all map are
        not counted again for each)."""
        workers = worker_uss = cluster_uss = 0
        kinds: dict[str, list[int]] = {}
        for child in self.process.children(recursive=True):
            try:
                uss, cmdline = child.memory_full_info().uss, child.cmdline()
            except psutil.Error:
                continue
            cluster_uss += uss
            # A worker names itself ray::IDLE, ray::ImplicitFunc (a trial), ...; the rest by script or executable.
            kind = cmdline[0].split()[0] if cmdline and cmdline[0].startswith("ray::") else next(
                (Path(part).name for part in cmdline if part.endswith(".py")),
                Path(cmdline[0]).name if cmdline else child.name())
            if kind.startswith("ray::") and not kind.startswith(("ray::Dashboard", "ray::RuntimeEnv")):
                workers += 1
                worker_uss += uss
            count_uss = kinds.setdefault(kind, [0, 0])
            count_uss[0] += 1
            count_uss[1] += uss
        if workers >= max((c[1] for c in self.census), default=0):
            self.peak_kinds = kinds
        self.census.append((time.time(), workers, worker_uss, cluster_uss))


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """median, p10, p90."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return statistics.median(values), deciles[0], deciles[-1]


def overlap(a: float, b: float, lo: float, hi: float) -> float:
    return max(0.0, min(b, hi) - max(a, lo))


def analyse(trials: dict[str, dict], first_start: float, ready: float) -> dict:
    ran = [t for t in trials.values() if "began" in t]
    began = sorted(t["began"] for t in ran)
    out: dict = {"ran": len(ran), "errors": sum(bool(t.get("error")) for t in trials.values()),
                 "torch_in_trials": sum(bool(t.get("torch")) for t in ran)}
    if not ran:
        return out
    firsts: dict[str, float] = {}
    for t in ran:
        firsts[t["gpu"]] = min(firsts.get(t["gpu"], math.inf), t["began"])
    if len(firsts) == GPUS and began[-1] > max(firsts.values()):
        lo, hi = max(firsts.values()), began[-1]
        out["window"] = (lo - ready, hi - ready)
        span = hi - lo
        out["gpu_busy"] = sum(overlap(t["began"], t["last_report"], lo, hi) for t in ran) / (GPUS * span)
        # Added after the first full-size run: the estimator above also counts the time a trial's process sat in
        # ray.tune.report() until the driver took the result, which is not training.
        out["training_only"] = sum(overlap(a, b, lo, hi) for t in ran for a, b in t["epoch_spans"]) / (GPUS * span)
        out["reserved"] = sum(overlap(t["driver_start"], t.get("driver_end", hi), lo, hi)
                              for t in trials.values() if "driver_start" in t) / (GPUS * span)
        bins = [(lo + 10 * i, min(hi, lo + 10 * (i + 1))) for i in range(math.ceil(span / 10))]
        out["bins"] = [sum(overlap(c, d, a, b) for t in ran for c, d in t["epoch_spans"]) / (GPUS * (b - a))
                       for a, b in bins if b - a >= 5]
    else:
        out["window"] = None
    last_end = max(t["last_report"] for t in ran)
    out["whole_run"] = (sum(t["last_report"] - t["began"] for t in ran) / (GPUS * (last_end - ready)),
                        last_end - ready)
    out["trial_s"] = quantiles([t["last_report"] - t["began"] for t in ran])
    by_gpu: dict[str, list[dict]] = {}
    for t in ran:
        by_gpu.setdefault(t["gpu"], []).append(t)
    gaps, parts, first_wave = [], {"seen": [], "completed": [], "next_start": [], "begins": []}, []
    for on_gpu in by_gpu.values():
        on_gpu.sort(key=lambda t: t["began"])
        first_wave.append(on_gpu[0]["began"] - first_start)
        for prev, nxt in zip(on_gpu, on_gpu[1:]):
            gaps.append(nxt["began"] - prev["last_report"])
            parts["seen"].append(prev["seen"] - prev["last_report"])
            parts["completed"].append(prev.get("driver_end", prev["seen"]) - prev["seen"])
            parts["next_start"].append(nxt["driver_start"] - prev.get("driver_end", prev["seen"]))
            parts["begins"].append(nxt["began"] - nxt["driver_start"])
    out["gpus_used"] = len(by_gpu)
    out["gaps"] = (quantiles(gaps), max(gaps), len(gaps)) if gaps else None
    out["gap_parts"] = {k: statistics.median(v) for k, v in parts.items() if v}
    out["first_wave"] = (quantiles(first_wave), max(first_wave), len(first_wave))
    return out


def timeline(trials: dict[str, dict], samples: list[tuple[float, str]], ready: float, step: float = 30) -> str:
    """Per `step` seconds since the cluster was up: the GPUs busy on average, trials begun and ended by then, and
    what the driver's main thread did most."""
    ran = [t for t in trials.values() if "began" in t]
    if not ran:
        return "timeline: no trial began"
    end = max(t["last_report"] for t in ran)
    rows = ["timeline (s after the cluster was up: mean GPUs busy, trials begun / ended by then; driver's main "
            "thread, its two main activities)"]
    for i in range(math.ceil((end - ready) / step)):
        a, b = ready + i * step, min(end, ready + (i + 1) * step)
        busy = sum(overlap(t["began"], t["last_report"], a, b) for t in ran) / (b - a)
        begun = sum(t["began"] < b for t in ran)
        ended = sum(t["last_report"] < b for t in ran)
        counts: dict[str, int] = {}
        for when, name in samples:
            if a <= when < b:
                counts[name] = counts.get(name, 0) + 1
        total = sum(counts.values()) or 1
        top = ", ".join(f"{name} {n / total:.0%}" for name, n in sorted(counts.items(), key=lambda x: -x[1])[:2])
        rows.append(f"  {i * step:4.0f}-{(i + 1) * step:<4.0f} {busy:6.1f} GPUs  {begun:3d} / {ended:3d}  {top}")
    return "\n".join(rows)


def add_gpu_nodes(cluster) -> list[float]:
    """Adds the GPU nodes to `cluster` (its head already up); returns the seconds each took to join."""
    node_s = []
    for _ in range(NODES):
        t = time.time()
        cluster.add_node(num_cpus=GPUS_PER_NODE, num_gpus=GPUS_PER_NODE, object_store_memory=OBJECT_STORE_BYTES)
        node_s.append(time.time() - t)
    cluster.wait_for_nodes()
    return node_s


def main() -> None:
    import ray

    started = time.time()
    say = lambda text: print(text, flush=True)  # noqa: E731
    work = Path(tempfile.mkdtemp(prefix="scale-sim-", dir="/tmp"))
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ss", dir="/tmp")  # short: socket paths < 107 characters
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    # 16 nodes' worker processes share these 2 cores. The first run here started 8 a node at once (128), none
    # registered with its raylet within Ray's 60 s, and each raylet killed and restarted them, over and over: no
    # trial had begun after 5 minutes. One start at a time per node, and 10 minutes to register: a separate run
    # brought 128 actors importing ray.tune up in 193-233 s that way.
    os.environ["RAY_worker_maximum_startup_concurrency"] = "1"
    os.environ["RAY_worker_register_timeout_seconds"] = "600"
    say(f"scale_sim: {NODES} nodes x {GPUS_PER_NODE} fake GPUs, {TRIALS} trials of {EPOCHS} epochs of "
        f"{EPOCH_S[0]:.0f}-{EPOCH_S[1]:.0f} s, max_concurrent_trials {CAPACITY}; work in {work}, "
        f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.1f} GiB")

    from search.job import parse_job
    from search.run import run_search
    from trainers.shapes import make_shapes

    paths = make_shapes(work / "shapes", train_images=16, val_images=4)
    job = parse_job({
        "name": "scale-sim", "data": {"train": paths["train"], "val": paths["val"]},
        "search": {"trials": TRIALS, "max_concurrent_trials": CAPACITY},
        "train": {"epochs": EPOCHS},
        "resources": {"workers_per_trial": 1, "gpus_per_worker": 1, "cpus_per_worker": 1}})
    light_setup()  # this module runs as __main__, so cloudpickle sends the stand-in and _SimSetup by value

    watch = Watch(started)
    times = TrialTimes()
    outcome, cut = None, ""
    from ray.cluster_utils import Cluster

    t = time.time()
    # As in cluster.yaml and tests/test_cluster.py, the head offers no CPU; each node holds 8 one-GPU trials
    # (search.trainable.trial_resources: 1 CPU and 1 GPU a trial with cpus_per_worker 1, gpus_per_worker 1). No
    # dashboard on the head (about 1 GB of processes here): the search does not use it, and the memory is
    # needed for the trial processes.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": OBJECT_STORE_BYTES,
                                                            "include_dashboard": False})
    try:
        head_s = time.time() - t
        node_s = add_gpu_nodes(cluster)
        ready = time.time()
        startup_s = ready - t
        say(f"cluster: head {head_s:.1f} s, {NODES} nodes x {GPUS_PER_NODE} GPUs in {startup_s:.1f} s "
            f"(a node: median {statistics.median(node_s):.1f} s, max {max(node_s):.1f} s)")
        watch.search_from = ready
        try:
            outcome = run_search(job, ray_address=cluster.address, store=work / "store", trainable=stand_in,
                                 callbacks=[times], say=lambda text: say(f"search: {text}"))
        except KeyboardInterrupt:
            cut = watch.stopped_for or "interrupted"
        watch.search_from = None
        search_s = time.time() - ready
    finally:
        watch.stop()
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
    rss_peak, maxrss = watch.peak_rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    wall = time.time() - started

    result = analyse(times.trials, times.first_start, ready)
    say("")
    if not result["ran"]:
        say(f"NO TRIAL BEGAN ({cut or 'the search ended'}); driver peak RSS {rss_peak / 2**30:.2f} GiB")
        say("gpu_busy: 0.00")
        return
    say(f"search: {search_s:.0f} s after the cluster was up ({startup_s:.0f} s to start it); wall {wall:.0f} s")
    if outcome is not None:
        say(f"trials: {outcome.finished} finished ({outcome.pruned} stopped by the scheduler), {outcome.failed} "
            f"failed; "
            f"{result['ran']} began, on {result['gpus_used']} GPUs; trial processes with torch: "
            f"{result['torch_in_trials']}")
    if cut:
        say(f"CUT SHORT: {cut}; {result['ran']} trials had begun")
    median, p10, p90 = result["trial_s"]
    say(f"a trial's training (begin to last report): median {median:.0f} s, p10-p90 {p10:.0f}-{p90:.0f} s")
    fw_q, fw_max, fw_n = result["first_wave"]
    say(f"first trial on each of {fw_n} GPUs began after the search's first trial start: median {fw_q[0]:.0f} s, "
        f"p10-p90 {fw_q[1]:.0f}-{fw_q[2]:.0f} s, last {fw_max:.0f} s")
    if result["gaps"]:
        (g_med, g10, g90), g_max, g_n = result["gaps"]
        say(f"scheduling latency (a GPU's last report -> its next trial begins), {g_n} trials: median {g_med:.1f} s, "
            f"p10-p90 {g10:.1f}-{g90:.1f} s, max {g_max:.1f} s")
        say("  its parts, medians: " + ", ".join(f"{k} {v:.2f} s" for k, v in result["gap_parts"].items())
            + "  (seen: report -> driver; completed: -> on_trial_complete; next_start: -> the next on_trial_start; "
              "begins: -> the stand-in runs)")
    say(timeline(times.trials, watch.timeline, ready))
    whole, span = result["whole_run"]
    say(f"busy share over the whole run (cluster up -> last report, {span:.0f} s): {whole:.3f}")
    total_samples = sum(watch.activity.values()) or 1
    say("driver main thread during the search: " + ", ".join(
        f"{name} {count / total_samples:.0%}" for name, count in
        sorted(watch.activity.items(), key=lambda item: -item[1])))
    if watch.census:
        peak = max(watch.census, key=lambda c: (c[1], c[0]))  # the last count with the most workers
        say(f"cluster processes at most: {peak[1]} Ray workers, {peak[2] / max(peak[1], 1) / 2**20:.0f} MB USS each; "
            f"all of the cluster's processes {max(c[3] for c in watch.census) / 2**30:.1f} GiB USS at most; machine "
            f"memory used at most {watch.peak_used / 2**30:.1f} GiB, least available "
            f"{watch.lowest_available / 2**30:.1f} GiB")
        say("  by process, then: " + ", ".join(f"{kind} {n} x {rss / n / 2**20:.0f} MB" for kind, (n, rss) in
                                              sorted(watch.peak_kinds.items(), key=lambda item: -item[1][1])))
    say(f"driver peak RSS: {rss_peak / 2**30:.2f} GiB sampled, ru_maxrss {maxrss / 2**30:.2f} GiB (goal < 2 GB)")
    if result["window"] is None:
        say(f"NO STEADY STATE: {result['gpus_used']} of {GPUS} GPUs had a trial, or "
            f"the last trial began before the last GPU got its first; the headline below is the whole-run share")
        say(f"gpu_busy: {whole:.2f}")
        return
    lo, hi = result["window"]
    b_med, b10, b90 = quantiles(result["bins"])
    say(f"steady state: {lo:.0f}-{hi:.0f} s after the cluster was up ({hi - lo:.0f} s); reserved by running trials "
        f"{result['reserved']:.3f}; training per 10-s bin median {b_med:.3f}, p10-p90 {b10:.3f}-{b90:.3f}")
    say(f"busy, begin to last report (the first run's headline): {result['gpu_busy']:.3f}; of that, "
        f"{result['gpu_busy'] - result['training_only']:.3f} trials waited in ray.tune.report() for the driver")
    say(f"gpu_busy: {result['training_only']:.2f}")


if __name__ == "__main__":
    main()
