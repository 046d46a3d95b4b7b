"""The detector space, the cost of each detector choice, and `describe --choices`."""
import json

import optuna
import pytest

from search.cli import main
from spaces.detector import DetectorBounds, choice_costs, detector
from spaces.search_spaces import enqueued_params, make_space, space_parameters
from spaces.presets import preset
from trainers.spec import ModelSpec
from trainers.typed import ConfigError


def test_the_anchor_head_proposes_its_box_loss_and_assigner():
    proposed = detector(optuna.trial.FixedTrial({"head": "anchor", "neck": "pan", "box_loss": "ciou",
                                                 "assigner": "atss", "label_smoothing": 0.05, "mixup_prob": 0.25}))
    assert proposed == {"spec": {"neck": "pan", "head": "anchor", "label_smoothing": 0.05, "box_loss": "ciou",
                                 "assigner": "atss"}, "train": {"mixup_prob": 0.25}}
    ModelSpec.from_dict({**proposed["spec"], "num_classes": 3})  # a valid spec


def test_the_center_head_proposes_neither():
    proposed = detector(optuna.trial.FixedTrial({"head": "center", "neck": "fpn", "label_smoothing": 0.0,
                                                 "mixup_prob": 0.0}))
    assert proposed["spec"] == {"neck": "fpn", "head": "center", "label_smoothing": 0.0}


def test_a_single_choice_is_held_not_searched():
    bounds = DetectorBounds(heads=("anchor",), necks=("fpn",), box_losses=("giou",), assigners=("atss",),
                            label_smoothing=(0.0, 0.0), mixup_prob=(0.0, 0.0))
    assert space_parameters(lambda t: detector(t, bounds)) == {}
    assert detector(optuna.trial.FixedTrial({}), bounds)["spec"] == {
        "neck": "fpn", "head": "anchor", "label_smoothing": 0.0, "box_loss": "giou", "assigner": "atss"}


@pytest.mark.parametrize("raw, fragment", [
    ({"necks": ["bifpn", "nasfpn"]}, "job.search.bounds.detector.necks: must be distinct values among bifpn, pan, fpn"),
    ({"heads": []}, "heads: must be distinct values"),
    ({"box_losses": ["giou", "giou"]}, "box_losses: must be distinct values"),
    ({"assigners": "atss"}, "assigners"),
    ({"label_smoothing": [0.2, 0.1]}, "label_smoothing: low 0.2 is above high 0.1"),
    ({"label_smoothing": [0.0, 0.6]}, "label_smoothing: must lie in [0, 0.5)"),
    ({"mixup_prob": [0.0, 1.5]}, "mixup_prob: must lie in [0, 1]"),
    ({"neck": ["fpn"]}, "job.search.bounds.detector.neck: unknown key"),
])
def test_bad_bounds_name_the_key(raw, fragment):
    with pytest.raises(ConfigError) as err:
        make_space(["compound", "detector"], {"detector": raw})
    assert fragment in str(err.value)


def test_it_composes_with_a_model_space_and_training():
    space = make_space(["compound", "detector", "training"], {"detector": {"heads": ["anchor"]}})
    params = space_parameters(space)
    assert {"neck", "box_loss", "assigner", "label_smoothing", "mixup_prob", "lr", "phi"} <= set(params)
    assert "head" not in params
    with pytest.raises(ConfigError, match="exactly one model space"):
        make_space(["detector", "training"])
    # A mapping in search.enqueue may pin detector choices; a value outside the bounds names the key.
    assert enqueued_params(["compound", "detector"], [{"neck": "fpn", "head": "center"}]) == [
        {"neck": "fpn", "head": "center"}]
    with pytest.raises(ConfigError, match=r"enqueue\[0\]\.neck: 'nasfpn' is not one of"):
        enqueued_params(["compound", "detector"], [{"neck": "nasfpn"}])


def test_every_choice_has_a_cost_at_d0_and_training_only_choices_cost_the_same():
    d0 = preset("d0")
    rows = {(r["field"], r["value"]): r for r in choice_costs(d0)}
    assert set(rows) == {("neck", n) for n in ("bifpn", "pan", "fpn")} | {("head", h) for h in ("anchor", "center")} \
        | {("assigner", a) for a in ("iou", "atss")} | {("box_loss", b) for b in ("huber", "giou", "diou", "ciou")}
    base = rows[("neck", "bifpn")]
    assert base["gflops"] == pytest.approx(2.49, abs=0.03) and base["current"]  # the paper's D0: 2.5 B
    # PANet has a node more per level than BiFPN (6 vs 8 at P3-P7, with fewer inputs each): it costs more;
    # the top-down FPN less. The center head drops four of the five levels' class and box towers.
    assert rows[("neck", "pan")]["gflops"] > base["gflops"] > rows[("neck", "fpn")]["gflops"]
    assert rows[("head", "center")]["gflops"] < base["gflops"] - 0.2
    assert rows[("head", "center")]["params"] < base["params"]
    for field in ("assigner", "box_loss"):
        assert {(r["gflops"], r["params"]) for k, r in rows.items() if k[0] == field} == {
            (base["gflops"], base["params"])}


def test_describe_choices_prints_each_choice(tmp_path, capsys):
    # In process: the counts above are cached, and a second interpreter would count D0 eleven times again.
    assert main(["describe", "d0", "--choices", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {(r["field"], r["value"]) for r in info["choices"]} == {(f, v) for f, v in (
        ("neck", "bifpn"), ("neck", "pan"), ("neck", "fpn"), ("head", "anchor"), ("head", "center"),
        ("assigner", "iou"), ("assigner", "atss"), ("box_loss", "huber"), ("box_loss", "giou"),
        ("box_loss", "diou"), ("box_loss", "ciou"))}
    spec = tmp_path / "spec.yaml"
    spec.write_text("num_classes: 3\nimage_size: 256\nmax_level: 5\nneck: fpn\nhead: center\n")
    assert main(["describe", str(spec), "--choices"]) == 0
    text = capsys.readouterr().out
    assert "neck       fpn" in text and "head       center" in text and text.count("(this spec)") == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_classes: 3\nneck: nasfpn\n")
    assert main(["describe", str(bad)]) != 0
    err = capsys.readouterr().err
    assert f"{bad}.neck: must be one of" in err and "Traceback" not in err


def test_a_trials_start_line_names_its_detector_parts_where_the_space_chose_them():
    import io
    from types import SimpleNamespace

    from search.progress import ProgressPrinter

    out = io.StringIO()
    printer = ProgressPrinter(total_trials=2, total_epochs=1, stream=out)
    printer.on_trial_start(0, [], SimpleNamespace(trial_id="a", config={"spec": {
        "image_size": 160, "fpn_channels": 48, "neck": "fpn", "head": "center"}}))
    printer.on_trial_start(0, [], SimpleNamespace(trial_id="b", config={"spec": {"image_size": 192}}))
    first, second = out.getvalue().splitlines()
    assert first.endswith("trial 1/2 started: image_size=160, fpn_channels=48, neck=fpn, head=center")
    assert second.endswith("trial 2/2 started: image_size=192")


def test_an_epoch_line_gives_the_loss_only_where_the_trial_reported_one():
    import io
    from types import SimpleNamespace

    from search.progress import ProgressPrinter

    out = io.StringIO()
    printer = ProgressPrinter(total_trials=2, total_epochs=6, stream=out)
    trained, replayed = SimpleNamespace(trial_id="a"), SimpleNamespace(trial_id="b")
    printer.on_trial_result(0, [], trained, {"epoch": 1, "map": 0.25, "loss": 1.5, "gflops": 0.12, "epoch_s": 30})
    printer.on_trial_result(0, [], replayed, {"epoch": 2, "map": 0.3, "gflops": 0.05, "epoch_s": 14})
    first, second = out.getvalue().splitlines()
    assert first.endswith("trial 1/2 epoch 1/6: AP 0.250, loss 1.500, 0.120 GFLOPs, 30 s/epoch")
    assert second.endswith("trial 2/2 epoch 2/6: AP 0.300, 0.050 GFLOPs, 14 s/epoch")
