"""COCO-sized data: the driver's image check time, and a 2-worker trial's memory, at 2,000 and 20,000 images.

A COCO-format set is generated the way COCO is shaped: 80 categories with COCO's own gapped ids (1..90),
about 7 boxes per image with polygon segmentations, 320x240 JPEG files. For each size the driver validates
and indexes it (trainers.validate.load_training_data, data.check: full and headers, timed), and then a real
2-worker Ray Train trial (CPU, gloo) builds its datasets and loaders exactly as a trial does
(trainers.loop.data_loaders) and loads one epoch of its shard: decode, scale jitter, flip, anchor labelling.
Each worker reports its own peak RSS (getrusage), which includes Ray's and torch's fixed cost.

Estimator, fixed before any run: per-worker peak RSS is the larger of the two workers'; the headline is that
figure at 20,000 images divided by it at 2,000, with the decoded-image cache at its default budget (2 GiB a
node). The same ratio with the cache off isolates what the annotation index itself costs.
Goal (issue 7): memory_growth_10x < 1.5.
"""
from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

SIZES = (2_000, 20_000)
IMAGE_W, IMAGE_H = 320, 240
BOXES_PER_IMAGE = 7
POLYGON_POINTS = 24  # COCO's polygons run to tens of points; pycocotools keeps every one as a Python float
# COCO's 80 category ids: 1..90 with these ten missing.
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
BATCH = 16
IMAGE_SIZE = 128


def generate(root: Path, images: int, seed: int = 0) -> dict:
    """A COCO-format split at root: small JPEGs (a few flat colours compress to ~3 KB) and dense annotations."""
    rng = random.Random(seed)
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    palette = [Image.new("RGB", (IMAGE_W, IMAGE_H), tuple(rng.randrange(256) for _ in range(3))) for _ in range(16)]
    records, annotations = [], []
    for image_id in range(1, images + 1):
        name = f"{image_id:012d}.jpg"
        palette[image_id % len(palette)].save(image_dir / name, quality=80)
        records.append({"id": image_id, "file_name": name, "width": IMAGE_W, "height": IMAGE_H})
        for _ in range(BOXES_PER_IMAGE):
            w, h = rng.uniform(8, 120), rng.uniform(8, 100)
            x, y = rng.uniform(0, IMAGE_W - w), rng.uniform(0, IMAGE_H - h)
            angles = np.linspace(0, 2 * np.pi, POLYGON_POINTS, endpoint=False)
            polygon = np.stack([x + w / 2 * (1 + np.cos(angles)), y + h / 2 * (1 + np.sin(angles))], 1)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": rng.choice(COCO_IDS), "bbox": [x, y, w, h], "area": w * h * 0.78,
                                "iscrowd": 0, "segmentation": [polygon.round(2).ravel().tolist()]})
    categories = [{"id": i, "name": f"class{i}", "supercategory": "thing"} for i in COCO_IDS]
    path = root / "annotations.json"
    path.write_text(json.dumps({"images": records, "annotations": annotations, "categories": categories}))
    return {"annotations": str(path), "images": str(image_dir)}


def load_one_epoch(config: dict) -> None:
    """A Ray Train worker: the trial's own data path for one epoch of its shard, then its peak RSS."""
    import resource

    import ray.train
    import torch

    from trainers.loop import data_loaders
    from trainers.model import build_model
    from trainers.recipe import placement

    context = ray.train.get_context()
    plan = config["plan"]
    torch.set_num_threads(1)
    place = placement(plan.recipe, torch.device("cpu"), plan.cpus_per_worker)
    train_set, _, sampler, loader, _ = data_loaders(plan, build_model(plan.spec), place, context.get_world_rank(),
                                                    context.get_world_size(), context.get_local_world_size())
    sampler.set_epoch(1)
    start, batches = time.perf_counter(), 0
    for _ in loader:
        batches += 1
    mine = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "batches": batches,
            "seconds": time.perf_counter() - start, "cached": int(train_set.caching)}
    # One node: each worker leaves its figures where the driver reads them (Train V2 returns no metrics
    # reported without a checkpoint).
    Path(config["out"], f"rank{context.get_world_rank()}.json").write_text(json.dumps(mine))


def trial_memory(data, cache_gib: float, storage: Path) -> dict:
    """Peak RSS (MB) of each of a 2-worker trial's workers after an epoch of loading."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from spaces.search_spaces import scaled_anchor
    from trainers.annotations import TrainingData
    from trainers.loop import TrialPlan
    from trainers.recipe import TrainConfig
    from trainers.spec import ModelSpec

    spec = ModelSpec(num_classes=data.train.num_classes, backbone_family="efficientnet_lite", backbone_width=0.5,
                     backbone_depth=0.5, image_size=IMAGE_SIZE, max_level=5, anchor_scale=scaled_anchor(IMAGE_SIZE),
                     fpn_channels=32, fpn_repeats=1, head_repeats=2)
    data = TrainingData(data.train, data.val, cache_bytes_per_node=int(cache_gib * 2**30))
    plan = TrialPlan(spec, data, TrainConfig(batch_size=BATCH), cpus_per_worker=1)
    out = storage / f"figures-{len(data.train)}-{cache_gib}"
    out.mkdir(parents=True)
    trainer = TorchTrainer(load_one_epoch, train_loop_config={"plan": plan, "out": str(out)},
                           scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                           run_config=ray.train.RunConfig(name=f"load-{len(data.train)}-{cache_gib}",
                                                          storage_path=str(storage)))
    trainer.fit()
    per_worker = [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]
    assert len(per_worker) == 2, per_worker
    return {"peak_rss_mb": max(m["peak_rss_mb"] for m in per_worker),
            "seconds": max(m["seconds"] for m in per_worker), "batches": per_worker[0]["batches"],
            "cached": per_worker[0]["cached"]}


def main() -> None:
    import ray

    from trainers.validate import load_training_data

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for size in SIZES:
            started = time.perf_counter()
            train = generate(folder / str(size) / "train", size)
            val = generate(folder / str(size) / "val", max(50, size // 40), seed=1)
            made = time.perf_counter() - started
            checks = {}
            for mode in ("headers", "full"):
                started = time.perf_counter()
                data, _ = load_training_data(train["annotations"], train["images"], val["annotations"],
                                             val["images"], check=mode)
                checks[mode] = time.perf_counter() - started
            json_mb = Path(train["annotations"]).stat().st_size / 2**20
            print(f"{size} images ({json_mb:.0f} MB of annotations, {len(data.train.boxes)} boxes, made in {made:.0f} s): "
                  f"driver check full {checks['full']:.1f} s, headers {checks['headers']:.1f} s", flush=True)
            for cache_gib in (2.0, 0.0):
                memory = trial_memory(data, cache_gib, folder / "ray")
                results[(size, cache_gib)] = memory["peak_rss_mb"]
                print(f"  cache {cache_gib:g} GiB/node: per-worker peak RSS {memory['peak_rss_mb']:.0f} MB "
                      f"(cache {'on' if memory['cached'] else 'off'}), {memory['batches']} batches in "
                      f"{memory['seconds']:.0f} s", flush=True)
    ray.shutdown()
    small, large = SIZES
    print(f"growth with the cache off (the index alone): {results[(large, 0.0)] / results[(small, 0.0)]:.2f}x")
    print(f"memory_growth_10x: {results[(large, 2.0)] / results[(small, 2.0)]:.2f}")


if __name__ == "__main__":
    main()
