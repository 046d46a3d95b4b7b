"""The per-worker loop without Ray: per-epoch reports and checkpoints, resume, precision, and failure messages."""
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainers.checkpoint import EMA_WEIGHTS, RAW_WEIGHTS, STATE_FILE, load_model
from conftest import training_data

from trainers.loop import NonFiniteLoss, OutOfMemory, TrialPlan, fit
from trainers.recipe import TrainConfig, build_optimizer, build_schedule
from trainers.spec import ModelSpec
from trainers.staging import staging_root
from trainers.typed import ConfigError, from_mapping

SPEC = ModelSpec(num_classes=3, backbone_family="efficientnet_lite", backbone_width=0.5, backbone_depth=0.5,
                 image_size=128, max_level=5, anchor_scale=1.5, fpn_channels=32, fpn_repeats=1, head_repeats=2,
                 bn_momentum=0.1)


def _plan(shapes, recipe: TrainConfig, spec: ModelSpec = SPEC) -> TrialPlan:
    return TrialPlan(spec, training_data(shapes), recipe)


class _Recorder:
    """A report callback that keeps every metrics dict and a copy of every checkpoint."""

    def __init__(self, folder, stop_after_epoch=None):
        self.folder, self.stop_after_epoch = folder, stop_after_epoch
        self.metrics, self.checkpoints, self.given = [], [], []

    def __call__(self, metrics, checkpoint_dir):
        saved = None
        if checkpoint_dir:
            self.given.append(Path(checkpoint_dir))
            saved = self.folder / f"epoch{metrics['epoch']}"
            shutil.copytree(checkpoint_dir, saved)
        self.metrics.append(metrics)
        self.checkpoints.append(saved)
        if metrics["epoch"] == self.stop_after_epoch:
            raise KeyboardInterrupt("killed")  # what a kill looks like from inside: the run stops here


def test_fit_reports_and_checkpoints_every_epoch_and_saves_a_reloadable_model(shapes, tmp_path):
    reports = _Recorder(tmp_path)
    fit(_plan(shapes, TrainConfig(epochs=4, batch_size=8, eval_every=2, threads=1)), reports)
    assert [m["epoch"] for m in reports.metrics] == [1, 2, 3, 4]
    # eval_every=2: only epochs 2 and 4 were scored, and only their reports carry scores.
    assert [m["epoch"] for m in reports.metrics if "map" in m] == [2, 4]
    assert not any(key.startswith("map") for key in reports.metrics[2])
    first, last = reports.metrics[0], reports.metrics[-1]
    assert 0.0 <= last["map"] <= 1.0 and last["full_budget"] == 1 and last["latency_ms"] > 0
    assert last["map"] == max(last["map_raw"], last["map_ema"])  # both weights scored; the better one counts
    assert last["latency_device"].startswith("cpu (") and last["peak_memory_mb"] > 100
    assert last["eval_images"] == 12 and last["world_size"] == 1 and last["shard_overlap"] == 0
    assert last["loss"] < first["loss"]
    assert all(folder is not None for folder in reports.checkpoints)
    # Each was staged (trainers/staging.py), where a later trial removes it if this one is killed, and is gone.
    assert all(given.parent.parent == staging_root() and not given.exists() for given in reports.given)
    model, spec = load_model(reports.checkpoints[-1])
    assert spec == SPEC
    with torch.no_grad():
        classes, _ = model(torch.zeros(1, 3, 128, 128))
    assert classes[0].shape == (1, 9 * 3, 16, 16)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux's per-process peak reset")
def test_the_memory_peak_is_the_runs_own_not_the_processs(shapes, tmp_path):
    """Tune runs one trial after another in the same process: a peak 1 GiB above anything this run needs, left by
    what ran before it, is not reported as the run's."""
    import numpy as np

    def process_peak_mb():
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024

    earlier = np.ones(2**30 // 8)  # touched, so resident: what a larger earlier trial left as the process's peak
    del earlier
    before = process_peak_mb()
    reports = _Recorder(tmp_path)
    fit(_plan(shapes, TrainConfig(epochs=1, batch_size=8, threads=1)), reports)
    assert 100 < reports.metrics[-1]["peak_memory_mb"] < before - 512, (reports.metrics[-1]["peak_memory_mb"], before)


def test_killed_run_resumes_at_the_next_epoch_and_ends_where_an_uninterrupted_one_does(shapes, tmp_path):
    recipe = TrainConfig(epochs=3, batch_size=8, eval_every=1, threads=1, loader_workers=1)
    whole = _Recorder(tmp_path / "whole")
    fit(_plan(shapes, recipe), whole)

    broken = _Recorder(tmp_path / "broken", stop_after_epoch=1)
    with pytest.raises(KeyboardInterrupt):
        fit(_plan(shapes, recipe), broken)
    resumed = _Recorder(tmp_path / "resumed")
    fit(_plan(shapes, recipe), resumed, resume_from=str(broken.checkpoints[0]))

    assert [m["epoch"] for m in resumed.metrics] == [2, 3]
    assert all(m["resumed_from_epoch"] == 1 for m in resumed.metrics)
    for key in ("loss", "map", "map_raw", "map_ema", "map50", "lr"):
        assert resumed.metrics[-1][key] == pytest.approx(whole.metrics[-1][key], rel=1e-5, abs=1e-7), key
    # The same optimizer state (AdamW moments, step counts) and the same weights, raw and averaged.
    ours = torch.load(resumed.checkpoints[-1] / STATE_FILE, weights_only=True)["optimizer"]["state"]
    theirs = torch.load(whole.checkpoints[-1] / STATE_FILE, weights_only=True)["optimizer"]["state"]
    assert ours.keys() == theirs.keys()
    for index in ours:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(ours[index][name], theirs[index][name], rtol=1e-4, atol=1e-6)
    for weights in (RAW_WEIGHTS, EMA_WEIGHTS):
        a, b = load_file(resumed.checkpoints[-1] / weights), load_file(whole.checkpoints[-1] / weights)
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_bf16_autocast_trains_and_scores_on_cpu(shapes, tmp_path, monkeypatch):
    """amp: bf16 through fit itself: the loss falls, and every convolution returns bfloat16, in the training steps
    and in the scoring of both weight sets (a float32 run passes the loss check alone). The FLOPs count and the
    latency run the float32 network that is exported, and are not counted here."""
    from torch.nn.modules.module import register_module_forward_hook

    import trainers.loop

    seen, phase = {"training": set(), "scoring": set()}, []
    scoring = trainers.loop.evaluate_all

    def scored(*args, **kwargs):  # the real evaluate_all, marked so the hook can tell its convolutions apart
        phase.append("scoring")
        try:
            return scoring(*args, **kwargs)
        finally:
            phase.pop()

    def record(module, args, out):
        if isinstance(module, torch.nn.Conv2d) and (module.training or phase):
            seen["training" if module.training else "scoring"].add(out.dtype)

    monkeypatch.setattr(trainers.loop, "evaluate_all", scored)
    reports = _Recorder(tmp_path)
    hook = register_module_forward_hook(record)  # every module's forward, the ones fit builds included
    try:
        fit(_plan(shapes, TrainConfig(epochs=2, batch_size=8, eval_every=2, threads=1, amp="bf16")), reports)
    finally:
        hook.remove()
    first, last = reports.metrics
    assert last["loss"] < first["loss"] and 0.0 <= last["map"] <= 1.0
    assert seen == {"training": {torch.bfloat16}, "scoring": {torch.bfloat16}}


def test_a_float32_checkpoint_resumes_under_fp16(shapes, tmp_path):
    """A trial restarted on a machine whose precision differs (CPU or bf16 before, fp16 now): the checkpoint's
    loss scaler state is empty, and an fp16 run's enabled GradScaler refused it ("the source state dict is
    empty"); it now starts its scaler afresh and continues at the next epoch."""
    before = _Recorder(tmp_path / "before", stop_after_epoch=1)
    with pytest.raises(KeyboardInterrupt):
        fit(_plan(shapes, TrainConfig(epochs=2, batch_size=8, eval_every=2, threads=1, amp="off")), before)
    assert torch.load(before.checkpoints[0] / STATE_FILE, weights_only=True)["scaler"] == {}
    after = _Recorder(tmp_path / "after")
    fit(_plan(shapes, TrainConfig(epochs=2, batch_size=8, eval_every=2, threads=1, amp="fp16")), after,
        resume_from=str(before.checkpoints[0]))
    assert [m["epoch"] for m in after.metrics] == [2]
    assert torch.load(after.checkpoints[0] / STATE_FILE, weights_only=True)["scaler"]["scale"] > 0


def test_adamw_scales_lr_by_the_square_root_of_the_batch():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    optimizer = build_optimizer(model, TrainConfig(optimizer="adamw", lr=0.01, batch_size=16, lr_batch=16), 4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.02)  # 0.01 per 16 images, global batch 64: x sqrt(4)


def test_every_module_the_loop_runs_sits_on_the_model_device(shapes):
    """Built on the meta device, anything left on the CPU (effdet builds its anchors there) shows up here.

    The EMA is off: timm's ModelEmaV3 makes a torch.Generator on its module's device, which meta cannot
    host. Its module is a deepcopy of the model after placement, and its predictor is built as the raw one.
    """
    from trainers.loop import build_modules

    meta = torch.device("meta")
    modules = build_modules(_plan(shapes, TrainConfig(ema=False)), meta, world_size=1)
    placed = [modules.model, modules.train_bench, *modules.predictors.values()]
    assert set(modules.predictors) == {"raw"}
    for module in placed:
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            assert tensor.device == meta, f"{type(module).__name__}.{name} is on {tensor.device}"


@pytest.mark.parametrize("parts", [{}, {"neck": "pan", "box_loss": "giou", "assigner": "atss"}, {"neck": "fpn"},
                                   {"head": "center"}, {"head": "center", "neck": "pan"}],
                         ids=["anchor", "anchor-pan-giou-atss", "anchor-fpn", "center", "center-pan"])
def test_ddp_looks_for_unused_parameters_exactly_where_a_step_leaves_some_without_a_gradient(shapes, parts):
    """One real training step of each detector's bench, on a batch of the real loader: the parameters with no
    gradient are the ones DDP would wait for forever, so ddp_options must ask it to look for them there, and
    only there (the search costs a graph walk a step)."""
    from trainers.data import to_model_input
    from trainers.loop import build_modules, data_loaders, ddp_options
    from trainers.recipe import placement

    torch.manual_seed(0)
    plan = _plan(shapes, TrainConfig(batch_size=2, ema=False, threads=1), SPEC.replace(**parts))
    modules = build_modules(plan, torch.device("cpu"), world_size=1)
    loaders = data_loaders(plan, modules.model, placement(plan.recipe, torch.device("cpu")), 0, 1, 1)
    images, targets = next(iter(loaders[3]))  # the training loader
    modules.train_bench(to_model_input(images, "cpu"), targets)["loss"].backward()
    unused = [name for name, p in modules.model.named_parameters() if p.requires_grad and p.grad is None]
    assert ddp_options(plan.spec).get("find_unused_parameters", False) == bool(unused), unused


def test_ranks_draw_different_drop_path_masks_and_a_resumed_epoch_draws_the_same(shapes):
    """The model's own stochastic depth (timm's drop_path, rate 0.2), in training mode, on one input: after the
    seeding of the loop's epoch, rank 0 and rank 1 drop different paths, the same rank and epoch drop the same
    ones again (a resume), and one worker's generator is left as it was (its checkpoint restores that)."""
    from trainers.loop import build_modules, seed_ranks_apart

    torch.manual_seed(0)
    model = build_modules(_plan(shapes, TrainConfig(ema=False), SPEC.replace(drop_path_rate=0.2)),
                          torch.device("cpu"), world_size=1).model.train()
    image = torch.rand(4, 3, SPEC.image_size, SPEC.image_size)

    def features(rank: int, epoch: int) -> torch.Tensor:
        seed_ranks_apart(0, rank, 2, epoch)
        with torch.no_grad():
            return model.backbone(image)[-1]

    rank0, rank1, rank0_again = features(0, 3), features(1, 3), features(0, 3)
    assert not torch.equal(rank0, rank1)
    assert torch.equal(rank0, rank0_again) and not torch.equal(rank0, features(0, 4))
    state = torch.get_rng_state()
    seed_ranks_apart(0, 0, 1, 3)
    assert torch.equal(torch.get_rng_state(), state)


def test_sgd_and_linear_lr_scaling():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    optimizer = build_optimizer(model, TrainConfig(optimizer="sgd", lr=0.01, batch_size=8, lr_batch=16), 4)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.02)  # 0.01 per 16 images, global batch 32
    decayed, plain = optimizer.param_groups
    assert [p.ndim for p in decayed["params"]] == [4] and plain["weight_decay"] == 0.0  # no decay on norms, biases


@pytest.mark.parametrize("raw, message", [
    ({"optimizer": "adam"}, "train.optimizer: must be one of adamw, sgd, got 'adam'"),
    ({"amp": "fp8"}, "train.amp: must be one of auto, bf16, fp16, off"),
    ({"scale_jitter": [1.5, 0.5]}, "train.scale_jitter: must be [low, high] with 0 < low <= high"),
    ({"scale_jitter": [1.0]}, "train.scale_jitter: must be a list of 2 values"),
    ({"ema_decay": 1.0}, "train.ema_decay: must be < 1"),
])
def test_bad_recipe_values_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=rf"^{message}".replace("[", r"\[")):
        from_mapping(TrainConfig, raw, "train")


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
    # An absurd learning rate blows the weights up within a few steps.
    with pytest.raises(NonFiniteLoss, match=r"^loss became non-finite at epoch 1 step [2-4]$"):
        fit(_plan(shapes, TrainConfig(epochs=1, batch_size=8, lr=1e12, warmup_epochs=0, threads=1)),
            lambda metrics, checkpoint: None)


def test_out_of_memory_names_batch_size_and_resolution(shapes):
    # No GPU here: the error CUDA's allocator raises is raised instead from inside the first training forward.
    def exhaust(module, inputs):
        if module.training and inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].device.type == "cpu":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    handle = torch.nn.modules.module.register_module_forward_pre_hook(exhaust)
    try:
        with pytest.raises(OutOfMemory, match=r"^out of CPU memory at epoch 1 step 1: batch size 8 per worker at "
                                              r"resolution 128x128 \(float32\) does not fit; lower train.batch_size"):
            fit(_plan(shapes, TrainConfig(epochs=1, batch_size=8, threads=1, ema=False)),
                lambda metrics, checkpoint: None)
    finally:
        handle.remove()


def test_resume_reads_a_cuda_checkpoint_onto_the_cpu_first(shapes, tmp_path):
    """Rank 0 on CUDA saves tensors tagged cuda:0; every resumed rank must not materialise them on GPU 0.

    There is no GPU here, so the checkpoint's tensors are tagged cuda:0 the way torch.save tags CUDA storage:
    loading them without map_location fails on this machine, just as it lands on GPU 0 on a GPU machine.
    """
    from trainers.checkpoint import load_checkpoint
    from trainers.model import build_model

    reports = _Recorder(tmp_path)
    fit(_plan(shapes, TrainConfig(epochs=1, batch_size=8, threads=1, ema=False)), reports)
    folder = reports.checkpoints[0]
    state = torch.load(folder / STATE_FILE, weights_only=True)
    assert "cuda_rng" not in state  # a CPU run has no CUDA generator to keep
    state["cuda_rng"] = torch.get_rng_state()  # a GPU run's, which a resume on the CPU must leave alone
    # Taggers run in priority order, lowest first: this one answers before torch's own CPU tagger.
    entry = (-1, lambda storage: "cuda:0" if storage.device.type == "cpu" else None, lambda obj, location: None)
    torch.serialization._package_registry.insert(0, entry)
    try:
        torch.save(state, folder / STATE_FILE)
    finally:
        torch.serialization._package_registry.remove(entry)
    loaded = load_checkpoint(folder, model=build_model(SPEC), ema_model=None)
    assert loaded["epoch"] == 1 and "cuda_rng" not in loaded
    moments = [t for s in loaded["optimizer"]["state"].values() for t in s.values() if torch.is_tensor(t)]
    assert moments and all(t.device.type == "cpu" for t in moments)


def test_a_plan_with_backbone_weights_trains_from_them(shapes, tmp_path):
    import timm

    from trainers.loop import build_modules

    spec = SPEC.replace(backbone_width=1.0, backbone_depth=1.0)  # efficientnet_lite0's size
    source = timm.create_model("efficientnet_lite0", pretrained=False)
    torch.save(source.state_dict(), tmp_path / "lite0.pth")
    plan = TrialPlan(spec, training_data(shapes), TrainConfig(ema=True), backbone_weights=str(tmp_path / "lite0.pth"))
    modules = build_modules(plan, torch.device("cpu"), world_size=1)
    expected = source.state_dict()
    for name, tensor in modules.model.backbone.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    for name, tensor in modules.ema.module.backbone.state_dict().items():  # the EMA starts from them too
        assert torch.equal(tensor, expected[name]), name


def test_workers_train_from_the_index_without_reading_the_annotation_files(tmp_path):
    """The driver parses the JSON once; a worker that parsed it again would fail here, where it is gone."""
    import shutil

    from trainers.shapes import make_shapes

    paths = make_shapes(tmp_path / "shapes", train_images=16, val_images=4, seed=5)
    data = training_data(paths)
    for split in ("train", "val"):
        shutil.move(paths[split]["annotations"], tmp_path / f"{split}-moved.json")
    reports = _Recorder(tmp_path)
    fit(TrialPlan(SPEC, data, TrainConfig(epochs=1, batch_size=8, threads=1, ema=False)), reports)
    assert reports.metrics[-1]["eval_images"] == 4


def test_cache_budget_is_per_node_and_a_split_that_does_not_fit_is_not_cached(shapes):
    from trainers.loop import cache_plan

    data = training_data(shapes)  # 32 train and 12 val images of 256x256: 196,608 bytes each decoded
    image = 256 * 256 * 3
    val_shard = range(0, 12, 2)  # rank 0 of 2 reads 6 validation images
    assert data.train.decoded_bytes() == 32 * image and data.val.decoded_bytes(val_shard) == 6 * image
    # Room for everything in each of 4 processes' share.
    assert cache_plan(data.train, data.val, val_shard, 4 * 38 * image, 4) == (True, True)
    # The share holds the validation shard but not the training split as well: train is not cached.
    assert cache_plan(data.train, data.val, val_shard, 4 * 37 * image, 4) == (False, True)
    # The same node budget split among 8 processes holds neither.
    assert cache_plan(data.train, data.val, val_shard, 4 * 5 * image, 8) == (False, False)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_evaluation_predicts_under_the_training_autocast(shapes, device):
    """Both weight sets are scored in the trial's precision (bf16 here), not in float32: every convolution of
    every predictor returns bfloat16 while evaluate_all runs."""
    from trainers.evaluate import CocoEvaluator, evaluate_all
    from trainers.loop import build_modules, data_loaders
    from trainers.recipe import placement

    plan = _plan(shapes, TrainConfig(batch_size=4, amp="bf16", loader_workers=0))
    place = placement(plan.recipe, torch.device(device), None)
    modules = build_modules(plan, torch.device(device), world_size=1)
    *_, val_loader = data_loaders(plan, modules.model, place, rank=0, world_size=1, local_world_size=1)
    seen = []
    hooks = [conv.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
             for predictor in modules.predictors.values() for conv in predictor.modules()
             if isinstance(conv, torch.nn.Conv2d)]
    evaluator = CocoEvaluator(plan.data.val.coco_ground_truth(), plan.data.val.label_map)
    scores, _ = evaluate_all(modules.predictors, val_loader, evaluator, device=torch.device(device), rank=0,
                             world_size=1, channels_last=place.channels_last, amp_dtype=torch.bfloat16)
    for hook in hooks:
        hook.remove()
    assert set(modules.predictors) == {"raw", "ema"} and {"map_raw", "map_ema"} <= set(scores)
    assert seen and set(seen) == {torch.bfloat16}
