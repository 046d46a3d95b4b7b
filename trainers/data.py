"""COCO-format detection data from a validated split index, and the one boundary between COCO boxes and effdet's convention.

effdet takes boxes as y1,x1,y2,x2 in model-input pixels with 1-based classes, padded with -1, and returns
detections as x1,y1,x2,y2,score,class. COCO stores x,y,w,h with arbitrary category ids. The conversions
below are the only place either convention is translated.
"""
from __future__ import annotations

import functools
import random
from pathlib import Path

import numpy as np
import torch
from effdet.data.loader import DetectionFastCollate
from effdet.data.transforms import RandomFlip, RandomResizePad, ResizePad
from PIL import Image, ImageOps

from trainers.annotations import LabelMap, SplitIndex
from trainers.mixup import mix_batch
from trainers.validate import DataError, exif_transpose_needed

MAX_BOXES = 100  # per image, at least; effdet pads targets to a fixed count, and drops the boxes beyond it
IMAGENET_MEAN = tuple(255 * x for x in (0.485, 0.456, 0.406))
IMAGENET_STD = tuple(255 * x for x in (0.229, 0.224, 0.225))
FILL_COLOR = tuple(round(x) for x in IMAGENET_MEAN)  # padding becomes ~0 after normalisation


def as_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB. Pillow's convert clips 16-bit grey (thermal, depth and medical images) to white, so such an image
    is scaled to 8 bits first, as its top byte (12-bit data comes out dark). Pillow opens 16-bit PNGs and TIFFs as
    I;16 (before Pillow 10.3, and 16-bit PGMs still, as I): an I image is taken for 16-bit when a value exceeds 255,
    and one whose values are all 0-255 keeps them."""
    if img.mode.startswith("I"):
        values = np.asarray(img).astype(np.int64)
        if img.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values >> 8
        img = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))
    return img.convert("RGB")


def coco_to_effdet_boxes(xywh: np.ndarray, scale: float) -> np.ndarray:
    """COCO x,y,w,h in original pixels -> effdet y1,x1,y2,x2 in model-input pixels."""
    x, y, w, h = (xywh[:, i] for i in range(4))
    return np.stack([y, x, y + h, x + w], axis=1).astype(np.float32) * scale


def effdet_detections_to_coco(detections: np.ndarray, image_ids: np.ndarray, labels: LabelMap) -> np.ndarray:
    """effdet rows [B, N, 6] x1,y1,x2,y2,score,class (original pixels) -> COCO result rows [K, 7]:
    image_id, x, y, w, h, score, category_id (the array form pycocotools' loadRes takes)."""
    detections = np.asarray(detections, dtype=np.float64)
    image_ids = np.broadcast_to(np.asarray(image_ids, dtype=np.float64)[:, None], detections.shape[:2])
    keep = detections[..., 4] > 0  # effdet pads with all-zero rows
    rows, ids = detections[keep], image_ids[keep]
    x1, y1, x2, y2, score, cls = rows.T
    categories = labels.to_categories(cls.astype(np.int64)) if len(rows) else np.zeros(0)
    return np.stack([ids, x1, y1, x2 - x1, y2 - y1, score, categories], axis=1).reshape(-1, 7)


class CocoDetection(torch.utils.data.Dataset):
    """A validated split through effdet's resize-pad transforms, as uint8 pixels with effdet-convention targets.

    Training items are keyed (epoch, index) by EpochSampler, so the scale jitter and flip of an item depend
    only on (seed, epoch, index): a resumed run, or a loader worker that outlives an epoch, sees the same
    augmentation as an uninterrupted run. With `cache` on, every decoded image is kept: the caller turns it
    on only when the images this process will read fit its share of the node's budget (trainers/loop.py).
    """

    def __init__(self, index: SplitIndex, image_size: int, *, train: bool, seed: int = 0,
                 scale_jitter: tuple[float, float] = (1.0, 1.0), cache: bool = False):
        self.index = index
        self.image_size = image_size
        self.train = train
        self.seed = seed
        self.labels = index.label_map
        if train:
            self._transforms = [RandomResizePad(image_size, scale=scale_jitter, interpolation="bilinear",
                                                fill_color=FILL_COLOR), RandomFlip(horizontal=True, prob=0.5)]
        else:
            self._transforms = [ResizePad(image_size, interpolation="bilinear", fill_color=FILL_COLOR)]
        self._cache: dict[int, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.index)

    @property
    def caching(self) -> bool:
        return self._cache is not None

    def _image(self, i: int) -> Image.Image:
        pixels = self._cache.get(i) if self._cache is not None else None
        if pixels is None:
            path = Path(self.index.image_dir) / self.index.file_names[i]
            try:
                with Image.open(path) as img:
                    transpose = exif_transpose_needed(img, self.index, i)
                    # Turned first: as_rgb makes a 16-bit image anew, without the EXIF that says how to turn it.
                    pixels = np.asarray(as_rgb(ImageOps.exif_transpose(img) if transpose else img))
            except (FileNotFoundError, OSError) as err:
                raise DataError(f"{path}: cannot read image id {int(self.index.image_ids[i])}: {err}") from None
            if self._cache is not None:
                self._cache[i] = pixels
        return Image.fromarray(pixels)

    def __getitem__(self, key: int | tuple[int, int]):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        img = self._image(index)
        xywh, labels = self.index.training_targets(index)
        anno = {"bbox": coco_to_effdet_boxes(xywh, 1.0), "cls": labels.copy(), "img_size": (img.width, img.height),
                "image_id": int(self.index.image_ids[index]), "epoch": epoch}
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
    """effdet's DetectionFastCollate (uint8 images, targets padded to `max_boxes`, which a split with more boxes in
    one image than MAX_BOXES raises: effdet would drop the rest), then detection mixup and the
    head's labels (trainers/anchors.py or trainers/centernet.py) if given.

    Labelling in the collate runs it in the loader workers, beside the training step (effdet's design), and
    the labelers label the whole batch at once. Mixup draws from a generator seeded by (seed, epoch, the
    batch's image ids), so a resumed run mixes as an uninterrupted one did, whichever process collates.
    """

    def __init__(self, labeler=None, *, mixup_prob: float = 0.0, mixup_alpha: float = 1.5, seed: int = 0,
                 max_boxes: int = MAX_BOXES):
        self.collate = DetectionFastCollate(max_instances=max(MAX_BOXES, max_boxes))
        self.labeler = labeler
        self.mixup_prob, self.mixup_alpha, self.seed = mixup_prob, mixup_alpha, seed

    def __call__(self, batch):
        images, targets = self.collate(batch)
        weights = None
        if self.mixup_prob > 0:
            key = hash((self.seed, int(targets["epoch"][0]), *targets["image_id"].tolist()))  # ints hash stably
            rng = np.random.default_rng(key % 2**63)
            images, targets["bbox"], targets["cls"], weights = mix_batch(
                images, targets["bbox"], targets["cls"], prob=self.mixup_prob, alpha=self.mixup_alpha, rng=rng)
        if self.labeler is not None:
            targets.update(self.labeler(targets["bbox"], targets["cls"], weights))
        return images, targets


@functools.lru_cache(maxsize=None)
def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: building them from Python lists every step was a blocking copy to the GPU (two
    # host-device syncs a step, found by tests/test_gpu.py).
    return (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))


def to_model_input(images: torch.Tensor, device, channels_last: bool = False) -> torch.Tensor:
    """uint8 NCHW -> normalised float on the device; normalising after the copy moves 4x fewer bytes."""
    mean, std = _normalisation(torch.device(device))
    images = images.to(device, non_blocking=True).float().sub_(mean).div_(std)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images
