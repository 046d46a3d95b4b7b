"""A COCO split as compact arrays: parsed once per search, shipped to every worker, no pycocotools per worker.

pycocotools keeps every annotation as a Python dict, polygons included: several GB for COCO's
instances_train2017. Training needs only boxes, labels and file names, so the driver parses the JSON once
(trainers/validate.py) and each worker gets these arrays, about 40 bytes a box. Evaluation rebuilds a
pycocotools index of boxes alone (no polygons) for the validation split, on rank 0.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field

import numpy as np
from pycocotools.coco import COCO

# A box no wider or taller than this, after clipping to its image, is degenerate: dropped from training and from
# the ground truth that scores it, as the data report says (trainers/validate.py).
MIN_BOX_SIDE = 1.0


def degenerate(width, height):
    """Boxes (scalars or arrays) no wider or taller than MIN_BOX_SIDE, judged in float32, the precision the index
    keeps them in: a width of 1.00000001 is 1.0 there, and must not be trained on yet left out of the scoring."""
    return (np.float32(width) <= MIN_BOX_SIDE) | (np.float32(height) <= MIN_BOX_SIDE)


@dataclass(frozen=True)
class LabelMap:
    """COCO category ids (possibly gapped) <-> effdet's contiguous 1-based class labels."""

    category_ids: tuple[int, ...]

    def to_label(self, category_id: int) -> int:
        return self.category_ids.index(category_id) + 1

    def to_category(self, label: int) -> int:
        return self.category_ids[label - 1]

    def to_categories(self, labels: np.ndarray) -> np.ndarray:
        return np.asarray(self.category_ids, dtype=np.int64)[np.asarray(labels, dtype=np.int64) - 1]

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)


@dataclass(frozen=True, eq=False)
class SplitIndex:
    """One validated split. Image i's annotations are rows first_box[i]:first_box[i + 1] of the box arrays."""

    annotation_file: str
    image_dir: str
    category_ids: tuple[int, ...]
    category_names: tuple[str, ...]
    image_ids: np.ndarray  # int64 [N], ascending
    file_names: tuple[str, ...]
    sizes: np.ndarray  # int64 [N, 2]: width, height as annotated
    first_box: np.ndarray  # int64 [N + 1]
    boxes: np.ndarray  # float32 [M, 4]: x, y, w, h in original pixels, clipped to the image
    labels: np.ndarray  # int64 [M]: contiguous 1-based labels
    annotation_ids: np.ndarray  # int64 [M]
    areas: np.ndarray  # float32 [M]: COCO's area (of the segmentation), which COCOeval's size ranges use
    crowd: np.ndarray  # bool [M]
    trainable: np.ndarray  # bool [M]: not crowd, and not degenerate after clipping
    # True when every image was opened and decoded before training (data.check: full).
    images_checked: bool = False
    label_map: LabelMap = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "label_map", LabelMap(self.category_ids))

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def rows(self, i: int) -> slice:
        return slice(int(self.first_box[i]), int(self.first_box[i + 1]))

    def training_targets(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image i's trainable boxes as x, y, w, h (original pixels), and their labels."""
        rows = self.rows(i)
        keep = self.trainable[rows]
        return self.boxes[rows][keep], self.labels[rows][keep]

    def most_trainable_boxes(self) -> int:
        """The largest number of trainable boxes in one image."""
        before = np.concatenate([[0], np.cumsum(self.trainable, dtype=np.int64)])  # trainable boxes before each row
        return int(np.max(before[self.first_box[1:]] - before[self.first_box[:-1]], initial=0))

    def decoded_bytes(self, indices=None) -> int:
        """Memory the decoded RGB images at these indices (all by default) take."""
        sizes = self.sizes if indices is None else self.sizes[np.asarray(indices, dtype=np.int64)]
        return int((sizes[:, 0] * sizes[:, 1]).sum() * 3)

    def coco_ground_truth(self) -> COCO:
        """A pycocotools index of the boxes alone, for COCOeval (bbox); degenerate boxes are out, as in training."""
        images = [{"id": int(i), "width": int(w), "height": int(h)}
                  for i, (w, h) in zip(self.image_ids, self.sizes)]
        per_box_image = np.repeat(self.image_ids, np.diff(self.first_box))
        present = ~degenerate(self.boxes[:, 2], self.boxes[:, 3])
        categories = self.label_map.to_categories(self.labels)
        annotations = [
            {"id": int(a), "image_id": int(i), "category_id": int(c), "bbox": [float(v) for v in box],
             "area": float(area), "iscrowd": int(crowd)}
            for a, i, c, box, area, crowd in zip(self.annotation_ids[present], per_box_image[present],
                                                  categories[present], self.boxes[present],
                                                  self.areas[present], self.crowd[present])]
        coco = COCO()
        coco.dataset = {"images": images, "annotations": annotations,
                        "categories": [{"id": c, "name": n} for c, n in zip(self.category_ids, self.category_names)]}
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.createIndex()
        return coco


@dataclass(frozen=True)
class TrainingData:
    """Both splits of a dataset, validated, and the decoded-image cache this node may spend on them."""

    train: SplitIndex
    val: SplitIndex
    cache_bytes_per_node: int = 2 * 2**30
