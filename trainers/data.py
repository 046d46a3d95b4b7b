"""COCO-format detection data on pycocotools, and the one boundary between COCO boxes and effdet's convention.

effdet takes boxes as y1,x1,y2,x2 in model-input pixels with 1-based classes, padded with -1, and returns
detections as x1,y1,x2,y2,score,class. COCO stores x,y,w,h with arbitrary category ids. The conversions
below are the only place either convention is translated.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from effdet.data.loader import DetectionFastCollate
from effdet.data.transforms import RandomFlip, RandomResizePad, ResizePad
from PIL import Image

from trainers.anchors import BatchAnchorLabeler
from trainers.validate import DataError, DataReport, load_coco, validate_coco

MAX_BOXES = 100  # per image; effdet pads targets to a fixed count
IMAGENET_MEAN = tuple(255 * x for x in (0.485, 0.456, 0.406))
IMAGENET_STD = tuple(255 * x for x in (0.229, 0.224, 0.225))
FILL_COLOR = tuple(round(x) for x in IMAGENET_MEAN)  # padding becomes ~0 after normalisation
DEFAULT_CACHE_BYTES = 2 * 2**30  # decoded images kept per dataset (and per loader worker)


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
    """COCO images through effdet's resize-pad transforms, as uint8 pixels with effdet-convention targets.

    Training items are keyed (epoch, index) by EpochSampler, so the scale jitter and flip of an item depend
    only on (seed, epoch, index): a resumed run, or a loader worker that outlives an epoch, sees the same
    augmentation as an uninterrupted run.
    """

    def __init__(self, annotation_file, image_dir, image_size: int, *, train: bool, seed: int = 0,
                 scale_jitter: tuple[float, float] = (1.0, 1.0), check_images: bool = False,
                 cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir)
        self.image_size = image_size
        self.train = train
        self.seed = seed
        self.coco = load_coco(self.annotation_file)
        # Fatal problems raise here, before any training; degenerate boxes are listed in the report.
        self.report: DataReport = validate_coco(self.coco, self.annotation_file, self.image_dir,
                                                check_images=check_images)
        self.labels = LabelMap(tuple(sorted(c["id"] for c in self.coco.dataset["categories"])))
        self.image_ids = sorted(self.coco.imgs)
        dropped = set(self.report.degenerate_ids)
        self._targets = {i: self._boxes_for(i, dropped) for i in self.image_ids}
        if train:
            self._transforms = [RandomResizePad(image_size, scale=scale_jitter, interpolation="bilinear",
                                                fill_color=FILL_COLOR), RandomFlip(horizontal=True, prob=0.5)]
        else:
            self._transforms = [ResizePad(image_size, interpolation="bilinear", fill_color=FILL_COLOR)]
        self._cache: dict[int, np.ndarray] = {}
        self._cache_left = cache_bytes

    @property
    def dropped_boxes(self) -> int:
        return len(self.report.degenerate_ids)

    def _boxes_for(self, image_id: int, dropped: set) -> tuple[np.ndarray, np.ndarray]:
        boxes, labels = [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            x, y, w, h = ann["bbox"]
            # Crowd regions are not trained on (COCOeval treats them as ignore regions); degenerate boxes
            # were counted by validation and are dropped.
            if ann.get("iscrowd", 0) or ann["id"] in dropped:
                continue
            boxes.append([x, y, w, h])
            labels.append(self.labels.to_label(ann["category_id"]))
        xywh = np.array(boxes, dtype=np.float32).reshape(-1, 4)
        return coco_to_effdet_boxes(xywh, 1.0), np.array(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.image_ids)

    def _image(self, image_id: int) -> Image.Image:
        pixels = self._cache.get(image_id)
        if pixels is None:
            path = self.image_dir / self.coco.imgs[image_id]["file_name"]
            try:
                with Image.open(path) as img:
                    pixels = np.asarray(img.convert("RGB"))
            except (FileNotFoundError, OSError) as err:
                raise DataError(f"{path}: cannot read image id {image_id}: {err}") from None
            # Decoding dominates small CPU epochs, so decoded images are kept while they fit the budget.
            if pixels.nbytes <= self._cache_left:
                self._cache[image_id] = pixels
                self._cache_left -= pixels.nbytes
        return Image.fromarray(pixels)

    def __getitem__(self, key: int | tuple[int, int]):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image_id = self.image_ids[index]
        img = self._image(image_id)
        boxes, labels = self._targets[image_id]
        anno = {"bbox": boxes.copy(), "cls": labels.copy(), "img_size": (img.width, img.height),
                "image_id": image_id}
        # effdet's transforms draw from the global `random`; seed it per item and put it back afterwards.
        state = random.getstate()
        random.seed(hash((self.seed, epoch, index)) if self.train else 0)
        try:
            for transform in self._transforms:
                img, anno = transform(img, anno)
        finally:
            random.setstate(state)
        return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)), anno


class EpochSampler(torch.utils.data.Sampler):
    """Wraps a sampler with set_epoch so that it yields (epoch, index) keys for CocoDetection."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class Collate:
    """effdet's DetectionFastCollate (uint8 images, targets padded to MAX_BOXES), plus anchor labels if given.

    Labelling in the collate runs it in the loader workers, beside the training step (effdet's design), and
    BatchAnchorLabeler labels the whole batch at once.
    """

    def __init__(self, labeler: BatchAnchorLabeler | None = None):
        self.collate = DetectionFastCollate(max_instances=MAX_BOXES)
        self.labeler = labeler

    def __call__(self, batch):
        images, targets = self.collate(batch)
        if self.labeler is not None:
            targets.update(self.labeler(targets["bbox"], targets["cls"]))
        return images, targets


def to_model_input(images: torch.Tensor, device, channels_last: bool = False) -> torch.Tensor:
    """uint8 NCHW -> normalised float on the device; normalising after the copy moves 4x fewer bytes."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    images = images.to(device, non_blocking=True).float().sub_(mean).div_(std)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images
