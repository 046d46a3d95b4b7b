"""The per-worker training loop: one function that Ray Train runs on each worker, usable without Ray too."""
from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from trainers.cost import latency_ms, model_cost
from trainers.data import CocoDetection, collate
from trainers.evaluate import CocoEvaluator
from trainers.model import build_model, predict_bench, train_bench
from trainers.recipe import TrainConfig, build_optimizer, build_schedule
from trainers.spec import ModelSpec
from trainers.syncbn import convert_sync_batchnorm
from trainers.validate import check_same_categories

WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "spec.json"

# report(metrics, checkpoint_dir or None)
Report = Callable[[dict, Optional[str]], None]


@dataclass(frozen=True)
class DataPaths:
    train_annotations: str
    train_images: str
    val_annotations: str
    val_images: str


class NonFiniteLoss(RuntimeError):
    pass


def fit(spec: ModelSpec, data: DataPaths, recipe: TrainConfig, report: Report, *, rank: int = 0,
        world_size: int = 1, device: torch.device | str = "cpu", prepare_model=lambda m: m) -> dict:
    """Train `spec` on `data`, evaluate with COCOeval, call `report` once per epoch; returns the last metrics.

    With world_size > 1 the caller has set up torch.distributed (Ray Train does): each rank trains on its
    own shard, BatchNorm is synchronised unless recipe.sync_bn is off, and rank 0 evaluates the detections
    gathered from every rank. `prepare_model` wraps the training bench for data parallelism (DDP).
    """
    torch.manual_seed(recipe.seed)
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    device = torch.device(device)
    cost = model_cost(spec)
    # Both splits are validated, images included, before the first step.
    train_set = CocoDetection(data.train_annotations, data.train_images, spec.image_size, train=True,
                              seed=recipe.seed, check_images=True)
    val_set = CocoDetection(data.val_annotations, data.val_images, spec.image_size, train=False, check_images=True)
    check_same_categories(train_set.report, val_set.report)
    sampler = _train_sampler(train_set, recipe, rank, world_size)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=recipe.batch_size, sampler=sampler,
                                               drop_last=True, collate_fn=collate)
    # Each rank predicts every world_size-th validation image; rank 0 scores them all.
    val_shard = torch.utils.data.Subset(val_set, range(rank, len(val_set), world_size))
    val_loader = torch.utils.data.DataLoader(val_shard, batch_size=recipe.batch_size, collate_fn=collate)

    model = build_model(spec).to(device)
    if world_size > 1 and recipe.sync_bn:
        model = convert_sync_batchnorm(model, device)
    bench = prepare_model(train_bench(model))
    predictor = predict_bench(model)
    optimizer = build_optimizer(model, recipe)
    schedule = build_schedule(optimizer, recipe, len(train_loader))
    evaluator = CocoEvaluator(val_set.coco, val_set.labels)
    metrics: dict = {}
    accuracy: dict = {}
    for epoch in range(1, recipe.epochs + 1):
        train_set.epoch = epoch
        sampler.set_epoch(epoch)
        shard_overlap = _shard_overlap(list(sampler), world_size)
        bench.train()
        start, seen, loss_sum, step = time.perf_counter(), 0, 0.0, 0
        for step, (images, targets) in enumerate(train_loader, 1):
            images, targets = images.to(device), {k: v.to(device) for k, v in targets.items()}
            loss = bench(images, targets)["loss"]
            if not math.isfinite(loss.item()):
                raise NonFiniteLoss(f"loss became non-finite at epoch {epoch} step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            schedule.step()
            seen += images.shape[0]
            loss_sum += loss.item()
        epoch_s = time.perf_counter() - start
        last = epoch == recipe.epochs
        if last or epoch % recipe.eval_every == 0:
            accuracy = _evaluate(predictor, val_loader, evaluator, device, rank, world_size)
        metrics = {
            "epoch": epoch, "loss": loss_sum / max(1, step), "epoch_s": epoch_s,
            "images_per_s": seen * world_size / epoch_s, "gflops": cost.gflops, "params_m": cost.params_m,
            "lr": schedule.get_last_lr()[0], "dropped_boxes": train_set.dropped_boxes + val_set.dropped_boxes,
            "world_size": world_size, "train_images": seen * world_size, "shard_overlap": shard_overlap,
            **accuracy,
        }
        metrics["peak_memory_mb"] = _peak_memory_mb(device)
        if last and rank == 0:
            metrics["latency_ms"] = latency_ms(model, spec.image_size, device=str(device))
            metrics["latency_device"] = _device_name(device)
            metrics["full_budget"] = 1  # the trial ran every epoch it was given: eligible for the frontier
            with tempfile.TemporaryDirectory() as folder:
                save_model(model, spec, folder)
                report(metrics, folder)
        else:
            report(metrics, None)
    return metrics


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


def _evaluate(predictor, loader, evaluator: CocoEvaluator, device, rank: int, world_size: int) -> dict:
    predictor.eval()
    image_ids, detections = [], []
    with torch.inference_mode():
        for images, targets in loader:
            info = {"img_scale": targets["img_scale"].to(device), "img_size": targets["img_size"].to(device)}
            image_ids.append(targets["image_id"].numpy())
            detections.append(predictor(images.to(device), info).cpu().numpy())
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


def save_model(model: torch.nn.Module, spec: ModelSpec, folder: str | Path) -> None:
    folder = Path(folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_FILE))
    (folder / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=2))


def load_model(folder: str | Path) -> tuple[torch.nn.Module, ModelSpec]:
    """Rebuild a saved model: weights are safetensors, so loading runs no pickled code."""
    from safetensors.torch import load_file

    folder = Path(folder)
    spec = ModelSpec.from_dict(json.loads((folder / SPEC_FILE).read_text()), where=str(folder / SPEC_FILE))
    model = build_model(spec)
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return model.eval(), spec


def train_worker(config: dict) -> None:
    """Ray Train's train_loop_per_worker: unpacks the plain-dict config and reports through ray.train."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()

    def report(metrics: dict, checkpoint_dir: Optional[str]) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    fit(
        ModelSpec.from_dict(config["spec"]), DataPaths(**config["data"]), TrainConfig(**config["train"]), report,
        rank=context.get_world_rank(), world_size=context.get_world_size(), device=ray.train.torch.get_device(),
        prepare_model=ray.train.torch.prepare_model,
    )
