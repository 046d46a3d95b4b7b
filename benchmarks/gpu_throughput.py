"""EfficientDet-D0 at 512 px on one GPU: the trainer's images/s with bf16 and channels_last on and off, beside
a ceiling of the same step on batches already on the GPU.

- trainer: `trainers.loop.fit` as a trial runs it (loader processes decoding, augmenting and labelling
  anchors, pinned host memory, EMA, the non-finite check); fit's own `images_per_s`, which times the
  training loop of an epoch and not its evaluation or checkpoint.
- ceiling: the training step alone, from effdet, timm and torch (benchmarks/train_throughput.py's ceiling,
  moved to the GPU with the same precision and memory format): no loading, so the gap between the two is
  what feeding the GPU costs.

Estimator, fixed before any result was seen: for each setting, the median over every measured epoch
(epochs 2..4 of 2 repeats; epoch 1 holds cuDNN's autotuning and the loaders' start) with a bootstrap 90%
interval (10,000 resamples, seed 0), and the same for the ceiling over its timed stretches. Settings are
interleaved repeat by repeat, so a slow spell of the machine touches all of them.
Headline: the trainer's median images/s per GPU at the defaults (bf16, channels_last). On a machine without
CUDA it measures nothing and says so.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SETTINGS = [("bf16", True), ("bf16", False), ("off", True), ("off", False)]  # (amp, channels_last)
REPEATS = 2
EPOCHS = 4
BATCH = 16
TRAIN_IMAGES = 384
CEILING_STRETCHES = 3
if os.environ.get("GPU_THROUGHPUT_SHORT"):  # the short form, for a nearly spent GPU lease: the two extremes once
    SETTINGS, REPEATS, EPOCHS, TRAIN_IMAGES, CEILING_STRETCHES = [("bf16", True), ("off", False)], 1, 3, 256, 2
BOOTSTRAP_RESAMPLES = 10_000


def median_interval(values: list[float]) -> tuple[float, float, float]:
    rng = np.random.default_rng(0)
    samples = np.asarray(values)
    medians = np.median(rng.choice(samples, size=(BOOTSTRAP_RESAMPLES, len(samples))), axis=1)
    return statistics.median(values), float(np.percentile(medians, 5)), float(np.percentile(medians, 95))


class GpuCeiling:
    """train_throughput's ceiling step on the GPU, in the setting's precision and memory format."""

    def __init__(self, spec, paths, amp: str, channels_last: bool):
        from train_throughput import Ceiling, prepare_batches

        from trainers.model import build_model

        torch.manual_seed(0)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model = build_model(spec).cuda().to(memory_format=memory_format)
        batches = [(images.cuda().to(memory_format=memory_format), {k: v.cuda() for k, v in targets.items()})
                   for images, targets in prepare_batches(paths["train"]["annotations"], paths["train"]["images"],
                                                          model)]
        self.dtype = torch.bfloat16 if amp == "bf16" else None
        self.ceiling = Ceiling(model, batches)  # its own 3 warm-up steps run in float32
        self.steps = len(batches)
        self.run()  # warm-up in the setting's precision: cuDNN autotuning, the allocator

    def run(self) -> float:
        """images/s over one pass of the batches; Ceiling.run reads the loss once, at the end, inside its timing."""
        with torch.autocast("cuda", dtype=self.dtype, enabled=self.dtype is not None):
            return self.ceiling.run(self.steps)[0]


def main() -> None:
    if not torch.cuda.is_available():
        print("no CUDA device here: nothing to measure (run this on a GPU machine)")
        print("d0_512_images_per_s: unavailable")
        return
    from spaces import preset
    from trainers.loop import TrialPlan, fit
    from trainers.recipe import TrainConfig
    from trainers.shapes import make_shapes
    from trainers.validate import load_training_data

    torch.backends.cudnn.benchmark = True  # the ceiling's own choice; fit sets it for itself (recipe.placement)
    folder = tempfile.mkdtemp(prefix="gpu-throughput-")
    paths = make_shapes(folder, train_images=TRAIN_IMAGES, val_images=16, seed=0)
    data = load_training_data(paths["train"]["annotations"], paths["train"]["images"],
                              paths["val"]["annotations"], paths["val"]["images"], check="headers")[0]
    spec = preset("d0", num_classes=data.train.num_classes)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; D0 at {spec.image_size} px, batch {BATCH}, "
          f"{TRAIN_IMAGES} shapes images an epoch, {os.cpu_count()} CPUs", flush=True)
    trainer = {setting: [] for setting in SETTINGS}
    ceiling = {setting: [] for setting in SETTINGS}
    memory = {}
    for repeat in range(1, REPEATS + 1):
        for amp, channels_last in SETTINGS:
            recipe = TrainConfig(epochs=EPOCHS, batch_size=BATCH, amp=amp, channels_last=channels_last,
                                 eval_every=EPOCHS)
            reports = []
            torch.cuda.reset_peak_memory_stats()
            fit(TrialPlan(spec, data, recipe), lambda metrics, _: reports.append(metrics), device="cuda")
            trainer[(amp, channels_last)] += [r["images_per_s"] for r in reports[1:]]
            memory[(amp, channels_last)] = reports[-1]["peak_memory_mb"]
            top = GpuCeiling(spec, paths, amp, channels_last)
            ceiling[(amp, channels_last)] += [top.run() for _ in range(CEILING_STRETCHES)]
            del top
            torch.cuda.empty_cache()
            by_epoch = ", ".join(f"{r['images_per_s']:.0f}" for r in reports)
            stretches = ", ".join(f"{v:.0f}" for v in ceiling[(amp, channels_last)][-CEILING_STRETCHES:])
            print(f"repeat {repeat} amp={amp} channels_last={channels_last}: trainer {by_epoch} img/s by epoch; "
                  f"ceiling {stretches}", flush=True)
    print("\n| amp | channels_last | trainer images/s [90% CI] | ceiling images/s [90% CI] | trainer / ceiling "
          "| peak GPU memory (MB) |\n|---|---|---|---|---|---|")
    for setting in SETTINGS:
        t, c = median_interval(trainer[setting]), median_interval(ceiling[setting])
        print(f"| {setting[0]} | {setting[1]} | {t[0]:.0f} [{t[1]:.0f}, {t[2]:.0f}] | {c[0]:.0f} [{c[1]:.0f}, "
              f"{c[2]:.0f}] | {t[0] / c[0]:.2f} | {memory[setting]:.0f} |")
    print(f"d0_512_images_per_s: {median_interval(trainer[SETTINGS[0]])[0]:.0f}")


if __name__ == "__main__":
    main()
