"""Synchronised BatchNorm for every backend: timm's converter on CUDA, our own all-reduce BN on CPU/gloo.

torch.nn.SyncBatchNorm refuses CPU tensors, and timm has no CPU variant, so CpuSyncBatchNorm is written
here. It all-reduces [sum x, sum x^2, count] per channel in one differentiable collective
(torch.distributed.nn.functional.all_reduce), so the backward pass needs one all-reduce too.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from timm.layers import BatchNormAct2d
from timm.layers import convert_sync_batchnorm as timm_convert_sync_batchnorm
from torch import nn
from torch.distributed.nn.functional import all_reduce


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the whole global batch across the process group."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        return self._sync_normalise(x)

    def _sync_normalise(self, x: torch.Tensor) -> torch.Tensor:
        # The statistics are always float32: var = E[x^2] - E[x]^2 cancels catastrophically in bf16/fp16
        # (8 or 11 mantissa bits), which is what autocast hands us under amp.
        dtype, x = x.dtype, x.float()
        channels = x.shape[1]
        count = torch.full((1,), x.numel() / channels, dtype=x.dtype, device=x.device)
        local = torch.cat([x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)), count])
        total = all_reduce(local, op=dist.ReduceOp.SUM)
        n = total[-1]
        mean = total[:channels] / n
        var = total[channels:2 * channels] / n - mean * mean  # biased, as BatchNorm normalises with
        if self.track_running_stats and self.running_mean is not None:
            self._update_running_stats(mean.detach(), var.detach(), n.detach())
        scale = torch.rsqrt(var + self.eps)
        y = (x - mean[None, :, None, None]) * scale[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(dtype)

    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            unbiased = var * n / (n - 1).clamp(min=1)  # running_var is unbiased, as in nn.BatchNorm2d
            self.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)


class CpuSyncBatchNormAct(CpuSyncBatchNorm):
    """timm's BatchNormAct2d (BN, then drop, then activation) with synchronised statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def convert_sync_batchnorm(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Swap every BatchNorm (timm's BatchNormAct2d included) for its synchronised form on `device`'s backend."""
    if torch.device(device).type == "cuda":
        return timm_convert_sync_batchnorm(module)
    return _convert_cpu(module)


def _convert_cpu(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, CpuSyncBatchNorm):
        cls = CpuSyncBatchNormAct if isinstance(module, BatchNormAct2d) else CpuSyncBatchNorm
        out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if isinstance(module, BatchNormAct2d):
            out.act, out.drop = module.act, module.drop
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert_cpu(child))
    return out
