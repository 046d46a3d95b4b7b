"""It learns: the CPU space's default variant reaches a real AP on shapes within a few minutes of training."""
import time

import optuna
import pytest

from spaces.search_spaces import lite_cpu
from conftest import training_data

from trainers.loop import TrialPlan, fit
from trainers.recipe import TrainConfig
from trainers.shapes import make_shapes
from trainers.spec import ModelSpec

# phi=1: EfficientDet-Lite at width 0.55, depth 0.6, 192 px, BiFPN 48 channels x 2 cells (0.10 GFLOPs).
DEFAULT_VARIANT = {"phi": 1.0, "fpn_channels": 48, "fpn_repeats": 2}


@pytest.mark.slow
def test_default_variant_reaches_ap_045(tmp_path):
    paths = make_shapes(tmp_path / "shapes")  # the demo's 600 train / 100 val images
    spec = ModelSpec.from_dict({**lite_cpu(optuna.trial.FixedTrial(DEFAULT_VARIANT))["spec"], "num_classes": 3})
    history = []
    start = time.perf_counter()
    fit(TrialPlan(spec, training_data(paths), TrainConfig(epochs=5, eval_every=5, threads=2)),
        lambda m, _: history.append(m))
    seconds = time.perf_counter() - start
    final = history[-1]
    print(f"default variant: AP {final['map']:.3f} after {seconds:.0f} s of training on 2 threads")
    assert final["map"] >= 0.45
