"""Data validation before training: every problem names its file and record; clipped and degenerate boxes are counted."""
import json

import numpy as np
import pytest
from PIL import Image

from trainers.validate import DataError, index_split, load_training_data


def validate_split(annotation_file, image_dir, check="full"):
    return index_split(annotation_file, image_dir, check=check)[1]


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
    assert report.images_without_annotations == 1 and report.degenerate_ids == (12,)
    assert "1 image without annotations; dropped 1 degenerate box (annotation ids 12)" in report.summary()


def test_a_file_listed_under_two_image_ids_is_named_in_the_summary(tmp_path):
    path = _dataset(tmp_path, annotations=[
        {"id": 10, "image_id": 1, "category_id": 2, "bbox": [2, 2, 10, 10], "iscrowd": 0},
    ], images=[{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
               {"id": 5, "file_name": "a.png", "width": 40, "height": 30}], files=("a.png",))
    report = validate_split(path, tmp_path)
    assert report.shared_files == (("a.png", (1, 5)),)
    assert "; 1 file listed under several image ids (e.g. a.png: ids 1, 5)" in report.summary()


def test_shapes_dataset_is_clean(shapes):
    report = validate_split(shapes["val"]["annotations"], shapes["val"]["images"])
    assert report.images == 12 and report.degenerate_ids == () and report.clipped == 0 and report.shared_files == ()


@pytest.mark.parametrize("change, pattern", [
    ({"images": [{"id": 1, "file_name": "gone.png", "width": 40, "height": 30}]}, r"gone.png: image id 1 is missing"),
    ({"annotations": [{"id": 10, "image_id": 7, "category_id": 2, "bbox": [1, 1, 5, 5]}]},
     r"ann.json: annotation id 10: image id 7 does not exist"),
    ({"annotations": [{"id": 10, "image_id": 1, "category_id": 9, "bbox": [1, 1, 5, 5]}]},
     r"ann.json: annotation id 10 \(image id 1\): unknown category_id 9"),
    ({"images": []}, r"ann.json: the split has no images"),
    ({"annotations": [{"id": 10, "image_id": 1, "category_id": 2, "bbox": [1, 1, 5]}]},
     r"annotation id 10 \(image id 1\): bbox must be 4 finite numbers"),
    ({"annotations": [{"id": 10, "image_id": 1, "category_id": 2, "bbox": [1, 1, float("nan"), 5]}]},
     r"annotation id 10 \(image id 1\): bbox must be 4 finite numbers \[x, y, w, h\], got \[1, 1, nan, 5\]"),
    ({"annotations": [{"id": 10, "image_id": 1, "category_id": 2, "bbox": [1, 1, float("inf"), 5]}]},
     r"annotation id 10 \(image id 1\): bbox must be 4 finite numbers"),
    # Real exports: string ids, a size written as a string, an id of JSON true.
    ({"images": [{"id": "img_0001", "file_name": "a.png", "width": 40, "height": 30}]},
     r"ann.json: image id 'img_0001': id must be an integer, got 'img_0001'"),
    ({"images": [{"id": 1, "file_name": "a.png", "width": "40", "height": 30}]},
     r"ann.json: image id 1: width must be an integer, got '40'"),
    ({"images": [{"id": 1, "file_name": "a.png", "width": 0, "height": 30}]},
     r"ann.json: image id 1: width and height must be positive, got 0x30"),
    ({"images": [{"id": 1, "file_name": 7, "width": 40, "height": 30}]},
     r"ann.json: image id 1: file_name must be a string, got 7"),
    ({"annotations": [{"id": 10, "image_id": "1", "category_id": 2, "bbox": [1, 1, 5, 5]}]},
     r"ann.json: annotation id 10: image_id must be an integer, got '1'"),
    ({"categories": [{"id": True, "name": "x"}]}, r"ann.json: category id True: id must be an integer, got True"),
    ({"images": [{"id": 2**63, "file_name": "a.png", "width": 40, "height": 30}]},
     r"ann.json: image id 9223372036854775808: id must be an integer"),  # past int64, the index's type
    ({"images": [{"id": 10**400, "file_name": "a.png", "width": 40, "height": 30}]}, r"id must be an integer"),
    ({"images": [{"id": 1, "file_name": "a.png", "width": 1e300, "height": 30}]},
     r"ann.json: image id 1: width must be an integer, got 1e\+300"),
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
    with pytest.raises(DataError, match="ann.json: category id 2 appears twice"):
        validate_split(path, tmp_path)


def test_duplicate_annotation_ids_are_rejected(tmp_path):
    box = {"image_id": 1, "category_id": 2, "bbox": [2, 2, 10, 10], "iscrowd": 0}
    path = _dataset(tmp_path, annotations=[{"id": 7, **box}, {"id": 7, **box}])
    with pytest.raises(DataError, match=r"ann.json: annotation id 7 appears twice"):
        validate_split(path, tmp_path)


def test_boxes_out_of_bounds_are_clipped_and_counted(tmp_path):
    path = _dataset(tmp_path, annotations=[
        {"id": 10, "image_id": 1, "category_id": 2, "bbox": [30, -0.4, 20, 5], "iscrowd": 0},  # sticks out right, top
        {"id": 11, "image_id": 1, "category_id": 2, "bbox": [45, 5, 10, 10], "iscrowd": 0},  # wholly outside
        {"id": 12, "image_id": 1, "category_id": 2, "bbox": [2, 2, 10, 10], "iscrowd": 0},  # inside
    ])
    index, report = index_split(path, tmp_path)
    assert report.clipped == 2 and report.degenerate_ids == (11,) and report.annotations == 2
    assert "clipped 2 boxes to their image" in report.summary()
    np.testing.assert_allclose(index.boxes[0], [30, 0, 10, 4.6], rtol=1e-6)  # x2 = 40 (width), y1 = 0
    assert index.trainable.tolist() == [True, False, True]
    ground_truth = index.coco_ground_truth()
    assert sorted(ground_truth.anns) == [10, 12]  # no area left inside the image: not ground truth either


def _exif_photo(tmp_path, orientation: int, size=(40, 30)):
    image = Image.new("RGB", size, (90, 90, 90))
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(tmp_path / "a.jpg", exif=exif)


@pytest.mark.parametrize("annotated, transposed", [((30, 40), True), ((40, 30), False)])
def test_exif_rotated_photos_follow_their_annotations(tmp_path, annotated, transposed):
    from trainers.data import CocoDetection

    _exif_photo(tmp_path, orientation=6)  # stored 40x30, shown 30x40
    path = _dataset(tmp_path, files=(), images=[{"id": 1, "file_name": "a.jpg", "width": annotated[0],
                                                 "height": annotated[1]}])
    index, _ = index_split(path, tmp_path)
    image, target = CocoDetection(index, 64, train=False)[0]
    assert target["img_size"] == annotated  # the pixels the model sees are the ones the boxes were drawn on


def test_exif_size_mismatch_names_both_sizes(tmp_path):
    _exif_photo(tmp_path, orientation=6)
    path = _dataset(tmp_path, files=(), images=[{"id": 1, "file_name": "a.jpg", "width": 50, "height": 50}])
    with pytest.raises(DataError, match=r"a.jpg: image id 1 is 40x30 \(30x40 after its EXIF orientation 6\) "
                                        r"but the annotations say 50x50"):
        index_split(path, tmp_path, check="headers")


def test_check_modes(tmp_path):
    path = _dataset(tmp_path)
    blob = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(blob[: len(blob) // 2])
    index, report = index_split(path, tmp_path, check="headers")  # a header read does not see truncation
    assert not index.images_checked and "read the headers of 1 of 1 image in" in report.summary()
    with pytest.raises(DataError, match="is unreadable"):
        index_split(path, tmp_path, check="sample")  # a sample of one image is the whole split
    with pytest.raises(DataError, match=r"^data.check: must be one of full, headers, sample, got 'some'$"):
        index_split(path, tmp_path, check="some")


def test_image_check_reports_progress(tmp_path, monkeypatch):
    import trainers.validate

    monkeypatch.setattr(trainers.validate, "PROGRESS_EVERY_S", 0.0)
    path = _dataset(tmp_path)
    said = []
    index_split(path, tmp_path, say=said.append)
    assert said == ["checking images of ann.json: 1/1"]


def test_train_split_without_a_trainable_box_is_rejected(tmp_path):
    path = _dataset(tmp_path, annotations=[
        {"id": 10, "image_id": 1, "category_id": 2, "bbox": [2, 2, 10, 10], "iscrowd": 1}])
    with pytest.raises(DataError, match=r"ann.json: no box to train on"):
        load_training_data(path, tmp_path, path, tmp_path)


def test_mixed_image_id_types_are_named_not_a_traceback(tmp_path):
    path = _dataset(tmp_path, images=[{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
                                      {"id": "2", "file_name": "b.png", "width": 40, "height": 30}],
                    files=("a.png", "b.png"))
    with pytest.raises(DataError, match=r"ann.json: image id '2': id must be an integer, got '2'"):
        validate_split(path, tmp_path)


def test_integral_floats_are_ids(tmp_path):
    """Some exporters write every number as a float: 1.0 is image id 1."""
    path = _dataset(tmp_path, images=[{"id": 1.0, "file_name": "a.png", "width": 40.0, "height": 30.0}],
                    annotations=[{"id": 10.0, "image_id": 1.0, "category_id": 2.0, "bbox": [2, 2, 10, 10]}])
    index, report = index_split(path, tmp_path)
    assert report.annotations == 1 and index.image_ids.tolist() == [1] and index.sizes.tolist() == [[40, 30]]


def test_val_split_without_a_box_to_score_is_rejected(tmp_path):
    """COCOeval has nothing to score on such a split: the search would report AP 0 for every trial."""
    train = _dataset(tmp_path)
    val_dir = tmp_path / "val"
    val_dir.mkdir()
    val = _dataset(val_dir, annotations=[])
    with pytest.raises(DataError, match=r"val/ann.json: no box to score"):
        load_training_data(train, tmp_path, val, val_dir)


def test_a_dropped_degenerate_box_is_not_scored_either(tmp_path):
    """The report says a box 1 px wide or less is dropped: it is out of the ground truth that scores AP too, where
    it would be a target no detector finds."""
    path = _dataset(tmp_path, annotations=[
        {"id": 10, "image_id": 1, "category_id": 2, "bbox": [2, 2, 10, 10]},
        {"id": 11, "image_id": 1, "category_id": 2, "bbox": [20, 2, 0.5, 10]},
        {"id": 12, "image_id": 1, "category_id": 2, "bbox": [20, 2, 1.5, 10]}])
    index, report = index_split(path, tmp_path)
    assert report.degenerate_ids == (11,) and report.annotations == 2
    assert sorted(index.coco_ground_truth().getAnnIds()) == [10, 12]


def test_val_boxes_of_a_category_train_never_shows_are_named(tmp_path):
    categories = [{"id": 2, "name": "x"}, {"id": 3, "name": "y"}]
    train = _dataset(tmp_path, categories=categories)
    val_dir = tmp_path / "val"
    val_dir.mkdir()
    val = _dataset(val_dir, categories=categories, annotations=[
        {"id": 10, "image_id": 1, "category_id": 2, "bbox": [2, 2, 10, 10]},
        {"id": 11, "image_id": 1, "category_id": 3, "bbox": [20, 2, 10, 10]}])
    _, reports = load_training_data(train, tmp_path, val, val_dir)
    assert reports["train"].untrained_category_ids == ()
    assert ("categories 3 (y) have boxes here but none to train on: AP averages over classes the model cannot learn"
            in reports["val"].summary())


@pytest.mark.parametrize("area", [0, -5, None, float("nan")])
def test_a_box_without_a_usable_area_is_binned_by_its_own(tmp_path, area):
    """COCOeval's small / medium / large AP bins boxes by `area`; 0 or a missing one would bin every box as small."""
    record = {"id": 10, "image_id": 1, "category_id": 2, "bbox": [2, 2, 10, 10]}
    if area is not None:
        record["area"] = area
    index, _ = index_split(_dataset(tmp_path, annotations=[record]), tmp_path)
    assert index.coco_ground_truth().anns[10]["area"] == 100.0


def test_a_box_just_over_1_px_is_trained_on_and_scored_alike(tmp_path):
    """1.00000001 px is more than 1 in float64 but exactly 1 in float32, the index's precision: it must be dropped
    from training and scoring alike, never trained on yet missing from the ground truth."""
    path = _dataset(tmp_path, annotations=[
        {"id": 10, "image_id": 1, "category_id": 2, "bbox": [2, 2, 10, 10]},
        {"id": 11, "image_id": 1, "category_id": 2, "bbox": [20, 2, 1.00000001, 10]}])
    index, report = index_split(path, tmp_path)
    assert report.degenerate_ids == (11,) and index.trainable.tolist() == [True, False]
    assert sorted(index.coco_ground_truth().getAnnIds()) == [10]


@pytest.mark.parametrize("on_disk, in_json", [("NFD", "NFC"), ("NFC", "NFD")])
def test_a_file_name_in_the_other_unicode_form_is_found(tmp_path, on_disk, in_json):
    # macOS writes names decomposed (NFD); a JSON written elsewhere usually holds them composed (NFC).
    import unicodedata

    from trainers.data import CocoDetection

    name = "café.png"
    disk_name, json_name = (unicodedata.normalize(form, name) for form in (on_disk, in_json))
    assert disk_name != json_name
    path = _dataset(tmp_path, files=(disk_name,),
                    images=[{"id": 1, "file_name": json_name, "width": 40, "height": 30}])
    index, report = index_split(path, tmp_path, check="full")
    assert report.images == 1 and index.file_names == (disk_name,)
    assert CocoDetection(index, image_size=32, train=False)._image(0).size == (40, 30)
