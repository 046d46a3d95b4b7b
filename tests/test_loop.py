"""The per-worker loop without Ray: per-epoch reports, a final checkpoint, and its reload."""
import pytest
import torch

from trainers.loop import DataPaths, fit, load_model
from trainers.recipe import TrainConfig, build_schedule
from trainers.spec import ModelSpec

SPEC = ModelSpec(num_classes=3, backbone_family="efficientnet_lite", backbone_width=0.5, backbone_depth=0.5,
                 image_size=128, max_level=5, anchor_scale=1.5, fpn_channels=32, fpn_repeats=1, head_repeats=2,
                 bn_momentum=0.1)


def test_fit_reports_every_epoch_and_saves_a_reloadable_model(shapes, tmp_path):
    data = DataPaths(shapes["train"]["annotations"], shapes["train"]["images"],
                     shapes["val"]["annotations"], shapes["val"]["images"])
    reports = []

    def report(metrics, checkpoint_dir):
        saved = None
        if checkpoint_dir:
            saved = tmp_path / "ckpt"
            import shutil

            shutil.copytree(checkpoint_dir, saved)
        reports.append((metrics, saved))

    fit(SPEC, data, TrainConfig(epochs=2, batch_size=8, eval_every=2, threads=1), report)
    assert [m["epoch"] for m, _ in reports] == [1, 2]
    first, last = reports[0][0], reports[1][0]
    assert "map" not in first  # eval_every=2: the first epoch is not evaluated
    assert 0.0 <= last["map"] <= 1.0 and last["full_budget"] == 1 and last["latency_ms"] > 0
    assert last["latency_device"].startswith("cpu (") and last["peak_memory_mb"] > 100
    assert last["eval_images"] == 12 and last["world_size"] == 1 and last["shard_overlap"] == 0
    assert last["loss"] < first["loss"]
    assert reports[0][1] is None and reports[1][1] is not None
    model, spec = load_model(reports[1][1])
    assert spec == SPEC
    with torch.no_grad():
        classes, _ = model(torch.zeros(1, 3, 128, 128))
    assert classes[0].shape == (1, 9 * 3, 16, 16)


def test_schedule_warms_up_then_decays_to_zero():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    schedule = build_schedule(optimizer, TrainConfig(epochs=4, warmup_epochs=1), steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert lrs[0] < lrs[5] < lrs[10] and max(lrs) == lrs[10] == 1.0
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.01


def test_non_finite_loss_stops_with_epoch_and_step(shapes):
    from trainers.loop import NonFiniteLoss

    data = DataPaths(shapes["train"]["annotations"], shapes["train"]["images"],
                     shapes["val"]["annotations"], shapes["val"]["images"])
    # An absurd learning rate blows the weights up within a few steps.
    with pytest.raises(NonFiniteLoss, match=r"^loss became non-finite at epoch 1 step [2-4]$"):
        fit(SPEC, data, TrainConfig(epochs=1, batch_size=8, lr=1e12, warmup_epochs=0, threads=1),
            lambda metrics, checkpoint: None)
