"""The CUDA paths, run for real where a GPU exists (skipped elsewhere): placement, host syncs, precision, resume."""
import warnings

import pytest
import torch

from conftest import training_data
from trainers.loop import NONFINITE_CHECK_EVERY, TrialPlan, build_modules, fit
from trainers.recipe import TrainConfig
from trainers.spec import ModelSpec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

SPEC = ModelSpec(num_classes=3, backbone_family="efficientnet_lite", backbone_width=0.5, backbone_depth=0.5,
                 image_size=128, max_level=5, anchor_scale=1.5, fpn_channels=32, fpn_repeats=1, head_repeats=2,
                 bn_momentum=0.1)
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def two_lengths(tmp_path_factory):
    """Two datasets with the same validation split (its seed does not depend on the training size), one with
    twice the other's training images."""
    from trainers.shapes import make_shapes

    return [make_shapes(tmp_path_factory.mktemp(f"shapes{n}"), train_images=n, val_images=8, seed=5)
            for n in (128, 256)]


def test_every_module_sits_on_the_gpu_in_channels_last_and_predicts(shapes):
    modules = build_modules(TrialPlan(SPEC, training_data(shapes), TrainConfig()), CUDA, world_size=1)
    for module in [modules.model, modules.ema.module, modules.train_bench, *modules.predictors.values()]:
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            assert tensor.device.type == "cuda", f"{type(module).__name__}.{name} is on {tensor.device}"
    stem = modules.model.backbone.conv_stem.weight
    assert stem.is_contiguous(memory_format=torch.channels_last)
    images = torch.rand(2, 3, SPEC.image_size, SPEC.image_size, device=CUDA)
    info = {"img_scale": torch.ones(2, device=CUDA), "img_size": torch.full((2, 2), SPEC.image_size, device=CUDA)}
    with torch.inference_mode():
        for predictor in modules.predictors.values():
            assert predictor.eval()(images, info).shape[:2] == (2, 100)  # effdet's anchors on the GPU too


def _host_syncs_in_a_fit(shapes_paths) -> int:
    """Synchronising CUDA calls (torch's sync debug mode) during a one-epoch fit at batch 4."""
    plan = TrialPlan(SPEC, training_data(shapes_paths), TrainConfig(epochs=1, batch_size=4, loader_workers=0,
                                                                    ema=False))
    fit(plan, lambda metrics, folder: None, device=CUDA)  # warm-up: cuDNN's first calls sync on their own
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(plan, lambda metrics, folder: None, device=CUDA)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_training_steps_do_not_wait_for_the_gpu(two_lengths):
    """Doubling an epoch's steps (32 to 64) adds no host-device sync but the non-finite check's, one per 16
    steps: the loss is never read on the host inside a step. Evaluation (of the same validation split), the
    checkpoint and the latency probe cost the same in both fits and cancel out."""
    short, long = (_host_syncs_in_a_fit(paths) for paths in two_lengths)
    assert short > 0  # the mode does see syncs: the checks, evaluation and the checkpoint have some
    assert long - short <= 32 // NONFINITE_CHECK_EVERY + 1, (short, long)


@pytest.mark.parametrize("amp", ["auto", "fp16"])
def test_a_gpu_trial_trains_evaluates_and_resumes(shapes, tmp_path, amp):
    """Every train default (amp auto is bf16 on this GPU, channels_last, EMA, eval_every 2) for 2 epochs,
    then a resume from epoch 1's checkpoint onto the same device; fp16 runs with its GradScaler."""
    import shutil

    plan = TrialPlan(SPEC, training_data(shapes), TrainConfig(epochs=2, batch_size=8, amp=amp))
    reports, kept = [], []

    def report(metrics, folder):
        reports.append(metrics)
        kept.append(shutil.copytree(folder, tmp_path / f"epoch{metrics['epoch']}"))

    fit(plan, report, device=CUDA)
    assert [("map" in r) for r in reports] == [False, True]  # eval_every 2
    assert reports[-1]["latency_device"] == torch.cuda.get_device_name(CUDA)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in reports)
    resumed = []
    fit(plan, lambda metrics, folder: resumed.append(metrics), device=CUDA, resume_from=str(kept[0]))
    assert [(r["epoch"], r["resumed_from_epoch"]) for r in resumed] == [(2, 1)]
    assert 0.0 <= resumed[-1]["map"] <= 1.0


def test_the_gpu_memory_peak_is_the_runs_own(shapes):
    """A 1 GiB allocation before the run (a larger earlier trial in the same reused process) is not its peak."""
    earlier = torch.empty(2**30, dtype=torch.uint8, device=CUDA)
    del earlier
    reports = []
    fit(TrialPlan(SPEC, training_data(shapes), TrainConfig(epochs=1, batch_size=8)),
        lambda metrics, folder: reports.append(metrics), device=CUDA)
    assert 0 < reports[-1]["peak_memory_mb"] < 1024, reports[-1]["peak_memory_mb"]  # not reset: at least 1024
