"""Data validation before training: every problem names its file and record; degenerate boxes are counted."""
import json

import pytest
from PIL import Image

from trainers.data import DataError
from trainers.validate import validate_split


def _dataset(tmp_path, images=None, annotations=None, categories=None, files=("a.png",)):
    for name in files:
        Image.new("RGB", (40, 30), (90, 90, 90)).save(tmp_path / name)
    data = {
        "images": images if images is not None else [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
        "annotations": annotations if annotations is not None else [
            {"id": 10, "image_id": 1, "category_id": 2, "bbox": [2, 2, 10, 10], "iscrowd": 0}],
        "categories": categories if categories is not None else [{"id": 2, "name": "x"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


def test_clean_dataset_reports_counts(tmp_path):
    path = _dataset(tmp_path, annotations=[
        {"id": 10, "image_id": 1, "category_id": 2, "bbox": [2, 2, 10, 10], "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": 2, "bbox": [2, 2, 10, 10], "iscrowd": 1},
        {"id": 12, "image_id": 1, "category_id": 2, "bbox": [2, 2, 0, 10], "iscrowd": 0},
    ], images=[{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
               {"id": 2, "file_name": "b.png", "width": 40, "height": 30}], files=("a.png", "b.png"))
    report = validate_split(path, tmp_path)
    assert (report.images, report.annotations, report.crowd) == (2, 2, 1)
    assert report.images_without_annotations == 1 and report.degenerate_ids == [12]
    assert "dropped 1 degenerate boxes (annotation ids 12)" in report.summary()


def test_shapes_dataset_is_clean(shapes):
    report = validate_split(shapes["val"]["annotations"], shapes["val"]["images"])
    assert report.images == 12 and report.degenerate_ids == []


@pytest.mark.parametrize("change, pattern", [
    ({"images": [{"id": 1, "file_name": "gone.png", "width": 40, "height": 30}]}, r"gone.png: image id 1 is missing"),
    ({"annotations": [{"id": 10, "image_id": 7, "category_id": 2, "bbox": [1, 1, 5, 5]}]},
     r"ann.json: annotation id 10: image id 7 does not exist"),
    ({"annotations": [{"id": 10, "image_id": 1, "category_id": 9, "bbox": [1, 1, 5, 5]}]},
     r"ann.json: annotation id 10 \(image id 1\): unknown category_id 9"),
    ({"annotations": [{"id": 10, "image_id": 1, "category_id": 2, "bbox": [30, 1, 20, 5]}]},
     r"ann.json: annotation id 10 \(image id 1\): box \[30, 1, 20, 5\] lies outside the 40x30 image a.png"),
    ({"annotations": [{"id": 10, "image_id": 1, "category_id": 2, "bbox": [1, 1, 5]}]},
     r"annotation id 10 \(image id 1\): bbox must be 4 numbers"),
    ({"annotations": [{"id": 10, "image_id": 1, "bbox": [1, 1, 5, 5]}]},
     r"annotation id 10: missing field 'category_id'"),
    ({"images": [{"id": 1, "file_name": "a.png", "width": 50, "height": 30}]},
     r"a.png: image id 1 is 40x30 but the annotations say 50x30"),
])
def test_fatal_problems_name_file_and_id(tmp_path, change, pattern):
    with pytest.raises(DataError, match=pattern):
        validate_split(_dataset(tmp_path, **change), tmp_path)


def test_unreadable_image_names_file_and_id(tmp_path):
    path = _dataset(tmp_path)
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=r"a.png: image id 1 is unreadable"):
        validate_split(path, tmp_path)


def test_truncated_image_is_caught_before_training(tmp_path):
    path = _dataset(tmp_path)
    blob = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=r"a.png: image id 1 is unreadable"):
        validate_split(path, tmp_path)


def test_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text('{"images": [}')
    with pytest.raises(DataError, match=r"ann.json: malformed JSON at line 1"):
        validate_split(path, tmp_path)


def test_train_and_val_must_share_categories(tmp_path):
    from trainers.validate import check_same_categories

    (tmp_path / "t").mkdir()
    (tmp_path / "v").mkdir()
    train = validate_split(_dataset(tmp_path / "t"), tmp_path / "t")
    val = validate_split(_dataset(tmp_path / "v", categories=[{"id": 2, "name": "x"}, {"id": 4, "name": "y"}]),
                         tmp_path / "v")
    with pytest.raises(DataError, match=r"v/ann.json: category ids \[2, 4\] differ from .*t/ann.json: \[2\]"):
        check_same_categories(train, val)
    check_same_categories(train, train)


def test_duplicate_category_ids_are_rejected(tmp_path):
    path = _dataset(tmp_path, categories=[{"id": 2, "name": "x"}, {"id": 2, "name": "y"}])
    with pytest.raises(DataError, match="category ids are not unique"):
        validate_split(path, tmp_path)


def test_duplicate_annotation_ids_are_rejected(tmp_path):
    box = {"image_id": 1, "category_id": 2, "bbox": [2, 2, 10, 10], "iscrowd": 0}
    path = _dataset(tmp_path, annotations=[{"id": 7, **box}, {"id": 7, **box}])
    with pytest.raises(DataError, match=r"ann.json: annotation id 7 appears twice"):
        validate_split(path, tmp_path)
