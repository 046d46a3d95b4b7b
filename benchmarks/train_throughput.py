"""Trainer images/s against an independent ceiling, paired epoch by epoch: median ratio, bootstrap 90% interval.

Both sides train the same network (the CPU space's default variant: EfficientDet-Lite phi=1, 192 px, BiFPN
48x2) at batch 16 on 2 intra-op threads, in one process.

- trainer: `trainers.loop.fit` as a trial runs it, timed from one epoch's report to the next, so loading,
  augmentation, anchor labelling, normalisation, the EMA update, the checkpoint and the report are all in.
- ceiling: the pure arithmetic of one training step, written here from effdet, timm and torch alone (only
  the network comes from `trainers.model.build_model`, so that both sides train the identical model).
  Images are read, resized and normalised once; targets are labelled once by effdet's own `AnchorLabeler`.
  Each step is effdet's `DetBenchTrain` forward and loss, backward, `clip_grad_norm_(10.0)`, a
  `torch.optim.AdamW` step and a `timm.utils.ModelEmaV3` update. The loss is read once, at the end of each
  timed stretch, not every step.

The machine is shared, so the two are interleaved: after each trainer epoch, the ceiling runs the same
number of steps in the same process, and the two form a pair measured under nearly the same conditions.
Epoch 1 (which fills the decoded-image cache) and the last epoch (which also evaluates) are not compared.

Estimator, fixed before any result of this version was seen: the headline is the median of the paired
per-epoch ratios (trainer images/s / ceiling images/s of the same pair), with a 90% interval from a
bootstrap over the pairs (10,000 resamples with replacement, seed 0; the 5th and 95th percentiles of the
resampled medians). The previous headline, each side's fastest 3 epochs picked independently, was chosen
after its results were seen and is retired.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from effdet import DetBenchTrain  # noqa: E402
from effdet.anchors import AnchorLabeler, Anchors  # noqa: E402
from PIL import Image  # noqa: E402
from timm.utils import ModelEmaV3  # noqa: E402

from spaces.search_spaces import lite_cpu_reference  # noqa: E402
from trainers.model import build_model  # noqa: E402
from trainers.recipe import TrainConfig  # noqa: E402
from trainers.shapes import make_shapes  # noqa: E402
from trainers.spec import ModelSpec  # noqa: E402


@dataclass(frozen=True)
class DatasetPaths:
    """The synthetic dataset's files, in the benchmark's own terms: the ceiling reads them directly."""

    train_annotations: str
    train_images: str
    val_annotations: str
    val_images: str


def _run_trainer(spec: ModelSpec, data_paths: DatasetPaths, recipe: TrainConfig, report) -> None:
    """The benchmark's only contact with fit's API: when that changes, only this function follows it."""
    from trainers.loop import TrialPlan, fit
    from trainers.validate import load_training_data

    data, _reports = load_training_data(data_paths.train_annotations, data_paths.train_images,
                                        data_paths.val_annotations, data_paths.val_images)
    fit(TrialPlan(spec=spec, data=data, recipe=recipe), report)


THREADS = 2
BATCH = 16
# Short epochs (10 steps) interleave the two finely: on a shared machine, slow spells last seconds. Each
# trainer epoch also pays its checkpoint and report, which a longer epoch would spread over more steps.
TRAIN_IMAGES = 160
STEPS_PER_EPOCH = TRAIN_IMAGES // BATCH
EPOCHS = 32  # epoch 1 fills the decoded-image cache and the last also evaluates: epochs 2..31 are compared

# The ceiling's step, in the recipe's terms (the trainer's defaults), but written out here.
LEARNING_RATE = 1e-2
WEIGHT_DECAY = 1e-4
CLIP_GRAD_NORM = 10.0
EMA_DECAY = 0.9998
MATCH_THRESHOLD = 0.5
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


# ---- The ceiling: effdet, timm and torch only ----------------------------------------------------------------

def prepare_image(path: Path, size: int) -> torch.Tensor:
    """An image as the network takes it: a plain resize to size x size, normalised float CHW."""
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32)
    return (torch.from_numpy(pixels).permute(2, 0, 1) / 255 - IMAGENET_MEAN) / IMAGENET_STD


def effdet_targets(annotations: list[dict], scale_x: float, scale_y: float, label_of: dict[int, int]):
    """COCO x,y,w,h boxes -> effdet's y1,x1,y2,x2 in resized pixels, with 1-based contiguous classes."""
    boxes, classes = [], []
    for ann in annotations:
        if ann.get("iscrowd", 0):
            continue
        x, y, w, h = ann["bbox"]
        boxes.append([y * scale_y, x * scale_x, (y + h) * scale_y, (x + w) * scale_x])
        classes.append(label_of[ann["category_id"]])
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(classes, dtype=torch.float32)


def label_batch(labeler: AnchorLabeler, boxes: list[torch.Tensor], classes: list[torch.Tensor]) -> dict:
    """effdet's own labelling, in the keys DetBenchTrain reads when it was built without a labeler."""
    cls_targets, box_targets, num_positives = labeler.batch_label_anchors(boxes, classes)
    targets = {"label_num_positives": num_positives}
    for level, (cls_level, box_level) in enumerate(zip(cls_targets, box_targets)):
        targets[f"label_cls_{level}"] = cls_level
        targets[f"label_bbox_{level}"] = box_level
    return targets


def prepare_batches(annotation_file: str, image_dir: str, model) -> list[tuple[torch.Tensor, dict]]:
    """Every training image, resized, normalised and labelled once, in batches of BATCH."""
    coco = json.loads(Path(annotation_file).read_text())
    label_of = {cat_id: label for label, cat_id in enumerate(sorted(c["id"] for c in coco["categories"]), 1)}
    annotations_of: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        annotations_of.setdefault(ann["image_id"], []).append(ann)
    size = model.config.image_size[0]
    labeler = AnchorLabeler(Anchors.from_config(model.config), model.config.num_classes,
                            match_threshold=MATCH_THRESHOLD)
    records = sorted(coco["images"], key=lambda record: record["id"])
    batches = []
    for start in range(0, len(records) - BATCH + 1, BATCH):
        images, boxes, classes = [], [], []
        for record in records[start:start + BATCH]:
            images.append(prepare_image(Path(image_dir) / record["file_name"], size))
            image_boxes, image_classes = effdet_targets(annotations_of.get(record["id"], []),
                                                        size / record["width"], size / record["height"], label_of)
            boxes.append(image_boxes)
            classes.append(image_classes)
        batches.append((torch.stack(images), label_batch(labeler, boxes, classes)))
    return batches


def adamw_without_decay_on_norms_and_biases(model: torch.nn.Module) -> torch.optim.AdamW:
    # Decaying norm weights and biases only fights the normalisation, so they form their own group.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                              {"params": no_decay, "weight_decay": 0.0}], lr=LEARNING_RATE)


class Ceiling:
    """One training step's arithmetic and nothing else: no loading, augmentation, labelling, checkpoint or report."""

    def __init__(self, model, batches: list[tuple[torch.Tensor, dict]]):
        self.model = model
        self.bench = DetBenchTrain(model, create_labeler=False).train()
        self.optimizer = adamw_without_decay_on_norms_and_biases(model)
        self.ema = ModelEmaV3(model, decay=EMA_DECAY, use_warmup=True)
        self.batches = batches
        self.updates = 0
        self.run(3)  # warm-up: allocator, kernel choice

    def step(self, images: torch.Tensor, targets: dict) -> torch.Tensor:
        loss = self.bench(images, targets)["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP_GRAD_NORM)
        self.optimizer.step()
        self.updates += 1
        self.ema.update(self.model, step=self.updates)
        return loss.detach()

    def run(self, steps: int) -> tuple[float, float]:
        """(images/s, last loss) over `steps` steps; the loss is read once, at the end, inside the timing."""
        start = time.perf_counter()
        for _ in range(steps):
            loss = self.step(*self.batches[self.updates % len(self.batches)])
        last_loss = loss.item()
        seconds = time.perf_counter() - start
        if not math.isfinite(last_loss):
            raise RuntimeError(f"the ceiling's loss became non-finite after {self.updates} steps")
        return steps * BATCH / seconds, last_loss


def build_ceiling(spec: ModelSpec, data: DatasetPaths) -> Ceiling:
    torch.manual_seed(0)
    model = build_model(spec)  # the network only; everything around it is effdet, timm and torch
    return Ceiling(model, prepare_batches(data.train_annotations, data.train_images, model))


# ---- The paired comparison ---------------------------------------------------------------------------------------

def compare(spec: ModelSpec, data: DatasetPaths) -> list[tuple[int, float, float, float]]:
    """Per compared epoch: (epoch, trainer images/s, ceiling images/s, ceiling loss), the ceiling run just after."""
    ceiling = build_ceiling(spec, data)
    pairs: list[tuple[int, float, float, float]] = []
    last_report_exit = time.perf_counter()

    def report(metrics, checkpoint_dir):
        nonlocal last_report_exit
        # Report to report: loading, labelling, EMA, the previous folder's clean-up and this checkpoint, all in.
        trainer = STEPS_PER_EPOCH * BATCH / (time.perf_counter() - last_report_exit)
        if 1 < metrics["epoch"] < EPOCHS:
            pairs.append((metrics["epoch"], trainer, *ceiling.run(STEPS_PER_EPOCH)))
            print_pair(*pairs[-1])  # as it is measured: a slow run on a busy machine shows its progress
        last_report_exit = time.perf_counter()

    recipe = TrainConfig(epochs=EPOCHS, batch_size=BATCH, eval_every=EPOCHS, threads=THREADS)
    last_report_exit = time.perf_counter()
    _run_trainer(spec, data, recipe, report)
    return pairs


def print_pair(epoch: int, trainer: float, ceiling: float, ceiling_loss: float) -> None:
    print(f"epoch {epoch}: trainer {trainer:.1f} images/s, ceiling {ceiling:.1f}, ratio {trainer / ceiling:.3f} "
          f"(ceiling loss {ceiling_loss:.3f})", flush=True)


def median_with_bootstrap_interval(ratios: list[float]) -> tuple[float, float, float]:
    """The median, and the 5th and 95th percentiles of the medians of pairs resampled with replacement."""
    values = np.asarray(ratios)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    resamples = values[rng.integers(0, len(values), size=(BOOTSTRAP_RESAMPLES, len(values)))]
    low, high = np.percentile(np.median(resamples, axis=1), [5, 95])
    return float(np.median(values)), float(low), float(high)


def main() -> None:
    started = time.perf_counter()
    torch.set_num_threads(THREADS)
    spec = lite_cpu_reference(3)
    print(f"variant: {spec.image_size} px, batch {BATCH}, {THREADS} threads, {os.cpu_count()} cores, "
          f"{STEPS_PER_EPOCH} steps a side in each pair", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        paths = make_shapes(Path(folder) / "shapes", train_images=TRAIN_IMAGES, val_images=20)
        data = DatasetPaths(paths["train"]["annotations"], paths["train"]["images"],
                            paths["val"]["annotations"], paths["val"]["images"])
        pairs = compare(spec, data)
    print(f"medians over {len(pairs)} pairs: trainer {statistics.median(p[1] for p in pairs):.1f} images/s, "
          f"ceiling {statistics.median(p[2] for p in pairs):.1f} images/s")
    print(f"run took {time.perf_counter() - started:.0f} s")
    ratio, low, high = median_with_bootstrap_interval([trainer / ceiling for _, trainer, ceiling, _ in pairs])
    print(f"throughput_ratio: {ratio:.3f} [{low:.3f}, {high:.3f}]")


if __name__ == "__main__":
    main()
