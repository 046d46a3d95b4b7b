"""COCO-format detection data on pycocotools, and the one boundary between COCO boxes and effdet's convention.

effdet takes boxes as y1,x1,y2,x2 in model-input pixels with 1-based classes, padded with -1, and returns
detections as x1,y1,x2,y2,score,class. COCO stores x,y,w,h with arbitrary category ids. The conversions
below are the only place either convention is translated.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainers.validate import DataError, DataReport, load_coco, validate_coco

MAX_BOXES = 100  # per image; effdet pads targets to a fixed count
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255


@dataclass(frozen=True)
class LabelMap:
    """COCO category ids (possibly gapped) <-> effdet's contiguous 1-based class labels."""

    category_ids: tuple[int, ...]

    def to_label(self, category_id: int) -> int:
        return self.category_ids.index(category_id) + 1

    def to_category(self, label: int) -> int:
        return self.category_ids[label - 1]

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)


def coco_to_effdet_boxes(xywh: np.ndarray, scale: float) -> np.ndarray:
    """COCO x,y,w,h in original pixels -> effdet y1,x1,y2,x2 in model-input pixels."""
    x, y, w, h = (xywh[:, i] for i in range(4))
    return np.stack([y, x, y + h, x + w], axis=1).astype(np.float32) * scale


def effdet_detections_to_coco(detections: np.ndarray, image_id: int, labels: LabelMap) -> list[dict]:
    """effdet rows x1,y1,x2,y2,score,class (already in original pixels) -> COCO result dicts."""
    results = []
    for x1, y1, x2, y2, score, cls in detections:
        if score <= 0:  # effdet pads with all-zero rows
            continue
        results.append({
            "image_id": int(image_id), "category_id": labels.to_category(int(cls)),
            "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "score": float(score),
        })
    return results


class CocoDetection(torch.utils.data.Dataset):
    """Images resized (longest side) and padded to a square model input, with effdet-convention targets."""

    def __init__(self, annotation_file, image_dir, image_size: int, *, train: bool, seed: int = 0,
                 check_images: bool = False):
        self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir)
        self.image_size = image_size
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.coco = load_coco(self.annotation_file)
        # Fatal problems raise here, before any training; degenerate boxes are listed in the report.
        self.report: DataReport = validate_coco(self.coco, self.annotation_file, self.image_dir,
                                                check_images=check_images)
        self.labels = LabelMap(tuple(sorted(c["id"] for c in self.coco.dataset["categories"])))
        self.image_ids = sorted(self.coco.imgs)
        self._targets = {i: self._boxes_for(i) for i in self.image_ids}
        self._cache: dict[int, np.ndarray] = {}

    @property
    def dropped_boxes(self) -> int:
        return len(self.report.degenerate_ids)

    def _boxes_for(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        boxes, labels = [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            x, y, w, h = ann["bbox"]
            # Crowd regions are not trained on (COCOeval treats them as ignore regions); degenerate boxes
            # were counted by validation and are dropped.
            if ann.get("iscrowd", 0) or w <= 1 or h <= 1:
                continue
            boxes.append([x, y, w, h])
            labels.append(self.labels.to_label(ann["category_id"]))
        return np.array(boxes, dtype=np.float32).reshape(-1, 4), np.array(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.image_ids)

    def _image(self, image_id: int) -> np.ndarray:
        # Decoded images are kept: a few hundred small images fit in memory and decoding dominates CPU epochs.
        if image_id not in self._cache:
            path = self.image_dir / self.coco.imgs[image_id]["file_name"]
            try:
                with Image.open(path) as img:
                    self._cache[image_id] = np.asarray(img.convert("RGB"))
            except (FileNotFoundError, OSError) as err:
                raise DataError(f"{path}: cannot read image id {image_id}: {err}") from None
        return self._cache[image_id]

    def __getitem__(self, index: int):
        image_id = self.image_ids[index]
        pixels = self._image(image_id)
        height, width = pixels.shape[:2]
        scale = self.image_size / max(height, width)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        resized = np.asarray(Image.fromarray(pixels).resize((new_w, new_h), Image.BILINEAR), dtype=np.float32)
        canvas = np.zeros((self.image_size, self.image_size, 3), dtype=np.float32)
        canvas[:new_h, :new_w] = (resized - IMAGENET_MEAN) / IMAGENET_STD  # pad value 0 == the mean colour
        xywh, labels = self._targets[image_id]
        boxes = coco_to_effdet_boxes(xywh, scale)
        if self.train and self._flip(index):
            canvas[:, :new_w] = canvas[:, :new_w][:, ::-1]
            boxes[:, [1, 3]] = new_w - boxes[:, [3, 1]]
        bbox = np.full((MAX_BOXES, 4), -1, dtype=np.float32)
        cls = np.full((MAX_BOXES,), -1, dtype=np.int64)
        n = min(len(boxes), MAX_BOXES)
        bbox[:n], cls[:n] = boxes[:n], labels[:n]
        target = {
            "bbox": torch.from_numpy(bbox), "cls": torch.from_numpy(cls),
            "img_scale": torch.tensor(1.0 / scale, dtype=torch.float32),
            "img_size": torch.tensor([width, height], dtype=torch.float32),  # effdet clips with (w, h)
            "image_id": torch.tensor(image_id),
        }
        return torch.from_numpy(canvas).permute(2, 0, 1).contiguous(), target

    def _flip(self, index: int) -> bool:
        # Deterministic per (seed, epoch, index), so a resumed or repeated run sees the same augmentation.
        return bool(np.random.default_rng((self.seed, self.epoch, index)).random() < 0.5)


def collate(batch):
    images = torch.stack([image for image, _ in batch])
    targets = {key: torch.stack([t[key] for _, t in batch]) for key in batch[0][1]}
    return images, targets
