"""What a variant costs: parameters, FLOPs (multiply-adds, counted on the meta device) and latency."""
from __future__ import annotations

import functools
import hashlib
import statistics
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from trainers.model import build_on_meta
from trainers.spec import ModelSpec


@dataclass(frozen=True)
class ModelShape:
    """What a build on meta tells without running the network: the parameter count and the architecture."""

    params: int
    # A digest of the built network's parameter and buffer names and shapes. Continuous width and depth
    # multipliers round to whole channels and blocks, so many specs build one network; this names it.
    architecture: str

    @property
    def params_m(self) -> float:
        return self.params / 1e6


@dataclass(frozen=True)
class ModelCost(ModelShape):
    gflops: float  # billions of multiply-adds per image, as the EfficientDet paper counts


# A trial counts its model once for the budget check and again inside `fit`, and a searcher may count a
# configuration it saw before: the count (build on meta plus a counted forward, about 0.8 s for a D0) is kept
# per spec.
@functools.lru_cache(maxsize=1024)
def model_cost(spec: ModelSpec) -> ModelCost:
    model = build_on_meta(spec).eval()
    x = torch.empty(1, 3, spec.image_size, spec.image_size, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    # FlopCounterMode counts a multiply-add as two FLOPs; the paper counts it as one.
    return ModelCost(**vars(_shape_of(model)), gflops=counter.get_total_flops() / 2 / 1e9)


@functools.lru_cache(maxsize=1024)
def model_shape(spec: ModelSpec) -> ModelShape:
    """model_cost without the counted forward, which is two thirds of its time: for a searcher that has no
    GFLOPs budget to check (it learns a trial's GFLOPs from the trial's own report)."""
    return _shape_of(build_on_meta(spec))


def _shape_of(model: torch.nn.Module) -> ModelShape:
    shapes = [(name, tuple(t.shape)) for name, t in (*model.named_parameters(), *model.named_buffers())]
    return ModelShape(params=sum(p.numel() for p in model.parameters()),
                      architecture=hashlib.sha1(repr(shapes).encode()).hexdigest()[:16])


def latency_ms(model: torch.nn.Module, image_size: int, *, repeats: int = 10, device: str = "cpu") -> float:
    """Median batch-1 forward time of the raw network on `device`."""
    model = model.eval().to(device)
    x = torch.randn(1, 3, image_size, image_size, device=device)
    times = []
    with torch.inference_mode():
        model(x)  # warm-up: allocator and kernel selection
        for _ in range(repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
