"""The per-worker loop: one function that Ray Train runs on each worker, usable without Ray too."""
from __future__ import annotations

import contextlib
import math
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3

from trainers.checkpoint import load_checkpoint, save_checkpoint
from trainers.cost import latency_ms, model_cost
from trainers.data import CocoDetection, Collate, EpochSampler, to_model_input
from trainers.evaluate import CocoEvaluator
from trainers.model import anchor_labeler, build_model, predict_bench, train_bench
from trainers.recipe import TrainConfig, autocast_dtype, build_optimizer, build_schedule, loader_workers
from trainers.spec import ModelSpec
from trainers.syncbn import convert_sync_batchnorm
from trainers.typed import from_mapping
from trainers.validate import check_same_categories

# report(metrics, checkpoint_dir or None)
Report = Callable[[dict, Optional[str]], None]


@dataclass(frozen=True)
class DataPaths:
    train_annotations: str
    train_images: str
    val_annotations: str
    val_images: str
    # Set by a caller that has already opened every image (the search does, once, before any trial), so
    # that each trial and each worker does not open them all again.
    images_checked: bool = False


class NonFiniteLoss(RuntimeError):
    pass


class OutOfMemory(RuntimeError):
    pass


def fit(spec: ModelSpec, data: DataPaths, recipe: TrainConfig, report: Report, *, rank: int = 0,
        world_size: int = 1, device: torch.device | str = "cpu", prepare_model=lambda m: m,
        resume_from: str | None = None) -> dict:
    """Train `spec` on `data`, evaluate with COCOeval, call `report` once per epoch; returns the last metrics.

    Every epoch rank 0 reports a checkpoint directory; `resume_from` continues from one, at the next epoch,
    with the optimizer, schedule, loss scaler, EMA and random state it held. With world_size > 1 the caller
    has set up torch.distributed (Ray Train does): each rank trains on its own shard, BatchNorm is
    synchronised unless recipe.sync_bn is off, and rank 0 scores the detections gathered from every rank.
    `prepare_model` wraps the training bench for data parallelism (DDP).
    """
    torch.manual_seed(recipe.seed)
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    device = torch.device(device)
    cost = model_cost(spec)
    # Both splits are validated, images included unless already checked, before the first step.
    check_images = not data.images_checked
    train_set = CocoDetection(data.train_annotations, data.train_images, spec.image_size, train=True,
                              seed=recipe.seed, scale_jitter=recipe.scale_jitter, check_images=check_images)
    val_set = CocoDetection(data.val_annotations, data.val_images, spec.image_size, train=False,
                            check_images=check_images)
    check_same_categories(train_set.report, val_set.report)

    model = build_model(spec).to(device)
    if world_size > 1 and recipe.sync_bn:
        model = convert_sync_batchnorm(model, device)
    channels_last = recipe.channels_last and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = ModelEmaV3(model, decay=recipe.ema_decay, use_warmup=True) if recipe.ema else None
    state = load_checkpoint(resume_from, model=model, ema_model=ema and ema.module) if resume_from else None
    sampler, train_loader, val_loader = _loaders(train_set, val_set, model, recipe, rank, world_size, device)
    bench = prepare_model(train_bench(model, labels_in_batch=True))
    optimizer = build_optimizer(model, recipe, world_size)
    schedule = build_schedule(optimizer, recipe, len(train_loader))
    amp_dtype = autocast_dtype(recipe, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    evaluator = CocoEvaluator(val_set.coco, val_set.labels)
    predictors = {"raw": predict_bench(model), **({"ema": predict_bench(ema.module)} if ema else {})}

    first_epoch, accuracy, deploy, resumed = 1, {}, "raw", {}
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        first_epoch, accuracy, deploy = state["epoch"] + 1, state["accuracy"], state["deploy"]
        resumed = {"resumed_from_epoch": state["epoch"]}
    step_context = _StepContext(spec, recipe, device, amp_dtype)
    metrics: dict = {}
    for epoch in range(first_epoch, recipe.epochs + 1):
        sampler.set_epoch(epoch)
        shard_overlap = _shard_overlap(list(sampler.sampler), world_size)
        bench.train()
        start, seen, loss_sum, step = time.perf_counter(), 0, 0.0, 0
        for step, (images, targets) in enumerate(train_loader, 1):
            with step_context(epoch, step):
                images = to_model_input(images, device, channels_last)
                targets = {k: v.to(device, non_blocking=True) for k, v in targets.items()}
                with _autocast(device, amp_dtype):
                    loss = bench(images, targets)["loss"]
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise NonFiniteLoss(f"loss became non-finite at epoch {epoch} step {step}")
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
            loss_sum += loss_value
        epoch_s = time.perf_counter() - start
        last = epoch == recipe.epochs
        if last or epoch % recipe.eval_every == 0:
            with step_context(epoch, "evaluation"):
                accuracy, deploy = _evaluate_all(predictors, val_loader, evaluator, device, rank, world_size,
                                                 channels_last)
        metrics = {
            "epoch": epoch, "loss": loss_sum / max(1, step), "epoch_s": epoch_s,
            "images_per_s": seen * world_size / epoch_s, "gflops": cost.gflops, "params_m": cost.params_m,
            "lr": schedule.get_last_lr()[0], "dropped_boxes": train_set.dropped_boxes + val_set.dropped_boxes,
            "world_size": world_size, "train_images": seen * world_size, "shard_overlap": shard_overlap,
            "peak_memory_mb": _peak_memory_mb(device), **accuracy, **resumed,
        }
        if last and rank == 0:
            deployed = ema.module if deploy == "ema" and ema is not None else model
            metrics["latency_ms"] = latency_ms(deployed, spec.image_size, device=str(device))
            metrics["latency_device"] = _device_name(device)
            metrics["full_budget"] = 1  # the trial ran every epoch it was given: eligible for the frontier
        if rank != 0:
            report(metrics, None)
            continue
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(folder, spec=spec, model=model, ema_model=ema and ema.module, deploy=deploy, state={
                "epoch": epoch, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict(), "accuracy": accuracy, "deploy": deploy})
            report(metrics, folder)
    return metrics


def _loaders(train_set, val_set, model, recipe: TrainConfig, rank: int, world_size: int, device: torch.device):
    # Loader workers decode, augment and label anchors (in the collate) while the model trains.
    count = loader_workers(recipe, device)
    workers = {"num_workers": count, "persistent_workers": count > 0, "pin_memory": device.type == "cuda"}
    sampler = EpochSampler(_train_sampler(train_set, recipe, rank, world_size))
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=recipe.batch_size, sampler=sampler, drop_last=True,
        collate_fn=Collate(anchor_labeler(model)), **workers)
    # Each rank predicts every world_size-th validation image; rank 0 scores them all.
    val_shard = torch.utils.data.Subset(val_set, range(rank, len(val_set), world_size))
    val_loader = torch.utils.data.DataLoader(val_shard, batch_size=recipe.batch_size, collate_fn=Collate(),
                                             **workers)
    return sampler, train_loader, val_loader


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


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB: the process's RSS peak


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


def _evaluate_all(predictors: dict, loader, evaluator: CocoEvaluator, device, rank: int, world_size: int,
                  channels_last: bool):
    """Score every set of weights (raw, EMA); the better one's scores become the trial's, and it is deployed."""
    scores = {name: _evaluate(predictor, loader, evaluator, device, rank, world_size, channels_last)
              for name, predictor in predictors.items()}
    if rank != 0:
        return {}, "raw"
    best = max(scores, key=lambda name: (scores[name]["map"], name == "ema"))  # a tie goes to the EMA
    return {**scores[best], **{f"map_{name}": s["map"] for name, s in scores.items()}}, best


def _evaluate(predictor, loader, evaluator: CocoEvaluator, device, rank: int, world_size: int,
              channels_last: bool) -> dict:
    predictor.eval()
    image_ids, detections = [], []
    with torch.inference_mode():
        for images, targets in loader:
            info = {"img_scale": targets["img_scale"].to(device), "img_size": targets["img_size"].to(device)}
            image_ids.append(targets["image_id"].numpy())
            detections.append(predictor(to_model_input(images, device, channels_last), info).cpu().numpy())
    if world_size > 1:
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, (image_ids, detections))
        image_ids = [ids for part in gathered for ids in part[0]]
        detections = [dets for part in gathered for dets in part[1]]
    if rank != 0:
        return {}
    evaluator.reset()
    for ids, dets in zip(image_ids, detections):
        evaluator.process(ids, dets)
    scores = evaluator.evaluate()
    scores["eval_images"] = len(set(evaluator.image_ids))
    return scores


def train_worker(config: dict) -> None:
    """Ray Train's train_loop_per_worker: unpacks the plain-dict config, reports and resumes through ray.train."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()

    def report(metrics: dict, checkpoint_dir: Optional[str]) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    # After a worker failure (or a restarted trial) Ray Train hands back the last reported checkpoint.
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as resume_from:
        fit(
            ModelSpec.from_dict(config["spec"]), DataPaths(**config["data"]),
            from_mapping(TrainConfig, config["train"], "train"), report,
            rank=context.get_world_rank(), world_size=context.get_world_size(),
            device=ray.train.torch.get_device(), prepare_model=ray.train.torch.prepare_model,
            resume_from=resume_from,
        )
