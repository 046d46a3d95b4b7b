"""It learns: the CPU space's default variant reaches a real AP on shapes within a few minutes of training."""
import pytest


@pytest.mark.slow
def test_default_variant_reaches_ap_045(trained_shapes_model):
    """The recipe in conftest.trained_shapes_model: the CPU space's default variant (0.10 GFLOPs), 5 epochs on the
    demo's 600 shapes images."""
    final, seconds = trained_shapes_model["metrics"], trained_shapes_model["seconds"]
    print(f"default variant: AP {final['map']:.3f} after {seconds:.0f} s of training on 2 threads")
    assert final["map"] >= 0.45
