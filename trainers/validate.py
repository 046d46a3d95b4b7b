"""Checks a COCO-format dataset before any training, naming the file and the record of every problem."""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO


class DataError(ValueError):
    """The dataset is unusable; the message names the file and the record."""


def load_coco(annotation_file: str | Path) -> COCO:
    """pycocotools COCO with a clear error for a missing or malformed file."""
    path = Path(annotation_file)
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read annotation file: {err}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: missing or non-list key {key!r}")
    _check_fields(data, path)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


@dataclass
class DataReport:
    """What validation found that is not fatal: degenerate boxes are dropped and counted."""

    annotation_file: str
    category_ids: tuple[int, ...] = ()
    images: int = 0
    annotations: int = 0
    crowd: int = 0
    images_without_annotations: int = 0
    degenerate_ids: list[int] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"{self.annotation_file}: {self.images} images, {self.annotations} boxes "
                f"({self.crowd} crowd), {self.images_without_annotations} images without annotations")
        if self.degenerate_ids:
            shown = ", ".join(map(str, self.degenerate_ids[:10])) + (" ..." if len(self.degenerate_ids) > 10 else "")
            text += f"; dropped {len(self.degenerate_ids)} degenerate boxes (annotation ids {shown})"
        return text


_REQUIRED = {
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}


def _check_fields(data: dict, path: Path) -> None:
    """Every record has the fields pycocotools indexes on: otherwise it fails with a bare KeyError."""
    for section, fields in _REQUIRED.items():
        singular = section[:-1].replace("categorie", "category")
        for record in data[section]:
            if not isinstance(record, dict):
                raise DataError(f"{path}: {section} holds a non-object entry {record!r}")
            for key in fields:
                if key not in record:
                    raise DataError(f"{path}: {singular} id {record.get('id')}: missing field {key!r}")


def validate_split(annotation_file: str | Path, image_dir: str | Path, *, check_images: bool = True) -> DataReport:
    """Raise DataError on the first fatal problem; return a report of what will be dropped."""
    return validate_coco(load_coco(annotation_file), annotation_file, image_dir, check_images=check_images)


def validate_coco(coco: COCO, annotation_file: str | Path, image_dir: str | Path, *,
                  check_images: bool) -> DataReport:
    path = Path(annotation_file)
    categories = {c["id"] for c in coco.dataset["categories"]}
    if len(categories) != len(coco.dataset["categories"]):
        raise DataError(f"{path}: category ids are not unique")
    report = DataReport(str(path), category_ids=tuple(sorted(categories)))
    images = {}
    for record in coco.dataset["images"]:
        image_id = record["id"]
        if image_id in images:
            raise DataError(f"{path}: image id {image_id} appears twice")
        images[image_id] = record
    report.images = len(images)
    annotated, seen = set(), set()
    for ann in coco.dataset["annotations"]:
        where = f"{path}: annotation id {ann['id']}"
        # pycocotools indexes annotations by id, and the loader drops degenerate boxes by id.
        if ann["id"] in seen:
            raise DataError(f"{where} appears twice")
        seen.add(ann["id"])
        image = images.get(ann["image_id"])
        if image is None:
            raise DataError(f"{where}: image id {ann['image_id']} does not exist")
        if ann["category_id"] not in categories:
            raise DataError(f"{where} (image id {ann['image_id']}): unknown category_id {ann['category_id']}")
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise DataError(f"{where} (image id {ann['image_id']}): bbox must be 4 numbers [x, y, w, h], got {bbox!r}")
        x, y, w, h = bbox
        if w <= 1 or h <= 1:
            report.degenerate_ids.append(ann["id"])
            continue
        # One pixel of slack: exporters often round boxes that touch the border outwards.
        if x < -1 or y < -1 or x + w > image["width"] + 1 or y + h > image["height"] + 1:
            raise DataError(f"{where} (image id {ann['image_id']}): box {bbox} lies outside the "
                            f"{image['width']}x{image['height']} image {image['file_name']}")
        report.annotations += 1
        report.crowd += int(bool(ann.get("iscrowd", 0)))
        annotated.add(ann["image_id"])
    report.images_without_annotations = len(images) - len(annotated)
    if check_images:
        for image_id, record in images.items():
            _check_image(Path(image_dir) / record["file_name"], image_id, record)
    return report


def check_same_categories(train: DataReport, val: DataReport) -> None:
    """Train and val must share one label space, or predictions are scored against the wrong classes."""
    if train.category_ids != val.category_ids:
        raise DataError(f"{val.annotation_file}: category ids {list(val.category_ids)} differ from "
                        f"{train.annotation_file}: {list(train.category_ids)}")


def _check_image(path: Path, image_id: int, record: dict) -> None:
    if not path.is_file():
        raise DataError(f"{path}: image id {image_id} is missing")
    try:
        with Image.open(path) as image:
            size = image.size
            image.verify()  # reads the whole file: a truncated image fails here, not in epoch 3
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"{path}: image id {image_id} is unreadable: {err}") from None
    if size != (record["width"], record["height"]):
        raise DataError(f"{path}: image id {image_id} is {size[0]}x{size[1]} but the annotations say "
                        f"{record['width']}x{record['height']}")
