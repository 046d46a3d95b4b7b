"""The job file: YAML parsed with safe_load into typed dataclasses, with errors that name the key."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from search.job_yaml import read_yaml
from spaces import enqueued_params, fixed_value_problems, make_space, space_names, warmup_bound
from trainers.errors import InputError
from trainers.recipe import TrainConfig
from trainers.validate import CHECK_MODES
from trainers.typed import ConfigError, from_mapping


SAMPLERS = ("tpe", "nsga2", "gp", "random")
SCHEDULERS = ("pareto", "asha", "fifo")


class JobError(InputError, ValueError):
    """The job file is unusable; the message names the file and the key."""


@dataclass(frozen=True)
class DataSplit:
    annotations: str
    images: str


@dataclass(frozen=True)
class DataConfig:
    train: DataSplit
    val: DataSplit
    # How the images are checked before anything trains: full (decode every image), headers (sizes and
    # EXIF orientation only), or sample (decode a seeded sample of 500). See trainers/validate.py.
    check: str = "full"
    # Decoded images kept in memory, per node, shared by its workers; a split that does not fit is not cached.
    cache_gib: float = 2.0


@dataclass(frozen=True)
class ModelConfig:
    # A local ImageNet checkpoint of a standard EfficientNet / EfficientNet-Lite (a timm state dict, .pth or
    # .safetensors). The search then keeps the backbone at that size and searches the rest.
    backbone_weights: str | None = None


@dataclass(frozen=True)
class SearchConfig:
    # compound: the paper's scaling rules with their constants searched, in GPU-sized bounds unless
    # `bounds` says otherwise ({preset: cpu} for the CPU-sized variant); bifpn: the BiFPN, heads and resolution
    # searched directly on one backbone; lite_cpu and efficientdet: fixed rules. A list composes one of these
    # with `training` (lr, weight decay, warmup, batch size, focal loss): [bifpn, training].
    space: str | list[str] = "compound"
    trials: int = 8
    # Trials at once; by default what the cluster holds when the search starts (search/ray_runtime.py).
    max_concurrent_trials: int | None = None
    seed: int = 0
    sampler: str = "tpe"  # tpe (multivariate) | nsga2 | gp | random; each seeded with `seed`
    # pareto: successive halving ranked by (AP, GFLOPs) fronts | asha: Ray's ASHA on AP alone | fifo: no early stop
    scheduler: str = "pareto"
    grace_period: int = 2  # epochs before the first rung; rungs at grace, grace*eta, ... below train.epochs
    reduction_factor: float = 3  # eta: each rung continues the best 1/eta of the trials that reached it
    max_gflops: float | None = None  # configurations above this are rejected before training
    max_params_m: float | None = None  # and those with more parameters than this, in millions
    # Parameters of the space held at one value, e.g. {image_size: 512}: Optuna's PartialFixedSampler
    # hands the space these values and samples the rest.
    fixed: dict[str, Any] = field(default_factory=dict)
    # The space's bounds: {preset: gpu | cpu, ...any field of its bounds} (spaces/compound.py, bifpn.py,
    # training.py). With a list of spaces, keyed by space: {bifpn: {preset: cpu}, training: {lr: [0.001, 0.01]}}.
    bounds: dict[str, Any] = field(default_factory=dict)
    # The first trials, before the sampler proposes: "rule:PHI" (the paper's scaling rule at PHI, compound space),
    # a preset d0..d7x (its nearest point within the bounds), or a mapping of some of the space's parameters.
    enqueue: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class ResourcesConfig:
    workers_per_trial: int = 1
    cpus_per_worker: int = 2
    gpus_per_worker: int = 0
    # Worker crashes a trial survives; each restart continues from the trial's last epoch checkpoint.
    max_failures: int = 1


@dataclass(frozen=True)
class Job:
    name: str
    data: DataConfig
    search: SearchConfig = field(default_factory=SearchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    model_name: str | None = None  # registered model name; defaults to the job name
    # Where Tune and Train keep trial checkpoints: a folder every node mounts (NFS) or a URI (s3://, gs://).
    # Unset: EFFSEARCH_STORAGE_PATH, else the driver's own store, which is enough on one machine.
    storage_path: str | None = None

    @property
    def registered_model_name(self) -> str:
        return self.model_name or self.name


def load_job(path: str | Path, *, paths_here: bool = True) -> Job:
    path = Path(path)
    if not path.is_file():
        raise JobError(f"{path}: job file not found")
    try:
        raw = read_yaml(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise JobError(f"{path}: malformed YAML{where}: {problem}") from None
    if raw is None:  # nothing but comments, or nothing at all
        raise JobError(f"{path}: the job file is empty (it needs at least name and data)")
    return parse_job(raw, source=str(path), base_dir=path.parent, paths_here=paths_here)


def parse_job(raw: Any, *, source: str = "job", base_dir: Path | str = ".", paths_here: bool = True) -> Job:
    """Validate a parsed job; relative data paths are resolved against base_dir and, with paths_here, must exist
    on this machine (a job submitted to a cluster has them checked there instead: search/cluster.py)."""
    try:
        job = from_mapping(Job, raw, "job")
    except ConfigError as err:
        raise JobError(f"{source}: {err}") from None
    _check_values(job, source)
    job = replace(job, data=_resolve_data(job.data, Path(base_dir), source, paths_here))
    if job.storage_path is not None:
        job = replace(job, storage_path=storage_location(job.storage_path, "job.storage_path", Path(base_dir),
                                                         source))
    if job.model.backbone_weights:
        weights = _resolve(job.model.backbone_weights, Path(base_dir), "job.model.backbone_weights", True, source,
                           paths_here)
        job = replace(job, model=replace(job.model, backbone_weights=weights))
    return job


def model_name_problems(key: str, name: str, fix: str = "") -> list[str]:
    """Why `name` cannot be a registered model's name (MLflow refuses '/' and ':'): a job is checked before its
    search, not at the promotion after it."""
    if not any(c in name for c in "/:"):
        return []
    return [f"{key}: {name!r} is the registered model's name, and MLflow's model names cannot contain '/' or ':'"
            f"{fix}"]


def _check_values(job: Job, source: str) -> None:
    problems = []
    try:
        space_names(job.search.space)
        space_ok = True
    except ConfigError as err:
        problems.append(str(err))
        space_ok = False
    if job.search.trials < 1:
        problems.append("job.search.trials: must be >= 1")
    if job.search.max_concurrent_trials is not None and job.search.max_concurrent_trials < 1:
        problems.append("job.search.max_concurrent_trials: must be >= 1 (leave it out for what the cluster holds)")
    for key in ("max_gflops", "max_params_m"):
        if getattr(job.search, key) is not None and getattr(job.search, key) <= 0:
            problems.append(f"job.search.{key}: must be > 0")
    if job.search.sampler not in SAMPLERS:
        problems.append(f"job.search.sampler: must be one of {', '.join(SAMPLERS)}, got {job.search.sampler!r}")
    if job.search.scheduler not in SCHEDULERS:
        problems.append(f"job.search.scheduler: must be one of {', '.join(SCHEDULERS)}, got {job.search.scheduler!r}")
    if job.search.grace_period < 1:
        problems.append("job.search.grace_period: must be >= 1 (epochs)")
    if not job.search.reduction_factor > 1:
        problems.append("job.search.reduction_factor: must be > 1")
    if not isinstance(job.search.bounds, dict):
        problems.append(f"job.search.bounds: must be a mapping, got {job.search.bounds!r}")
    elif space_ok:
        try:
            make_space(job.search.space, job.search.bounds)
        except ConfigError as err:
            problems.append(str(err))
    if not isinstance(job.search.fixed, dict):
        problems.append(f"job.search.fixed: must be a mapping of parameter: value, got {job.search.fixed!r}")
    elif space_ok and not problems:
        problems.extend(f"job.search.fixed.{problem}" for problem in
                        fixed_value_problems(job.search.space, job.search.fixed, job.search.bounds))
    if not isinstance(job.search.enqueue, list):
        problems.append(f"job.search.enqueue: must be a list of rule:PHI, presets or parameter mappings, got "
                        f"{job.search.enqueue!r}")
    elif space_ok and not problems:
        try:
            enqueued_params(job.search.space, job.search.enqueue, job.search.bounds)
        except ConfigError as err:
            problems.append(str(err))
    if space_ok and not problems:
        problems.extend(_warmup_problems(job))
    for key in ("workers_per_trial", "cpus_per_worker"):
        if getattr(job.resources, key) < 1:
            problems.append(f"job.resources.{key}: must be >= 1")
    for key in ("gpus_per_worker", "max_failures"):
        if getattr(job.resources, key) < 0:
            problems.append(f"job.resources.{key}: must be >= 0")
    if job.resources.gpus_per_worker > 1:  # Ray would reserve them all, and the worker would train on the first
        gpus = job.resources.gpus_per_worker
        problems.append(f"job.resources.gpus_per_worker: a worker trains on one GPU, so it is 0 or 1, got {gpus}; "
                        f"for {gpus} GPUs a trial, set workers_per_trial: {gpus}")
    if not job.name.strip():
        problems.append("job.name: must not be empty")
    problems.extend(model_name_problems(*(("job.model_name", job.model_name) if job.model_name else
                                          ("job.name", job.name, "; set job.model_name to one without them"))))
    if job.data.check not in CHECK_MODES:
        problems.append(f"job.data.check: must be one of {', '.join(CHECK_MODES)}, got {job.data.check!r}")
    if job.data.cache_gib < 0:
        problems.append("job.data.cache_gib: must be >= 0")
    if problems:
        raise JobError(f"{source}: {problems[0]}")


def _warmup_problems(job: Job) -> list[str]:
    """Warmup must end before the run does (the schedule would cut it short, and the searched value would differ
    from the one trained): the training space's range, and train.warmup_epochs, against train.epochs."""
    epochs = job.train.epochs
    bound = warmup_bound(job.search.space, job.search.bounds)
    if bound is not None and bound[1] >= epochs:
        given = "training" in job.search.bounds and "warmup_epochs" in (job.search.bounds.get("training") or {})
        return [f"job.search.bounds.training.warmup_epochs: [{bound[0]:g}, {bound[1]:g}]"
                f"{'' if given else ' (the default)'} "
                f"reaches train.epochs ({epochs}); warmup must end before the run does, e.g. "
                f"warmup_epochs: [0, {epochs / 2:g}]"]
    if bound is None and job.train.warmup_epochs >= epochs:
        return [f"job.train.warmup_epochs: {job.train.warmup_epochs:g} is not shorter than train.epochs ({epochs}); "
                f"warmup must end before the run does"]
    return []


STORAGE_VARIABLE = "EFFSEARCH_STORAGE_PATH"
# pyarrow's file systems, which Tune and Train write checkpoints through.
STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")


def storage_location(value: str, key: str, base: Path, source: str) -> str:
    """A URI pyarrow can write to, unchanged, or a folder made absolute (against base): the folder need not exist
    on this machine, since on a cluster it is the nodes' shared mount."""
    value = str(value).strip()
    scheme, sep, rest = value.partition("://")
    if sep:
        if scheme.lower() not in STORAGE_SCHEMES or not rest.strip("/"):
            raise JobError(f"{source}: {key}: {value!r} is not a storage URI Tune can write to ("
                           f"{', '.join(s + '://' for s in STORAGE_SCHEMES)}) nor a folder")
        return value
    if not value:
        raise JobError(f"{source}: {key}: must be a folder or a URI, got an empty string")
    path = Path(value).expanduser()
    return str((path if path.is_absolute() else base / path).resolve())


def _resolve(value: str, base: Path, key: str, want_file: bool, source: str, must_exist: bool = True) -> str:
    path = Path(value).expanduser()
    path = path if path.is_absolute() else (base / path)
    if must_exist and not (path.is_file() if want_file else path.is_dir()):
        raise JobError(f"{source}: {key}: {'file' if want_file else 'folder'} not found: {path}")
    return str(path.resolve())


def _resolve_data(data: DataConfig, base: Path, source: str, must_exist: bool) -> DataConfig:
    splits = {split: DataSplit(
        annotations=_resolve(getattr(data, split).annotations, base, f"job.data.{split}.annotations", True, source,
                             must_exist),
        images=_resolve(getattr(data, split).images, base, f"job.data.{split}.images", False, source, must_exist))
        for split in ("train", "val")}
    return replace(data, **splits)
