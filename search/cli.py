"""The `effsearch` command line."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import warnings
from pathlib import Path

from trainers.errors import InputError
from trainers.words import counted

# Nothing may be fetched at run time: no hub look-ups from timm or huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
# effdet 0.4.1 decorates with torch.jit.script, which torch 2.14 deprecates loudly on every import.
warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)


class UsageError(InputError):
    """A bad argument: printed as one line, exit status 2."""


class SearchFailed(Exception):
    """The search ran but produced nothing usable: printed as one line, exit status 1."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # Each command imports what it needs; the errors are caught by their light bases, so that a bad file or
    # name is reported without importing torch first.
    import ray

    from search.interrupts import CloseAbandoned
    from search.ray_runtime import RayUnreachable

    # MLflow logs store migrations and registrations at INFO (set on import); the CLI prints its own summary.
    logging.getLogger("mlflow").setLevel(logging.WARNING)

    # A SIGTERM (a scheduler's or a container's stop) ends a search as Ctrl-C does: its runs are closed KILLED.
    on_sigterm = signal.signal(signal.SIGTERM, _interrupt)
    ray_was_up, abandoned = ray.is_initialized(), False  # a caller's Ray (a test's) stays up
    try:
        return args.func(args) or 0
    except InputError as err:  # a job, config, data, frontier, cluster, predict or usage error
        print(f"effsearch: error: {err}", file=sys.stderr)
        return 2
    except (SearchFailed, RayUnreachable) as err:
        print(f"effsearch: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a folder the user named that cannot be made or written (read-only, not a folder...)
        if err.filename is None:  # not about a path: a fault to see whole
            raise
        print(f"effsearch: error: {err.filename}: {err.strerror}", file=sys.stderr)
        return 1
    except CloseAbandoned:
        abandoned = True
        print("effsearch: interrupted while its runs were closing: some may show RUNNING in MLflow; finished trials "
              "stay recorded, and `effsearch search JOB --resume` continues the search", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("effsearch: interrupted; the search and its open trials are marked KILLED in MLflow, "
              "finished trials stay recorded", file=sys.stderr)
        return 130
    finally:
        if ray.is_initialized() and not ray_was_up and not abandoned:  # abandoned: Ray's exit hook stops it
            _stop_ray()
        if on_sigterm is not None:  # an in-process caller's handler comes back (None: not set from Python)
            signal.signal(signal.SIGTERM, on_sigterm)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _stop_ray() -> None:
    """Stop the Ray the command started (or leave the cluster it joined) here rather than in Ray's exit hook: a
    Ctrl-C in those seconds of the hook cut Ray's shutdown short and printed a traceback (seen here)."""
    import ray

    from search.interrupts import RAY_STOP_NOTICE, CloseAbandoned, held_interrupts

    try:
        with held_interrupts(notice=RAY_STOP_NOTICE):
            ray.shutdown()
    except CloseAbandoned:
        pass  # pressed twice more: quit now, as the notice said


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="effsearch", description=__doc__.strip() + " EfficientDet search "
                                     "on Ray Tune + Optuna, tracked in MLflow.")
    sub = parser.add_subparsers(title="commands")

    p = sub.add_parser("demo", help="make the shapes dataset, search, promote; all on this machine")
    p.add_argument("--dir", type=Path, default=Path(".effsearch/demo"), help="where the dataset and job go")
    p.add_argument("--trials", type=int, help="override the demo's number of trials")
    p.add_argument("--epochs", type=int, help="override the demo's epochs per trial")
    p.add_argument("--detector", action="store_true",
                   help="also search the detector's parts (neck, head, box loss, assigner, label smoothing, mixup), "
                        "in experiment shapes-detector-demo")
    p.set_defaults(func=_demo)

    p = sub.add_parser("search", help="run the search a job file describes")
    p.add_argument("job", type=Path, help="job YAML file")
    p.add_argument("--address", help="an existing Ray cluster to run on, at its GCS address HOST:PORT (default: "
                   "RAY_ADDRESS if set, else a new local Ray)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--resume", action="store_true",
                     help="continue this job's interrupted search: finished trials are kept, running ones continue "
                          "from their last checkpoint")
    how.add_argument("--warm-start", metavar="EXPERIMENT",
                     help="seed the search with the complete trials of another job's search (same space)")
    p.set_defaults(func=_search)

    p = sub.add_parser("submit", help="run the search a job file describes on a Ray cluster, as a Ray job")
    p.add_argument("job", type=Path, help="job YAML file; its data paths must exist on the cluster's nodes")
    p.add_argument("--address", help="the cluster's Jobs API, http://HEAD:8265 (default: RAY_ADDRESS)")
    p.add_argument("--tracking-uri", help="the MLflow store the search writes to (default: MLFLOW_TRACKING_URI)")
    p.add_argument("--store", default=None, help="the search driver's folder on the head node, for --resume "
                   "(default: ~/.effsearch there)")
    p.add_argument("--resume", action="store_true", help="continue this job's search, killed or stopped earlier")
    p.set_defaults(func=_submit)

    p = sub.add_parser("jobs", help="the Ray jobs of a cluster: list, status ID, logs ID [--follow], stop ID")
    p.add_argument("action", choices=("list", "status", "logs", "stop"))
    p.add_argument("job_id", nargs="?", help="the job id that submit printed (all but list)")
    p.add_argument("--address", help="the cluster's Jobs API, http://HEAD:8265 (default: RAY_ADDRESS)")
    p.add_argument("--follow", action="store_true", help="logs: keep printing until the job ends")
    p.set_defaults(func=_jobs)

    p = sub.add_parser("frontier", help="print an experiment's accuracy-vs-FLOPs frontier")
    p.add_argument("experiment", help="experiment name (the job's name)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_frontier)

    p = sub.add_parser("promote", help="register the best frontier model within a budget as production",
                       description="Register the highest-AP frontier run within the budgets (or --run-id) as the "
                       "production version; the version it replaces becomes 'previous'. Running it again changes "
                       "nothing.")
    p.add_argument("experiment", help="experiment name (the job's name)")
    p.add_argument("--max-gflops", type=float, help="FLOPs budget, billions of multiply-adds per image")
    p.add_argument("--max-params-m", type=float, help="parameter budget, millions")
    p.add_argument("--run-id", help="promote this trial run instead of choosing one")
    p.add_argument("--force", action="store_true", help="with --run-id: promote a complete run off the frontier")
    p.add_argument("--rollback", action="store_true", help="swap production and previous back")
    p.add_argument("--model-name", help="registered model name (default: the experiment name)")
    p.set_defaults(func=_promote)

    p = sub.add_parser("predict", help="detect objects in images with a logged model; writes COCO detections",
                       description="Detect objects with an MLflow model (models:/NAME@production, runs:/ID/model or "
                       "a local path); boxes are in each image's own pixels, with the dataset's category ids.")
    p.add_argument("model_uri", help="models:/NAME@production, runs:/RUN_ID/model, or a local model folder")
    p.add_argument("images", nargs="+", help="image files, or folders of them")
    p.add_argument("--out", type=Path, default=Path("detections.json"),
                   help="COCO results JSON to write (default: detections.json)")
    p.add_argument("--draw", type=Path, metavar="DIR", help="also write copies of the images with their boxes here")
    p.add_argument("--score-threshold", type=float, default=0.3,
                   help="keep detections scoring at least this (default 0.3; 0 keeps effdet's top 100 per image)")
    p.set_defaults(func=_predict)

    p = sub.add_parser("gc", help="delete the logged models of runs off the frontier (dry run by default)")
    p.add_argument("experiment", help="experiment name (the job's name)")
    p.add_argument("--delete", action="store_true", help="delete them; without it, only list them")
    p.set_defaults(func=_gc)

    p = sub.add_parser("describe", help="parameters, GFLOPs and input size of a preset (d0..d7x) or a spec file")
    p.add_argument("model", help="a preset name (d0..d7x) or a spec YAML/JSON file")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes: a preset's (COCO's 90 if not given), or in place of a spec file's num_classes")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--choices", action="store_true",
                   help="also the params and GFLOPs with each neck, head, assigner and box loss swapped in")
    p.set_defaults(func=_describe)

    p = sub.add_parser("make-shapes", help="write the synthetic shapes COCO dataset")
    p.add_argument("dir", type=Path)
    p.add_argument("--train", type=int, default=600, help="training images")
    p.add_argument("--val", type=int, default=100, help="validation images")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_shapes)

    p = sub.add_parser("ui", help="open the MLflow UI on the tracking store")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=_ui)
    return parser


def _demo(args) -> int:
    from search.demo import DEMO_PROMOTE_GFLOPS, demo_job

    for flag, value in (("--trials", args.trials), ("--epochs", args.epochs)):
        if value is not None and value < 1:
            raise UsageError(f"demo {flag}: must be at least 1, got {value}")
    print(f"effsearch demo: writing the shapes dataset and job under {args.dir}")
    job_file, job = demo_job(args.dir, trials=args.trials, epochs=args.epochs, detector=args.detector)
    print(f"job file: {job_file}")
    outcome = _run_and_report(job)
    budget = max(DEMO_PROMOTE_GFLOPS, min(p.gflops for p in outcome.frontier))
    _promote_and_report(job.name, model_name=job.registered_model_name, max_gflops=budget)
    _ui_hint(outcome.experiment_id)
    return 0


def _search(args) -> int:
    from search.job import load_job

    job = load_job(args.job)
    outcome = _run_and_report(job, args.address, resume=args.resume, warm_start_from=args.warm_start)
    name = shlex.quote(job.name)  # a name with spaces is one word in the shell
    print(f"next: effsearch frontier {name}   |   effsearch promote {name} --max-gflops X")
    _ui_hint(outcome.experiment_id)
    return 0


def _run_and_report(job, address=None, **continuation):
    from search.frontier import format_table
    from search.run import run_search
    from spaces import space_label
    from search.tracking import tracking_uri

    print(f"tracking store: {tracking_uri()}  experiment: {job.name}")
    print(f"searching {counted(job.search.trials, 'trial')} of space {space_label(job.search.space)}, "
          f"{counted(job.train.epochs, 'epoch')} each")
    outcome = run_search(job, ray_address=address, **continuation)
    stopped = f" ({outcome.pruned} of them stopped early by the scheduler)" if outcome.pruned else ""
    print(f"\n{counted(outcome.finished, 'trial')} finished{stopped}, {outcome.failed} did not train. "
          f"Frontier (parent run {outcome.parent_run_id}):")
    print(format_table(outcome.frontier) if outcome.frontier else "(empty: no trial of this experiment has finished "
          "training)")
    if outcome.failure:  # no trial finished, or the data is at fault; the frontier keeps what finished
        raise SearchFailed(outcome.failure)
    return outcome


def _promote_and_report(experiment: str, **choice):
    import mlflow
    from mlflow.tracking import MlflowClient

    from search.promote import promote
    from search.tracking import tracking_uri

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    promotion = promote(MlflowClient(uri), experiment, **choice)
    if not promotion.changed:
        print(f"run {promotion.run_name} ({promotion.run_id}) is already production, as version "
              f"{promotion.version}: nothing changed")
        return promotion
    budget = ", ".join(f"{key.removeprefix('max_')} <= {value:g}" for key, value in choice.items()
                       if key.startswith("max_") and value is not None)
    print(f"promoted run {promotion.run_name} ({promotion.run_id}): AP {promotion.map:.3f}, "
          f"{promotion.gflops:.3f} GFLOPs{f' (budget {budget})' if budget else ''}, as version {promotion.version}")
    print(f"production model: {promotion.uri}")
    if promotion.previous_version:
        print(f"version {promotion.previous_version} is now 'previous': effsearch promote {experiment} --rollback "
              f"restores it")
    return promotion


def _submit(args) -> int:
    from search.cluster import DEFAULT_CLUSTER_STORE, jobs_address, submit

    logging.getLogger("ray").setLevel(logging.WARNING)  # Ray logs each package it uploads at INFO
    submission = submit(args.job, jobs_address(args.address), tracking_uri=args.tracking_uri,
                        store=args.store or DEFAULT_CLUSTER_STORE, resume=args.resume)
    print(f"submitted job {submission.job_id} to {submission.address}")
    print(f"experiment: {submission.experiment}   tracking URI: {submission.tracking_uri}")
    print(f"next: effsearch jobs logs {submission.job_id} --follow   |   effsearch jobs status {submission.job_id}")
    return 0


def _jobs(args) -> int:
    from search import cluster

    if args.action != "list" and not args.job_id:
        raise UsageError(f"jobs {args.action}: give the job id that submit printed (effsearch jobs list shows them)")
    client = cluster.connect(cluster.jobs_address(args.address))
    if args.action == "list":
        views = cluster.list_jobs(client)
        print(f"{'job':<30} {'status':<10} {'started':<20} experiment")
        for v in views:
            print(f"{v.job_id:<30} {v.status:<10} {v.started:<20} {v.experiment}")
        if not views:
            print("(no jobs submitted)")
        return 0
    if args.action == "logs":
        cluster.job_logs(client, args.job_id, follow=args.follow, write=lambda text: print(text, end="", flush=True))
        return 0
    view = cluster.stop_job(client, args.job_id) if args.action == "stop" else cluster.job_status(client, args.job_id)
    print(f"job {view.job_id}: {view.status}   experiment: {view.experiment}   tracking URI: {view.tracking_uri}")
    if view.message:
        print(view.message.splitlines()[0][:500])
    return 0


def _frontier(args) -> int:
    from mlflow.tracking import MlflowClient

    from search.frontier import experiment_frontier, experiment_id_for, format_table
    from search.tracking import tracking_uri

    client = MlflowClient(tracking_uri())
    found = experiment_frontier(client, experiment_id_for(client, args.experiment))
    if args.json:
        print(json.dumps([p.as_dict() for p in found.front], indent=2))
    else:
        print(f"{args.experiment}: {found.describe()}")
        if found.front:
            print(format_table(found.front))
    return 0


def _promote(args) -> int:
    if args.rollback:
        return _rollback(args)
    if args.force and not args.run_id:
        raise UsageError("promote --force needs --run-id: it promotes a chosen run that is off the frontier")
    _promote_and_report(args.experiment, max_gflops=args.max_gflops, max_params_m=args.max_params_m,
                        run_id=args.run_id, force=args.force, model_name=args.model_name)
    return 0


def _predict(args) -> int:
    import mlflow

    from search.predict import predict
    from search.tracking import tracking_uri

    if not 0 <= args.score_threshold <= 1:
        raise UsageError(f"predict --score-threshold: a score lies in [0, 1], got {args.score_threshold:g}")
    mlflow.set_tracking_uri(tracking_uri())  # models:/ and runs:/ resolve against the effsearch store
    done = predict(args.model_uri, args.images, args.out, draw_dir=args.draw, score_threshold=args.score_threshold)
    drawn = f"; drawn copies in {done.drawn}" if done.drawn else ""
    print(f"{counted(done.detections, 'detection')} in {counted(done.images, 'image')} "
          f"(score >= {args.score_threshold:g}) "
          f"written to {done.out}{drawn}")
    for note in done.skipped:
        print(f"not read (predict reads the image files directly in a folder): {note}")
    return 0


def _rollback(args) -> int:
    from mlflow.tracking import MlflowClient

    from search.promote import rollback
    from search.tracking import tracking_uri

    if args.run_id or args.max_gflops is not None or args.max_params_m is not None or args.force:
        raise UsageError("promote --rollback takes no --run-id, --max-gflops, --max-params-m or --force")
    name = args.model_name or args.experiment
    back = rollback(MlflowClient(tracking_uri()), name)
    print(f"rolled back {name}: production is version {back.version} again ({back.run_name}, AP {back.map:.3f}, "
          f"{back.gflops:.3f} GFLOPs); version {back.previous_version} is now 'previous'")
    return 0


def _gc(args) -> int:
    from mlflow.tracking import MlflowClient

    from search.model_gc import collectable, delete_models
    from search.tracking import tracking_uri

    client = MlflowClient(tracking_uri())
    runs = collectable(client, args.experiment)
    for run in runs:
        print(f"{'deleting' if args.delete else 'would delete'} the model of {run.run_name} ({run.run_id}): "
              f"{run.model_uri}")
    if args.delete:
        delete_models(client, runs)
        print(f"deleted {counted(len(runs), 'model')}; the runs, their metrics and params stay")
    else:
        print(f"{counted(len(runs), 'model')} of runs off the frontier and never registered"
              + ("; run again with --delete to delete them" if runs else ""))
    return 0


COCO_CLASSES = 90  # a preset's classes when describe is given none


def _describe(args) -> int:
    from spaces import PRESETS, preset
    from trainers.spec import ModelSpec

    if args.model.lower() in PRESETS:
        spec = preset(args.model, num_classes=args.num_classes or COCO_CLASSES)
    else:
        path = Path(args.model)
        if not path.is_file():
            raise UsageError(f"{args.model}: neither a preset ({', '.join(PRESETS)}) nor a spec file")
        import yaml

        from search.job_yaml import read_yaml

        try:
            raw = read_yaml(path.read_text())  # JSON is YAML too
        except yaml.YAMLError as err:
            raise UsageError(f"{path}: malformed YAML: {str(err).splitlines()[0]}") from None
        if isinstance(raw, dict) and {"data", "search"} & raw.keys():
            raise UsageError(f"{path} is a job file; describe takes a preset ({', '.join(PRESETS)}) or a model spec "
                             f"file (the fields of trainers/spec.py's ModelSpec)")
        if isinstance(raw, dict) and args.num_classes is not None:
            raw = {**raw, "num_classes": args.num_classes}
        spec = ModelSpec.from_dict(raw, where=str(path))
    from trainers.cost import model_cost  # torch: only once the input is known good

    cost = model_cost(spec)
    info = {"model": args.model, "params": cost.params, "params_m": round(cost.params_m, 3),
            "gflops": round(cost.gflops, 3), "image_size": spec.image_size, "spec": spec.to_dict()}
    if args.choices:
        from spaces.detector import choice_costs

        info["choices"] = choice_costs(spec)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{args.model}: {cost.params_m:.2f}M params, {cost.gflops:.2f} GFLOPs (multiply-adds) "
          f"at {spec.image_size}x{spec.image_size}")
    if args.choices:
        print(f"{'field':<10} {'value':<8} {'params':>9} {'GFLOPs':>8}")
        for row in info["choices"]:
            note = "  (this spec)" if row["current"] else ""
            print(f"{row['field']:<10} {row['value']:<8} {row['params_m']:>8.2f}M {row['gflops']:>8.3f}{note}")
        print("assigner and box_loss change only training: the same network, the same cost")
    return 0


def _make_shapes(args) -> int:
    from trainers.shapes import make_shapes

    for flag, value in (("--train", args.train), ("--val", args.val)):
        if value < 0:  # 0 is a split with no images: a set of fresh images to predict on, say
            raise UsageError(f"make-shapes {flag}: must be 0 or more, got {value}")
    paths = make_shapes(args.dir, train_images=args.train, val_images=args.val, seed=args.seed)
    for split, p in paths.items():
        print(f"{split}: {p['annotations']}  images: {p['images']}")
    return 0


def _ui(args) -> int:
    from mlflow.tracking import MlflowClient

    from search.tracking import tracking_uri, ui_url

    _check_port_free(args.host, args.port)
    uri = tracking_uri()
    base = f"http://{args.host}:{args.port}"
    print(f"MLflow UI for {uri} at {ui_url(base)}  (Ctrl-C to stop)")
    for experiment in MlflowClient(uri).search_experiments(max_results=20, order_by=["last_update_time DESC"]):
        if experiment.name != "Default":
            print(f"  {experiment.name}: {ui_url(base, experiment.experiment_id)}")
    # One server process: uvicorn's supervisor kills a worker that has not answered its health check within
    # 5 s, and on a busy machine (a search beside it) the UI's workers then die and restart forever (seen here).
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
               "--host", args.host, "--port", str(args.port), "--workers", "1"]
    # In a process group of its own, so that stopping this command stops every process MLflow starts (uvicorn, its
    # job runner and queue consumers): ending only `mlflow ui` left them serving on the port (seen here).
    server = subprocess.Popen(command, start_new_session=True)
    try:
        return server.wait()
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM to this process (main turns it into one)
        _stop_group(server)
        return 0


def _stop_group(leader: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM to the leader's process group; after grace_s (or another Ctrl-C), SIGKILL to what is left of it."""
    import time

    try:
        os.killpg(leader.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            os.killpg(leader.pid, 0)  # raises ProcessLookupError once no process of the group is left
            leader.poll()  # reaps the leader, which otherwise stays in the group as a zombie
            time.sleep(0.2)
        os.killpg(leader.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except KeyboardInterrupt:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader.pid, signal.SIGKILL)
    leader.wait()


def _check_port_free(host: str, port: int) -> None:
    """Uvicorn would print a traceback for a port in use; say it in one line, before starting it."""
    import errno
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise UsageError(f"port {port} on {host} is taken (another MLflow UI?): choose another with "
                                 f"--port N, or open the one running") from None
            raise UsageError(f"cannot listen on {host}:{port}: {err.strerror}") from None


def _ui_hint(experiment_id: str) -> None:
    from search.tracking import tracking_uri, ui_url

    print(f"\nbrowse the runs and the frontier: effsearch ui   (MLflow on {tracking_uri()}), then open "
          f"{ui_url('http://127.0.0.1:5000', experiment_id)}")


if __name__ == "__main__":
    sys.exit(main())
