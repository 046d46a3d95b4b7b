"""The per-worker loop: one function that Ray Train runs on each worker, usable without Ray too."""
from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3

from trainers.annotations import SplitIndex, TrainingData
from trainers.checkpoint import categories_of, load_checkpoint, save_checkpoint
from trainers.cost import latency_ms, model_cost
from trainers.data import CocoDetection, Collate, EpochSampler, to_model_input
from trainers.evaluate import CocoEvaluator, evaluate_all
from trainers.model import build_model, labeler, predict_bench, train_bench
from trainers.recipe import Placement, TrainConfig, autocast_dtype, build_optimizer, build_schedule, placement
from trainers.spec import ModelSpec
from trainers.staging import staged_folder
from trainers.syncbn import convert_sync_batchnorm

# report(metrics, checkpoint_dir or None)
Report = Callable[[dict, Optional[str]], None]
# Reading the loss on the host waits for the device; the non-finite check reads a device-side flag this
# often instead (and at the end of every epoch), and still names the exact step.
NONFINITE_CHECK_EVERY = 16


@dataclass(frozen=True)
class TrialPlan:
    """Everything one trial trains from, as one typed object that pickles: built once by the search driver
    (or by hand), and handed unchanged to every worker."""

    spec: ModelSpec
    data: TrainingData
    recipe: TrainConfig
    backbone_weights: str | None = None  # a local ImageNet checkpoint for the backbone (trainers/pretrained.py)
    cpus_per_worker: int | None = None  # what Ray reserved for each worker; None outside a search


class NonFiniteLoss(RuntimeError):
    pass


class OutOfMemory(RuntimeError):
    pass


@dataclass
class TrainingModules:
    """Every module the loop runs, each on the training device."""

    model: torch.nn.Module
    ema: ModelEmaV3 | None
    train_bench: torch.nn.Module
    predictors: dict[str, torch.nn.Module]  # "raw" and, with an EMA, "ema": effdet's decode + NMS benches


def build_modules(plan: TrialPlan, device: torch.device, world_size: int) -> TrainingModules:
    """The model, its EMA, and effdet's training and prediction benches, all placed on `device`."""
    recipe, cuda = plan.recipe, device.type == "cuda"
    model = build_model(plan.spec)
    if plan.backbone_weights:
        from trainers.pretrained import load_backbone_weights

        load_backbone_weights(model, plan.spec, plan.backbone_weights)
    model = model.to(device)
    if world_size > 1 and recipe.sync_bn:
        model = convert_sync_batchnorm(model, device)
    if recipe.channels_last and cuda:
        model = model.to(memory_format=torch.channels_last)
    ema = ModelEmaV3(model, decay=recipe.ema_decay, use_warmup=True) if recipe.ema else None
    predictors = {"raw": predict_bench(model, plan.spec),
                  **({"ema": predict_bench(ema.module, plan.spec)} if ema else {})}
    return TrainingModules(model, ema, train_bench(model, plan.spec), predictors)


def fit(plan: TrialPlan, report: Report, *, rank: int = 0, world_size: int = 1, local_world_size: int = 1,
        device: torch.device | str = "cpu", prepare_model=lambda m: m, resume_from: str | None = None) -> dict:
    """Train plan.spec on plan.data, evaluate with COCOeval, call `report` once per epoch; returns the last metrics.

    Every epoch rank 0 reports a checkpoint directory; `resume_from` continues from one, at the next epoch,
    with the optimizer, schedule, loss scaler, EMA and random state it held. With world_size > 1 the caller
    has set up torch.distributed (Ray Train does): each rank trains on its own shard, BatchNorm is
    synchronised unless recipe.sync_bn is off, and rank 0 scores the detections gathered from every rank.
    `prepare_model` wraps the training bench for data parallelism (DDP). local_world_size is the number of
    workers on this node, which share its decoded-image cache budget.
    """
    spec, recipe = plan.spec, plan.recipe
    torch.manual_seed(recipe.seed)
    device = torch.device(device)
    place = placement(recipe, device, plan.cpus_per_worker)
    if place.threads:
        torch.set_num_threads(place.threads)
    torch.backends.cudnn.benchmark = place.cudnn_benchmark
    _reset_peak_memory(device)
    cost = model_cost(spec)
    modules = build_modules(plan, device, world_size)
    model, ema = modules.model, modules.ema
    state = load_checkpoint(resume_from, model=model, ema_model=ema and ema.module) if resume_from else None
    train_set, val_set, sampler, train_loader, val_loader = data_loaders(plan, model, place, rank, world_size,
                                                                         local_world_size)
    bench = prepare_model(modules.train_bench)
    optimizer = build_optimizer(model, recipe, world_size)
    schedule = build_schedule(optimizer, recipe, len(train_loader))
    amp_dtype = autocast_dtype(recipe, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    evaluator = CocoEvaluator(plan.data.val.coco_ground_truth(), plan.data.val.label_map) if rank == 0 else None

    first_epoch, accuracy, deploy, resumed = 1, {}, "raw", {}
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if state["scaler"]:  # empty from a run without fp16 (CPU, bf16): the new scaler starts afresh
            scaler.load_state_dict(state["scaler"])
        first_epoch, accuracy, deploy = state["epoch"] + 1, state["accuracy"], state["deploy"]
        resumed = {"resumed_from_epoch": state["epoch"]}
    step_context = _StepContext(spec, recipe, device, amp_dtype)
    dropped = len(plan.data.train.trainable) - int(plan.data.train.trainable.sum())
    metrics: dict = {}
    for epoch in range(first_epoch, recipe.epochs + 1):
        sampler.set_epoch(epoch)
        seed_ranks_apart(recipe.seed, rank, world_size, epoch)
        shard_overlap = _shard_overlap(list(sampler.sampler), world_size)
        bench.train()
        start, seen, step = time.perf_counter(), 0, 0
        loss_sum = torch.zeros((), device=device)
        first_bad_step = torch.zeros((), dtype=torch.long, device=device)  # 0: every loss so far was finite
        for step, (images, targets) in enumerate(train_loader, 1):
            with step_context(epoch, step):
                images = to_model_input(images, device, place.channels_last)
                targets = {k: v.to(device, non_blocking=True) for k, v in targets.items()}
                with _autocast(device, amp_dtype):
                    loss = bench(images, targets)["loss"]
                loss_value = loss.detach().float()
                first_bad_step = torch.where((first_bad_step == 0) & ~torch.isfinite(loss_value),
                                             step, first_bad_step)
                loss_sum += loss_value
                if step % NONFINITE_CHECK_EVERY == 0:
                    _raise_if_nonfinite(first_bad_step, epoch)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if recipe.clip_grad_norm:
                    scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
                    torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                schedule.step()
                if ema is not None:
                    ema.update(model, step=schedule.last_epoch)
            seen += images.shape[0]
        _raise_if_nonfinite(first_bad_step, epoch)
        epoch_s = time.perf_counter() - start
        last = epoch == recipe.epochs
        evaluated = last or epoch % recipe.eval_every == 0
        eval_start = time.perf_counter()
        if evaluated:
            with step_context(epoch, "evaluation"):
                accuracy, deploy = evaluate_all(modules.predictors, val_loader, evaluator, device=device,
                                                rank=rank, world_size=world_size,
                                                channels_last=place.channels_last, amp_dtype=amp_dtype)
        metrics = {
            "epoch": epoch, "loss": float(loss_sum) / max(1, step), "epoch_s": epoch_s,
            "eval_s": time.perf_counter() - eval_start,
            "images_per_s": seen * world_size / epoch_s, "gflops": cost.gflops, "params_m": cost.params_m,
            "lr": schedule.get_last_lr()[0], "dropped_boxes": dropped,
            "world_size": world_size, "train_images": seen * world_size, "shard_overlap": shard_overlap,
            "peak_memory_mb": _peak_memory_mb(device), "image_cache": int(train_set.caching),
            # Accuracy keys appear only in an evaluated epoch's report; between evaluations the last
            # scores are kept (for the checkpoint) but not reported again as if measured now.
            **(accuracy if evaluated else {}), **resumed,
        }
        if last and rank == 0:
            deployed = ema.module if deploy == "ema" and ema is not None else model
            metrics["latency_ms"] = latency_ms(deployed, spec.image_size, device=str(device))
            metrics["latency_device"] = _device_name(device)
            metrics["full_budget"] = 1  # the trial ran every epoch it was given: eligible for the frontier
        if rank != 0:
            report(metrics, None)
            continue
        # Staged, not a TemporaryDirectory: a trial killed while its report waits leaves it, and the next removes it.
        with staged_folder() as folder:
            save_checkpoint(folder, spec=spec, model=model, ema_model=ema and ema.module, deploy=deploy, state={
                "epoch": epoch, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict(), "accuracy": accuracy, "deploy": deploy},
                categories=categories_of(plan.data.train))
            report(metrics, folder)
    return metrics


def seed_ranks_apart(seed: int, rank: int, world_size: int, epoch: int) -> None:
    """Seeds torch's generators for this rank's epoch when there are several ranks. Every rank builds the same
    model from recipe.seed (each EMA copies its own model before DDP syncs them, so they must start equal), and
    a checkpoint holds rank 0's random state only. Left there, every rank would draw the same drop-path masks
    (timm draws them from torch's global generator), and after a resume would draw rank 0's. Seeded by
    (seed, rank, epoch), the ranks draw apart, and a resumed epoch draws what it would have. One worker keeps the
    generator it had, and a checkpoint restores it."""
    if world_size > 1:
        torch.manual_seed(hash((seed, rank, epoch)) % 2**63)  # a tuple of ints hashes the same in every process


def _raise_if_nonfinite(first_bad_step: torch.Tensor, epoch: int) -> None:
    bad = int(first_bad_step)  # the one host-device sync of the check
    if bad:
        raise NonFiniteLoss(f"loss became non-finite at epoch {epoch} step {bad}")


def cache_plan(train: SplitIndex, val: SplitIndex, val_indices, node_bytes: int, processes_on_node: int) -> tuple[bool, bool]:
    """Which splits' decoded images this process keeps: each process's share of the node's budget must hold
    every image it will read, or that split is not cached at all (a partial cache holds memory for a hit rate
    no better than its fraction). Validation is cached first: it is read on every evaluation, twice (raw, EMA)."""
    share = node_bytes // max(1, processes_on_node)
    val_bytes = val.decoded_bytes(val_indices)
    cache_val = val_bytes <= share
    cache_train = train.decoded_bytes() <= share - (val_bytes if cache_val else 0)
    return cache_train, cache_val


def data_loaders(plan: TrialPlan, model, place: Placement, rank: int, world_size: int, local_world_size: int):
    """The datasets, the training sampler and the two loaders of one worker, as fit uses them."""
    # Loader workers decode, augment and label anchors (in the collate) while the model trains.
    recipe, data = plan.recipe, plan.data
    val_indices = range(rank, len(data.val), world_size)  # each rank predicts every world_size-th image
    # Each loader worker process holds its own copy of a dataset, and so of its cache.
    processes = local_world_size * max(1, place.loader_workers)
    cache_train, cache_val = cache_plan(data.train, data.val, val_indices, data.cache_bytes_per_node, processes)
    train_set = CocoDetection(data.train, plan.spec.image_size, train=True, seed=recipe.seed,
                              scale_jitter=recipe.scale_jitter, cache=cache_train)
    val_set = CocoDetection(data.val, plan.spec.image_size, train=False, cache=cache_val)
    # Loaders draw their workers' base seed from a generator of their own: drawn from the global one, it
    # would shift the training RNG (drop path) by when each loader happened to start, and a resumed run
    # would no longer repeat an uninterrupted one.
    workers = {"num_workers": place.loader_workers, "persistent_workers": place.loader_workers > 0,
               "pin_memory": place.pin_memory}
    generators = [torch.Generator().manual_seed(recipe.seed + rank) for _ in range(2)]
    sampler = EpochSampler(_train_sampler(train_set, recipe, rank, world_size))
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=recipe.batch_size, sampler=sampler, drop_last=True,
        collate_fn=Collate(labeler(plan.spec, model), mixup_prob=recipe.mixup_prob, mixup_alpha=recipe.mixup_alpha,
                           seed=recipe.seed, max_boxes=plan.data.train.most_trainable_boxes()),
        generator=generators[0], **workers)
    val_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(val_set, val_indices), batch_size=recipe.batch_size,
                                             collate_fn=Collate(), generator=generators[1], **workers)
    return train_set, val_set, sampler, train_loader, val_loader


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


class _StepContext:
    """Turns an out-of-memory error into a message naming the batch size and resolution that caused it."""

    def __init__(self, spec: ModelSpec, recipe: TrainConfig, device: torch.device, amp_dtype):
        self.spec, self.recipe, self.device, self.amp_dtype = spec, recipe, device, amp_dtype

    @contextlib.contextmanager
    def __call__(self, epoch: int, step):
        try:
            yield
        except torch.OutOfMemoryError as err:
            where = f"epoch {epoch} step {step}" if isinstance(step, int) else f"{step} after epoch {epoch}"
            precision = {None: "float32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]
            raise OutOfMemory(
                f"out of {self.device.type.upper()} memory at {where}: batch size {self.recipe.batch_size} per "
                f"worker at resolution {self.spec.image_size}x{self.spec.image_size} ({precision}) does not fit; "
                f"lower train.batch_size or the search space's image size ({str(err).splitlines()[0]})") from None


def _reset_peak_memory(device: torch.device) -> None:
    """Start this run's memory peak afresh: Tune runs trial after trial in one process (reuse_actors), and a peak
    kept from the process's start gave a small trial the largest earlier trial's figure."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux (4.0 on): "5" resets the process's RSS high-water mark (VmHWM) to its current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # elsewhere the CPU figure stays the process's peak


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class _SingleProcessSampler(torch.utils.data.RandomSampler):
    """A seeded RandomSampler with DistributedSampler's set_epoch, so one code path serves both."""

    def __init__(self, dataset, seed: int):
        super().__init__(dataset, generator=torch.Generator())
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + epoch)


def _train_sampler(dataset, recipe: TrainConfig, rank: int, world_size: int):
    if world_size == 1:
        return _SingleProcessSampler(dataset, recipe.seed)
    return torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                               seed=recipe.seed, drop_last=True)


def _shard_overlap(indices: list[int], world_size: int) -> int:
    """How many sample indices more than one rank will train on this epoch (0 when the shards are disjoint)."""
    if world_size == 1:
        return 0
    shards: list = [None] * world_size
    dist.all_gather_object(shards, indices)
    everyone = [index for shard in shards for index in shard]
    return len(everyone) - len(set(everyone))


def ddp_options(spec: ModelSpec) -> dict:
    """DistributedDataParallel's options for spec's training bench. The center head reads one level of the neck,
    so the last neck cell's nodes for the other levels get no gradient; DDP must then look for unused parameters
    every step, or its second step fails ("Expected to have finished reduction in the prior iteration"). The
    anchor heads read every level, and skip that search."""
    return {"find_unused_parameters": True} if spec.head == "center" else {}


def train_worker(config: dict) -> None:
    """Ray Train's train_loop_per_worker: config["plan"] is the trial's TrialPlan (and config["before_report"], if
    given, sees each report first); reports and resumes through ray.train."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    # What the caller does with a report before Train takes it (the search adds its model folder to the last).
    before_report = config.get("before_report", lambda metrics, checkpoint_dir: None)

    def report(metrics: dict, checkpoint_dir: Optional[str]) -> None:
        before_report(metrics, checkpoint_dir)
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    # After a worker failure (or a restarted trial) Ray Train hands back the last reported checkpoint.
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as resume_from:
        fit(config["plan"], report, rank=context.get_world_rank(), world_size=context.get_world_size(),
            local_world_size=context.get_local_world_size(), device=ray.train.torch.get_device(),
            prepare_model=functools.partial(ray.train.torch.prepare_model,
                                            parallel_strategy_kwargs=ddp_options(config["plan"].spec)),
            resume_from=resume_from)
