"""effsearch predict: a promoted model finds fresh shapes, in each image's own coordinates, with the dataset's ids."""
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from search.cli import main
from search.logged_model import log_model
from spaces.search_spaces import lite_cpu_reference
from trainers.checkpoint import save_checkpoint
from trainers.model import build_model
from trainers.shapes import CATEGORIES, make_shapes
from trainers.spec import ModelSpec

NAME = "shapes-detector"
UNTRAINED = "untrained-detector"
# The trained model is conftest.trained_shapes_model (600 images x 5 epochs; 300 x 4 reached AP 0.16 and found
# 40% of the boxes: too few). The untrained ones have its spec.
SHAPE_IDS = {c["id"] for c in CATEGORIES}


def _spec() -> ModelSpec:
    return lite_cpu_reference(3)


def _logged(folder: Path, checkpoint: Path, *, experiment: str = "predict-test") -> str:
    """Log a checkpoint as the search does, into an experiment whose artifacts live in the test's folder."""
    import mlflow

    if mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment, artifact_location=(folder / "artifacts").as_uri())
    mlflow.set_experiment(experiment)
    with mlflow.start_run() as run:
        pass
    log_model(run.info.run_id, str(checkpoint))
    return run.info.run_id


def _promote(run_id: str, name: str = NAME) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    version = mlflow.register_model(f"runs:/{run_id}/model", name).version
    MlflowClient().set_registered_model_alias(name, "production", version)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real SQLite MLflow store for the module, selected as the CLI finds it (MLFLOW_TRACKING_URI)."""
    import mlflow

    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        yield folder


@pytest.fixture(scope="module")
def untrained(store):
    """An untrained model logged twice: as effsearch logs models now, and as it did before categories.json."""
    spec = _spec()
    runs = {}
    for kind, categories in (("current", CATEGORIES), ("old", None)):
        checkpoint = store / f"untrained-{kind}"
        checkpoint.mkdir()
        save_checkpoint(checkpoint, spec=spec, model=build_model(spec).eval(), ema_model=None, deploy="raw",
                        state={"epoch": 1}, categories=categories and [{"id": c["id"], "name": c["name"]}
                                                                       for c in categories])
        runs[kind] = _logged(store, checkpoint)
    _promote(runs["current"], UNTRAINED)
    return runs


@pytest.fixture(scope="module")
def trained(store, trained_shapes_model):
    """The recipe that learns on 2 CPU cores (conftest.trained_shapes_model, trained once for the session), logged,
    registered and promoted to production."""
    start = time.perf_counter()
    run_id = _logged(store, trained_shapes_model["checkpoint"])
    _promote(run_id)
    print(f"\npredict fixture: val AP {trained_shapes_model['metrics']['map']:.3f}, trained in "
          f"{trained_shapes_model['seconds']:.0f} s; logged and promoted in {time.perf_counter() - start:.0f} s")
    return run_id


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """Shapes of a seed the model never saw, and copies of some at other sizes with their boxes moved to match."""
    root = tmp_path_factory.mktemp("fresh")
    split = make_shapes(root, train_images=0, val_images=20, seed=7)["val"]
    coco = json.loads(Path(split["annotations"]).read_text())
    truth = {image["file_name"]: [] for image in coco["images"]}
    names = {image["id"]: image["file_name"] for image in coco["images"]}
    for a in coco["annotations"]:
        truth[names[a["image_id"]]].append((a["category_id"], a["bbox"]))
    resized_dir = root / "resized"
    resized_dir.mkdir()
    resized = {}
    # Larger and offset inside a wider canvas, or smaller: both must come back in the copy's own pixels.
    for i, (scale, offset, canvas) in enumerate([(1.5, (60, 10), (460, 400)), (0.75, (0, 0), (192, 192))] * 4):
        file_name = sorted(truth)[i]
        image = Image.open(Path(split["images"]) / file_name).convert("RGB")
        copy = Image.new("RGB", canvas, (128, 128, 128))
        copy.paste(image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR), offset)
        name = f"resized-{i}.png"
        copy.save(resized_dir / name)
        resized[name] = [(c, [x * scale + offset[0], y * scale + offset[1], w * scale, h * scale])
                         for c, (x, y, w, h) in truth[file_name]]
    return {"images": Path(split["images"]), "truth": truth, "resized_dir": resized_dir, "resized": resized}


def _predict(capsys, *args) -> tuple[int, str, str]:
    code = main(["predict", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def _matched(detections: list[dict], truth: dict[str, list]) -> tuple[int, int]:
    """Ground-truth boxes matched by a detection of their category at IoU >= 0.5, and how many there are."""
    by_image: dict[str, list] = {}
    for d in detections:
        by_image.setdefault(Path(d["file_name"]).name, []).append(d)
    matched = total = 0
    for name, boxes in truth.items():
        for category, (x, y, w, h) in boxes:
            total += 1
            same = [d["bbox"] for d in by_image.get(name, []) if d["category_id"] == category]
            if same:
                found = torch.tensor([[bx, by, bx + bw, by + bh] for bx, by, bw, bh in same])
                matched += bool(box_iou(torch.tensor([[x, y, x + w, y + h]]), found).max() >= 0.5)
    return matched, total


@pytest.mark.slow
def test_the_promoted_model_finds_fresh_shapes_in_their_own_coordinates(trained, fresh, tmp_path, capsys):
    out = tmp_path / "dets.json"
    start = time.perf_counter()
    code, stdout, err = _predict(capsys, f"models:/{NAME}@production", fresh["images"], fresh["resized_dir"],
                                 "--out", out)
    assert code == 0, err
    images = len(fresh["truth"]) + len(fresh["resized"])
    assert stdout.startswith(f"{len(json.loads(out.read_text()))} detections in {images} images")
    detections = json.loads(out.read_text())
    assert {d["category_id"] for d in detections} <= SHAPE_IDS  # the dataset's gapped ids, not labels 1..3
    assert {d["category_id"] for d in detections} == SHAPE_IDS
    assert all(d["score"] >= 0.3 for d in detections)
    matched, total = _matched(detections, fresh["truth"])
    matched_resized, total_resized = _matched(detections, fresh["resized"])
    print(f"\npredict: {matched}/{total} boxes matched at IoU >= 0.5, {matched_resized}/{total_resized} in the "
          f"resized copies, {len(detections)} detections, {time.perf_counter() - start:.1f} s")
    assert matched >= 0.7 * total
    assert matched_resized >= 0.7 * total_resized
    # Detections are mostly real objects, not background texture: 60 of 107 matched a box here (the rest are
    # mostly a second box or class on an object already found).
    true_positives = _true_positives(detections, {**fresh["truth"], **fresh["resized"]})
    assert true_positives >= 0.4 * len(detections), (true_positives, len(detections))


def _true_positives(detections: list[dict], truth: dict[str, list]) -> int:
    hits = 0
    for d in detections:
        x, y, w, h = d["bbox"]
        boxes = [b for c, b in truth[Path(d["file_name"]).name] if c == d["category_id"]]
        if boxes:
            gt = torch.tensor([[bx, by, bx + bw, by + bh] for bx, by, bw, bh in boxes])
            hits += bool(box_iou(torch.tensor([[x, y, x + w, y + h]]), gt).max() >= 0.5)
    return hits


def test_models_runs_and_local_uris_give_the_same_detections_and_draw_copies(untrained, fresh, tmp_path, capsys,
                                                                            own_tempdir):
    import mlflow

    images = sorted(fresh["images"].iterdir())[:3] + [fresh["resized_dir"] / "resized-0.png"]
    local = mlflow.artifacts.download_artifacts(f"models:/{UNTRAINED}@production", dst_path=str(tmp_path))
    # Every temporary folder of the calls below, MLflow's included, goes to own_tempdir: predict must leave none
    # behind (MLflow's own download of a runs:/ URI left a copy of the model in /tmp for every call).
    results = []
    # An untrained model's boxes are noise, but at threshold 0 there are plenty of them to compare and draw.
    for uri in (f"models:/{UNTRAINED}@production", f"runs:/{untrained['current']}/model", local):
        out = tmp_path / f"{len(results)}.json"
        code, stdout, err = _predict(capsys, uri, *images, "--out", out, "--draw", tmp_path / "drawn",
                                     "--score-threshold", "0")
        assert code == 0, err
        assert f"drawn copies in {tmp_path / 'drawn'}" in stdout
        results.append(json.loads(out.read_text()))
        assert not list(own_tempdir.iterdir()), f"{uri} left {[p.name for p in own_tempdir.iterdir()]}"
    assert results[0] and results[0] == results[1] == results[2]
    for image in images:
        drawn = Image.open(tmp_path / "drawn" / image.name)
        original = Image.open(image).convert("RGB")
        assert drawn.size == original.size
        assert np.asarray(drawn.convert("RGB")).tolist() != np.asarray(original).tolist()  # boxes drawn on it


def test_a_model_folder_saved_in_the_trial_is_logged_as_it_is_and_one_missing_is_exported(store, tmp_path):
    """log_model uploads the folder a trial saved beside its checkpoint (a file only the trial wrote shows it was
    not exported again); for a checkpoint without one it exports the model itself. Both load as graphs whose
    outputs are the checkpoint's network's, and neither keeps MLflow's JSON copies of the input example."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from search.logged_model import MODEL_FOLDER, save_model_folder
    from search.tracking import MODEL_URI_TAG

    spec = _spec()
    torch.manual_seed(0)
    network = build_model(spec).eval()
    x = torch.rand(2, 3, spec.image_size, spec.image_size)
    with torch.no_grad():
        expected = network(x)
    for kind in ("saved", "missing"):
        checkpoint = store / f"folder-{kind}"
        checkpoint.mkdir()
        save_checkpoint(checkpoint, spec=spec, model=network, ema_model=None, deploy="raw", state={"epoch": 1})
        if kind == "saved":
            (save_model_folder(checkpoint) / "written-in-the-trial").write_text("")
        assert (checkpoint / MODEL_FOLDER).exists() == (kind == "saved")  # the driver writes no folder of its own
        run_id = _logged(store, checkpoint)
        client = MlflowClient()
        model = client.get_logged_model(client.get_run(run_id).data.tags[MODEL_URI_TAG].removeprefix("models:/"))
        files = {p.name for p in Path(model.artifact_location.removeprefix("file://")).rglob("*")}
        assert ("written-in-the-trial" in files) == (kind == "saved"), files
        assert "model.pt2" in files and not any("input_example" in name for name in files), files
        (tmp_path / kind).mkdir()
        loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/model", dst_path=str(tmp_path / kind))
        with torch.no_grad():
            outputs = loaded(x)
        for got, want in zip((*outputs[0], *outputs[1]), (*expected[0], *expected[1]), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_model_the_trial_cannot_save_leaves_no_folder_and_its_report_goes_on(store):
    """A checkpoint whose weights do not load (cut off): the trial's save fails without raising, so its last
    metrics are still reported, and no half-written folder is left for the driver to upload."""
    from search.logged_model import MODEL_FOLDER
    from search.trainable import add_model_folder
    from trainers.checkpoint import RAW_WEIGHTS

    spec = _spec()
    checkpoint = store / "cut-off"
    checkpoint.mkdir()
    save_checkpoint(checkpoint, spec=spec, model=build_model(spec), ema_model=None, deploy="raw", state={"epoch": 1})
    weights = checkpoint / RAW_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])
    add_model_folder({"full_budget": 1}, str(checkpoint))
    assert not (checkpoint / MODEL_FOLDER).exists()


def test_predict_says_what_a_folder_held_that_it_did_not_read(untrained, tmp_path, capsys):
    folder = tmp_path / "images"
    (folder / "more").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(folder / "one.png")
    Image.new("RGB", (64, 64)).save(folder / "more" / "two.png")
    (folder / "labels.txt").write_text("not an image")
    code, stdout, err = _predict(capsys, f"runs:/{untrained['current']}/model", folder, "--out", tmp_path / "d.json",
                                 "--score-threshold", "1")
    assert code == 0, err
    assert stdout.startswith("0 detections in 1 image (score >= 1) written to "), stdout
    assert stdout.splitlines()[-1] == ("not read (predict reads the image files directly in a folder): 1 subfolder "
                                       f"and 1 other file in {folder}")


def test_an_untrained_model_predicts_on_any_image_size(untrained, tmp_path, capsys):
    Image.new("RGB", (333, 171), (90, 120, 150)).save(tmp_path / "odd.jpg")
    out = tmp_path / "dets.json"
    code, stdout, err = _predict(capsys, f"runs:/{untrained['current']}/model", tmp_path / "odd.jpg", "--out", out,
                                 "--score-threshold", "0")
    assert code == 0, err
    detections = json.loads(out.read_text())
    assert stdout.startswith(f"{len(detections)} detections in 1 image ")
    assert detections and {d["category_id"] for d in detections} <= SHAPE_IDS
    for d in detections:  # clipped to the image itself, not to the letterboxed square
        x, y, w, h = d["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 333.01 and y + h <= 171.01


def test_the_graph_moves_to_another_device(untrained, tmp_path):
    """The GPU path, checked here on the meta device: the device torch.export burnt into the graph moves too."""
    import mlflow.pytorch

    from trainers.predict import on_device

    graph = mlflow.pytorch.load_model(f"runs:/{untrained['current']}/model", dst_path=str(tmp_path))
    assert any(n.kwargs.get("device") == torch.device("cpu") for n in graph.graph.nodes)
    moved = on_device(graph, torch.device("meta"))
    assert not any(n.kwargs.get("device") == torch.device("cpu") for n in moved.graph.nodes)
    classes, boxes = moved(torch.zeros(2, 3, 192, 192, device="meta"))
    assert classes[0].device.type == "meta" and classes[0].shape[0] == 2


def test_bad_inputs_are_one_line_naming_what_is_wrong(untrained, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "nested" / "inner").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(tmp_path / "nested" / "inner" / "deep.png")
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    model = f"runs:/{untrained['current']}/model"
    cases = [
        (["models:/nope@production", tmp_path / "ok.png"], "models:/nope@production: cannot load an MLflow model"),
        ([tmp_path / "no-such-folder", tmp_path / "ok.png"], "no-such-folder: cannot load an MLflow model"),
        ([model, tmp_path / "missing.jpg"], f"{tmp_path / 'missing.jpg'}: no such image file or folder"),
        ([model, tmp_path / "empty"], f"{tmp_path / 'empty'}: no image files"),
        ([model, tmp_path / "nested"], f"{tmp_path / 'nested'}: no image files (.jpg, .jpeg, .png, .bmp, .gif, .tif, "
                                       ".tiff, .webp) in this folder; it holds 1 subfolder, and subfolders are not "
                                       "searched"),
        ([model, tmp_path / "notes.png"], f"{tmp_path / 'notes.png'}: not a readable image"),
        ([f"runs:/{untrained['old']}/model", tmp_path / "ok.png"], "the model carries no categories.json"),
        ([model, tmp_path / "ok.png", "--draw", tmp_path / "notes.png"],  # said "File exists", exit 1
         f"--draw {tmp_path / 'notes.png'}: not a folder (the boxed copies are written into one)"),
        ([model, tmp_path / "ok.png", "--draw", tmp_path],  # replaced ok.png with its boxed copy, exit 0
         f"--draw {tmp_path}: holds images given to predict, which the boxed copies would overwrite"),
    ]
    for args, message in cases:
        code, _, err = _predict(capsys, *args, "--out", tmp_path / "dets.json")
        assert code == 2, (args, err)
        assert err.startswith("effsearch: error: ") and err.count("\n") == 1, err
        assert message in err, err
    assert not (tmp_path / "dets.json").exists()
    assert not np.asarray(Image.open(tmp_path / "ok.png")).any()  # still the black image it was, no boxes drawn
