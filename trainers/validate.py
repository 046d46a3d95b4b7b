"""Checks a COCO-format split before any training, naming the file and the record of every problem, and indexes it."""
from __future__ import annotations

import json
import math
import random
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from trainers.annotations import SplitIndex, TrainingData, degenerate
from trainers.errors import InputError
from trainers.words import counted

CHECK_MODES = ("full", "headers", "sample")
SAMPLE_SIZE = 500  # images decoded in full by data.check: sample
EXIF_ORIENTATION = 0x0112
SWAPS_AXES = (5, 6, 7, 8)  # EXIF orientations that turn the stored pixels by 90 degrees
PROGRESS_EVERY_S = 10.0


class DataError(InputError, ValueError):
    """The dataset is unusable; the message names the file and the record."""


@dataclass
class DataReport:
    """What validation found that is not fatal: boxes clipped to their image, degenerate boxes dropped."""

    annotation_file: str
    category_ids: tuple[int, ...] = ()
    images: int = 0
    annotations: int = 0
    crowd: int = 0
    images_without_annotations: int = 0
    clipped: int = 0
    degenerate_ids: tuple[int, ...] = ()
    images_checked: str = ""
    untrained_category_ids: tuple[int, ...] = ()  # val only: categories scored here with no box in train
    untrained_category_names: tuple[str, ...] = ()  # their names, in the same order
    # Files listed under more than one image id, (file_name, ids): in a val split each copy is scored, and the
    # boxes of one id are false positives on the other unless both list them.
    shared_files: tuple[tuple[str, tuple], ...] = ()

    def summary(self) -> str:
        text = (f"{self.annotation_file}: {counted(self.images, 'image')}, {counted(self.annotations, 'box')} "
                f"({self.crowd} crowd), {counted(self.images_without_annotations, 'image')} without annotations")
        if self.clipped:
            text += f"; clipped {counted(self.clipped, 'box')} to their image"
        if self.degenerate_ids:
            shown = ", ".join(map(str, self.degenerate_ids[:10])) + (" ..." if len(self.degenerate_ids) > 10 else "")
            text += f"; dropped {counted(len(self.degenerate_ids), 'degenerate box')} (annotation ids {shown})"
        if self.untrained_category_ids:
            named = ", ".join(f"{i} ({name})" for i, name in zip(self.untrained_category_ids,
                                                                 self.untrained_category_names))
            text += (f"; categories {named} have boxes here but none to train on: AP "
                     f"averages over classes the model cannot learn")
        if self.shared_files:
            name, ids = self.shared_files[0]
            text += (f"; {counted(len(self.shared_files), 'file')} listed under several image ids (e.g. {name}: ids "
                     f"{', '.join(map(str, ids))})")
        if self.images_checked:
            text += f"; {self.images_checked}"
        return text


_REQUIRED = {
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}
# COCO's types for the fields the index reads; a string id or size ("img_0001", "640") is named, not a traceback.
_INTEGER_FIELDS = {"images": ("id", "width", "height"), "annotations": ("id", "image_id", "category_id"),
                   "categories": ("id",)}


def load_training_data(train_annotations, train_images, val_annotations, val_images, *, check: str = "full",
                       cache_bytes_per_node: int = 2 * 2**30,
                       say: Callable[[str], None] | None = None) -> tuple[TrainingData, dict[str, DataReport]]:
    """Both splits, checked and indexed, sharing one label space; raises DataError on the first fatal problem."""
    train, train_report = index_split(train_annotations, train_images, check=check, say=say)
    val, val_report = index_split(val_annotations, val_images, check=check, say=say)
    check_same_categories(train_report, val_report)
    if not train.trainable.any():
        raise DataError(f"{train.annotation_file}: no box to train on (every annotation is crowd or degenerate)")
    if not val.trainable.any():  # COCOeval has nothing to score: AP would be undefined, not 0
        raise DataError(f"{val.annotation_file}: no box to score (the split has no annotation that is neither crowd "
                        f"nor degenerate)")
    untrained = np.setdiff1d(val.labels[val.trainable], train.labels[train.trainable])
    val_report.untrained_category_ids = tuple(int(c) for c in val.label_map.to_categories(untrained))
    name_of = dict(zip(val.category_ids, val.category_names))
    val_report.untrained_category_names = tuple(name_of[c] for c in val_report.untrained_category_ids)
    return (TrainingData(train, val, cache_bytes_per_node=cache_bytes_per_node),
            {"train": train_report, "val": val_report})


def index_split(annotation_file: str | Path, image_dir: str | Path, *, check: str = "full",
                say: Callable[[str], None] | None = None) -> tuple[SplitIndex, DataReport]:
    """Parse, validate and index one split, then check its images as `check` says (full, headers or sample)."""
    if check not in CHECK_MODES:
        raise DataError(f"data.check: must be one of {', '.join(CHECK_MODES)}, got {check!r}")
    path = Path(annotation_file)
    index, report = _index(_load_json(path), path, Path(image_dir))
    report.images_checked = check_images(index, check, say=say)
    return (replace(index, images_checked=True) if check == "full" else index), report


def check_same_categories(train: DataReport, val: DataReport) -> None:
    """Train and val must share one label space, or predictions are scored against the wrong classes."""
    if train.category_ids != val.category_ids:
        raise DataError(f"{val.annotation_file}: category ids {list(val.category_ids)} differ from "
                        f"{train.annotation_file}: {list(train.category_ids)}")


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read annotation file: {err}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: missing or non-list key {key!r}")
    for section in _REQUIRED:
        for record in data[section]:
            _check_fields(path, section, record)
    if not data["images"]:
        raise DataError(f"{path}: the split has no images")
    return data


def _check_fields(path: Path, section: str, record) -> None:
    """The record has the fields the index reads, of COCO's types."""
    singular = section[:-1].replace("categorie", "category")
    if not isinstance(record, dict):
        raise DataError(f"{path}: {section} holds a non-object entry {record!r}")
    for key in _REQUIRED[section]:
        if key not in record:
            raise DataError(f"{path}: {singular} id {record.get('id')!r}: missing field {key!r}")
    for key in _INTEGER_FIELDS[section]:
        if not _is_integer(record[key]):
            raise DataError(f"{path}: {singular} id {record['id']!r}: {key} must be an integer, got {record[key]!r}")
    if section == "images" and not (record["width"] > 0 and record["height"] > 0):
        raise DataError(f"{path}: image id {record['id']}: width and height must be positive, got "
                        f"{record['width']}x{record['height']}")
    if section == "images" and not isinstance(record["file_name"], str):
        raise DataError(f"{path}: image id {record['id']}: file_name must be a string, got {record['file_name']!r}")


def _is_number(value) -> bool:
    # bool is an int to Python, and JSON's true is no number; NaN, infinity and integers past int64 (the index's
    # type) are no id, coordinate or size.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return abs(value) < 2**63 if isinstance(value, int) else math.isfinite(value)


def _is_integer(value) -> bool:
    return _is_number(value) and float(value).is_integer() and abs(value) < 2**63  # 3.0: some exporters' 3


def _index(data: dict, path: Path, image_dir: Path) -> tuple[SplitIndex, DataReport]:
    categories = sorted(data["categories"], key=lambda c: c["id"])
    category_ids = tuple(c["id"] for c in categories)
    if len(set(category_ids)) != len(category_ids):
        twice = sorted({c for c in category_ids if category_ids.count(c) > 1})
        raise DataError(f"{path}: category id {twice[0]} appears twice")
    label_of = {c: label for label, c in enumerate(category_ids, 1)}
    report = DataReport(str(path), category_ids=category_ids)

    images = sorted(data["images"], key=lambda r: r["id"])
    position = {}
    for i, record in enumerate(images):
        if record["id"] in position:
            raise DataError(f"{path}: image id {record['id']} appears twice")
        position[record["id"]] = i
    report.images = len(images)
    ids_of: dict[str, list] = {}
    for record in images:
        ids_of.setdefault(record["file_name"], []).append(record["id"])
    report.shared_files = tuple((name, tuple(ids)) for name, ids in ids_of.items() if len(ids) > 1)

    rows: list[tuple] = []  # (image position, annotation id, label, x, y, w, h, area, crowd)
    seen = set()
    for ann in data["annotations"]:
        where = f"{path}: annotation id {ann['id']}"
        # pycocotools indexes annotations by id: duplicates would silently shadow each other.
        if ann["id"] in seen:
            raise DataError(f"{where} appears twice")
        seen.add(ann["id"])
        at = position.get(ann["image_id"])
        if at is None:
            raise DataError(f"{where}: image id {ann['image_id']} does not exist")
        if ann["category_id"] not in label_of:
            raise DataError(f"{where} (image id {ann['image_id']}): unknown category_id {ann['category_id']}")
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise DataError(f"{where} (image id {ann['image_id']}): bbox must be 4 finite numbers [x, y, w, h], "
                            f"got {bbox!r}")
        image = images[at]
        x, y, w, h = bbox
        # COCO itself has boxes a fraction of a pixel outside their image: clip and count, never abort.
        x1, y1 = min(max(x, 0.0), image["width"]), min(max(y, 0.0), image["height"])
        x2, y2 = min(max(x + w, 0.0), image["width"]), min(max(y + h, 0.0), image["height"])
        report.clipped += (x1, y1, x2, y2) != (x, y, x + w, y + h)
        crowd = bool(ann.get("iscrowd", 0))
        # COCOeval sorts boxes into small, medium and large by `area` (a mask's area in COCO); a missing, zero or
        # non-finite one would put every box in the wrong bin, so the box's own area stands in.
        area = ann.get("area")
        area = float(area) if _is_number(area) and area > 0 else (x2 - x1) * (y2 - y1)
        rows.append((at, ann["id"], label_of[ann["category_id"]], x1, y1, x2 - x1, y2 - y1, area, crowd))

    rows.sort(key=lambda r: (r[0], r[1]))
    table = np.array([r[:3] for r in rows], dtype=np.int64).reshape(-1, 3)
    values = np.array([r[3:8] for r in rows], dtype=np.float64).reshape(-1, 5)
    crowd = np.array([r[8] for r in rows], dtype=bool)
    boxes = values[:, :4].astype(np.float32)
    degenerate_rows = degenerate(values[:, 2], values[:, 3])  # judged once, for the report and the index alike
    trainable = ~crowd & ~degenerate_rows
    report.annotations = int((~degenerate_rows).sum())
    report.crowd = int((crowd & ~degenerate_rows).sum())
    report.degenerate_ids = tuple(int(i) for i in table[:, 1][degenerate_rows])
    report.images_without_annotations = len(images) - len(np.unique(table[:, 0][~degenerate_rows]))
    index = SplitIndex(
        annotation_file=str(path), image_dir=str(image_dir), category_ids=category_ids,
        category_names=tuple(str(c["name"]) for c in categories),
        image_ids=np.array([r["id"] for r in images], dtype=np.int64),
        file_names=tuple(_on_disk(image_dir, r["file_name"]) for r in images),
        sizes=np.array([(r["width"], r["height"]) for r in images], dtype=np.int64).reshape(-1, 2),
        first_box=np.searchsorted(table[:, 0], np.arange(len(images) + 1)).astype(np.int64),
        boxes=boxes, labels=table[:, 2], annotation_ids=table[:, 1], areas=values[:, 4].astype(np.float32),
        crowd=crowd, trainable=trainable)
    return index, report


def _on_disk(image_dir: Path, name: str) -> str:
    """`name` as the folder spells it. macOS writes names decomposed (NFD) and most tools compose them (NFC), so a
    dataset copied between the two can name 'café.jpg' in a form the folder does not hold; the two look identical
    in any message. Only non-ASCII names can differ, so only they cost a lookup."""
    if name.isascii():
        return name
    for form in (name, unicodedata.normalize("NFC", name), unicodedata.normalize("NFD", name)):
        if (image_dir / form).exists():
            return form
    return name


def check_images(index: SplitIndex, mode: str, *, say: Callable[[str], None] | None = None) -> str:
    """Open the split's images as `mode` says, in parallel; returns what was checked, raising on a bad image.

    full decodes every image (a truncated file fails here, not in epoch 3); headers reads each header (size
    and EXIF orientation: fast, but misses truncation); sample decodes a seeded sample of SAMPLE_SIZE images.
    Anything unchecked that turns out unreadable stops training with the same message when it is loaded.
    """
    positions = list(range(len(index)))
    if mode == "sample" and len(positions) > SAMPLE_SIZE:
        positions = sorted(random.Random(0).sample(positions, SAMPLE_SIZE))
    decode = mode != "headers"
    started = last = time.monotonic()
    done = 0
    # PIL releases the GIL while it reads and decodes, so threads overlap both the I/O and the decoding.
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in pool.map(lambda i: _check_image(index, i, decode), positions):
            done += 1
            if say is not None and time.monotonic() - last > PROGRESS_EVERY_S:
                last = time.monotonic()
                say(f"checking images of {Path(index.annotation_file).name}: {done}/{len(positions)}")
    what = {"full": "decoded", "headers": "read the headers of", "sample": "decoded a sample of"}[mode]
    return f"{what} {len(positions)} of {counted(len(index), 'image')} in {time.monotonic() - started:.1f} s"


def _check_image(index: SplitIndex, i: int, decode: bool) -> None:
    path = Path(index.image_dir) / index.file_names[i]
    image_id = int(index.image_ids[i])
    try:
        with Image.open(path) as image:
            exif_transpose_needed(image, index, i)
            if decode:
                image.load()
    except FileNotFoundError:
        raise DataError(f"{path}: image id {image_id} is missing") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"{path}: image id {image_id} is unreadable: {err}") from None


def exif_transpose_needed(image: Image.Image, index: SplitIndex, i: int) -> bool:
    """Whether the annotations describe the image as displayed (EXIF orientation applied) or as stored.

    Annotation tools show photos with their EXIF orientation applied, so that is the default (as detectron2
    reads images). A record whose width and height match only the stored pixels was annotated on those.
    Any other size is an error that names both.
    """
    expected = tuple(int(v) for v in index.sizes[i])
    stored = image.size
    orientation = _orientation(image)
    shown = stored[::-1] if orientation in SWAPS_AXES else stored
    if shown == expected:
        return orientation in range(2, 9)
    if stored == expected:
        return False
    turned = f" ({shown[0]}x{shown[1]} after its EXIF orientation {orientation})" if shown != stored else ""
    raise DataError(f"{Path(index.image_dir) / index.file_names[i]}: image id {int(index.image_ids[i])} is "
                    f"{stored[0]}x{stored[1]}{turned} but the annotations say {expected[0]}x{expected[1]}")


def _orientation(image: Image.Image) -> int:
    if image.format == "PNG":
        # PIL's PNG getexif decodes the whole image to look for an eXIf chunk after the pixels; one before
        # them (where exporters put it) is already in image.info, and that is all a header read may look at.
        raw = image.info.get("exif")
        if not raw:
            return 1
        exif = Image.Exif()
        exif.load(raw)
        return exif.get(EXIF_ORIENTATION, 1)
    return image.getexif().get(EXIF_ORIENTATION, 1)
