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
from safetensors.torch import save_file

from trainers.cost import latency_ms, model_cost
from trainers.data import CocoDetection, collate
from trainers.evaluate import CocoEvaluator
from trainers.model import build_model, predict_bench, train_bench
from trainers.recipe import TrainConfig, build_optimizer, build_schedule
from trainers.spec import ModelSpec

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
        world_size: int = 1, prepare_model=lambda m: m, prepare_loader=lambda d: d) -> dict:
    """Train `spec` on `data`, evaluate with COCOeval, call `report` once per epoch; returns the last metrics."""
    torch.manual_seed(recipe.seed)
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    cost = model_cost(spec)
    train_set = CocoDetection(data.train_annotations, data.train_images, spec.image_size, train=True, seed=recipe.seed)
    val_set = CocoDetection(data.val_annotations, data.val_images, spec.image_size, train=False)
    train_loader = prepare_loader(torch.utils.data.DataLoader(
        train_set, batch_size=recipe.batch_size, shuffle=True, drop_last=True, collate_fn=collate,
        generator=torch.Generator().manual_seed(recipe.seed)))
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=recipe.batch_size, collate_fn=collate)

    model = build_model(spec)
    bench = prepare_model(train_bench(model))
    predictor = predict_bench(model)
    optimizer = build_optimizer(model, recipe)
    schedule = build_schedule(optimizer, recipe, len(train_loader))
    evaluator = CocoEvaluator(val_set.coco, val_set.labels)
    metrics: dict = {}
    accuracy: dict = {}
    for epoch in range(1, recipe.epochs + 1):
        train_set.epoch = epoch
        if hasattr(train_loader, "sampler") and hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        bench.train()
        start, seen, loss_sum = time.perf_counter(), 0, 0.0
        for step, (images, targets) in enumerate(train_loader, 1):
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
        if rank == 0 and (last or epoch % recipe.eval_every == 0):
            accuracy = _evaluate(predictor, val_loader, evaluator)
        metrics = {
            "epoch": epoch, "loss": loss_sum / max(1, step), "epoch_s": epoch_s,
            "images_per_s": seen * world_size / epoch_s, "gflops": cost.gflops, "params_m": cost.params_m,
            "lr": schedule.get_last_lr()[0], **accuracy,
        }
        if last and rank == 0:
            metrics["latency_ms"] = latency_ms(model, spec.image_size)
            metrics["full_budget"] = 1  # the trial ran every epoch it was given: eligible for the frontier
            with tempfile.TemporaryDirectory() as folder:
                save_model(model, spec, folder)
                report(metrics, folder)
        else:
            report(metrics, None)
    return metrics


def _evaluate(predictor, loader, evaluator: CocoEvaluator) -> dict:
    predictor.eval()
    evaluator.reset()
    with torch.inference_mode():
        for images, targets in loader:
            detections = predictor(images, {"img_scale": targets["img_scale"], "img_size": targets["img_size"]})
            evaluator.process(targets["image_id"], detections.cpu().numpy())
    return evaluator.evaluate()


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
        rank=context.get_world_rank(), world_size=context.get_world_size(),
        prepare_model=ray.train.torch.prepare_model, prepare_loader=ray.train.torch.prepare_data_loader,
    )
