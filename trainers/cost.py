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
class ModelCost:
    params: int
    gflops: float  # billions of multiply-adds per image, as the EfficientDet paper counts
    # A digest of the built network's parameter and buffer names and shapes. Continuous width and depth
    # multipliers round to whole channels and blocks, so many specs build one network; this names it.
    architecture: str = ""

    @property
    def params_m(self) -> float:
        return self.params / 1e6


# A trial counts its model once for the budget check and again inside `fit`, and a searcher may count a
# configuration it saw before: the count (build on meta plus a counted forward, about 0.7 s) is kept per spec.
@functools.lru_cache(maxsize=1024)
def model_cost(spec: ModelSpec) -> ModelCost:
    model = build_on_meta(spec).eval()
    params = sum(p.numel() for p in model.parameters())
    x = torch.empty(1, 3, spec.image_size, spec.image_size, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    # FlopCounterMode counts a multiply-add as two FLOPs; the paper counts it as one.
    shapes = [(name, tuple(t.shape)) for name, t in (*model.named_parameters(), *model.named_buffers())]
    architecture = hashlib.sha1(repr(shapes).encode()).hexdigest()[:16]
    return ModelCost(params=params, gflops=counter.get_total_flops() / 2 / 1e9, architecture=architecture)


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
