"""A deterministic synthetic COCO dataset of coloured shapes on textured backgrounds, for demos and tests."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Deliberately gapped ids, as in real COCO (1..90 for 80 classes), so the demo exercises the label mapping.
CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "square", "supercategory": "shape"},
    {"id": 5, "name": "triangle", "supercategory": "shape"},
]
IMAGE_SIZE = 256
MIN_OBJECT, MAX_OBJECT = 24, 96  # smaller objects barely learn at the demo's input sizes (DESIGN.md)


def make_shapes(root: str | Path, *, train_images: int = 600, val_images: int = 100, seed: int = 0) -> dict:
    """Write train/ and val/ splits (images + annotations.json) under root; returns their paths."""
    root = Path(root)
    paths = {}
    for split, count, split_seed in (("train", train_images, seed), ("val", val_images, seed + 10_000)):
        paths[split] = _write_split(root / split, count, np.random.default_rng(split_seed))
    return paths


def _write_split(folder: Path, count: int, rng: np.random.Generator) -> dict:
    image_dir = folder / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, count + 1):
        # Every 4th image is a JPEG, so both decoders are exercised.
        file_name = f"{image_id:06d}.{'jpg' if image_id % 4 == 0 else 'png'}"
        canvas = _background(rng)
        draw = ImageDraw.Draw(canvas)
        # A few images carry no objects at all, as real datasets do.
        n_objects = 0 if rng.random() < 0.05 else int(rng.integers(1, 5))
        placed: list[tuple[float, float, float, float]] = []
        for _ in range(n_objects):
            box = _free_box(rng, placed)
            if box is None:
                continue
            placed.append(box)
            category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
            _draw_shape(draw, category["name"], box, _colour(rng))
            x, y, w, h = box
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category["id"],
                "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)],
                "area": round(w * h if category["name"] == "square" else _area(category["name"], w, h), 2),
                "iscrowd": 0,
            })
        canvas.save(image_dir / file_name, quality=95) if file_name.endswith("jpg") else canvas.save(image_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": IMAGE_SIZE, "height": IMAGE_SIZE})
    ann_file = folder / "annotations.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return {"annotations": str(ann_file), "images": str(image_dir)}


def _background(rng: np.random.Generator) -> Image.Image:
    # Low-frequency colour blobs plus fine grain: enough texture that "any edge is an object" does not work.
    luminance = rng.uniform(60, 190, size=(8, 8, 1))
    tint = rng.uniform(-25, 25, size=(8, 8, 3))
    coarse = np.clip(luminance + tint, 0, 255).astype(np.uint8)
    image = Image.fromarray(coarse).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
    grain = rng.normal(0, 12, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(0.6))


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    # Saturated colours stand out from the muted background.
    channels = rng.permutation([int(rng.integers(200, 256)), int(rng.integers(0, 60)), int(rng.integers(0, 256))])
    return tuple(int(c) for c in channels)


def _free_box(rng, placed, tries: int = 20):
    for _ in range(tries):
        size = float(rng.uniform(MIN_OBJECT, MAX_OBJECT))
        aspect = float(rng.uniform(0.75, 1.33))
        w, h = size * math.sqrt(aspect), size / math.sqrt(aspect)
        w, h = min(w, IMAGE_SIZE - 2), min(h, IMAGE_SIZE - 2)
        x, y = float(rng.uniform(0, IMAGE_SIZE - w)), float(rng.uniform(0, IMAGE_SIZE - h))
        if all(_iou((x, y, w, h), other) < 0.1 for other in placed):
            return x, y, w, h
    return None


def _iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = iw * ih
    return inter / (aw * ah + bw * bh - inter)


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, box, colour) -> None:
    x, y, w, h = box
    if name == "circle":
        draw.ellipse([x, y, x + w, y + h], fill=colour)
    elif name == "square":
        draw.rectangle([x, y, x + w, y + h], fill=colour)
    else:
        draw.polygon([(x + w / 2, y), (x + w, y + h), (x, y + h)], fill=colour)


def _area(name: str, w: float, h: float) -> float:
    return math.pi * w * h / 4 if name == "circle" else w * h / 2
