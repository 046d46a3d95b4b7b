"""SyncBN on gloo: two processes with half the batch each match one process on the whole batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from timm.layers import BatchNormAct2d
from torch import nn

from trainers.syncbn import CpuSyncBatchNorm, CpuSyncBatchNormAct, convert_sync_batchnorm

TOL = 1e-5


def _make(kind: str) -> nn.Module:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6, momentum=0.1) if kind == "bn" else BatchNormAct2d(6, act_layer=nn.ReLU6)
    with torch.no_grad():  # non-trivial affine parameters, so their gradients are checked too
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), bn)


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 5, 5, generator=g) * 2 + 0.5
    upstream = torch.randn(8, 6, 5, 5, generator=g)  # a fixed upstream gradient for the backward pass
    return x, upstream


def _step(model, x, upstream):
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y * upstream).sum().backward()
    bn = model[1]
    return {"y": y.detach(), "x_grad": x.grad, "w_grad": bn.weight.grad, "b_grad": bn.bias.grad,
            "conv_grad": model[0].weight.grad, "running_mean": bn.running_mean, "running_var": bn.running_var}


def _worker(rank, world, port, kind, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = convert_sync_batchnorm(_make(kind), "cpu").train()
        x, upstream = _data()
        half = slice(rank * 4, rank * 4 + 4)
        got = _step(model, x[half], upstream[half])
        # Parameter gradients are per-rank partial sums (DDP would all-reduce them): sum them here too.
        for key in ("w_grad", "b_grad", "conv_grad"):
            dist.all_reduce(got[key])
        torch.save({k: v.clone() for k, v in got.items()}, folder / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["bn", "bn_act"])
def test_two_gloo_processes_match_one_process(kind, tmp_path):
    reference_model = _make(kind).train()
    x, upstream = _data()
    expected = _step(reference_model, x, upstream)

    # Results come back in files: an mp.Manager is forked from this process, and after the Ray tests (their threads)
    # a forked Manager once died of "double free or corruption", failing the test on nothing SyncBN did.
    mp.spawn(_worker, args=(2, _free_port(), kind, tmp_path), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        half = slice(rank * 4, rank * 4 + 4)
        torch.testing.assert_close(got["y"], expected["y"][half], atol=TOL, rtol=TOL)
        torch.testing.assert_close(got["x_grad"], expected["x_grad"][half], atol=TOL, rtol=TOL)
        for key in ("w_grad", "b_grad", "conv_grad", "running_mean", "running_var"):
            torch.testing.assert_close(got[key], expected[key], atol=TOL, rtol=TOL)


def test_conversion_swaps_every_batchnorm_and_keeps_state():
    from trainers.model import build_model
    from trainers.spec import ModelSpec

    model = build_model(ModelSpec(num_classes=3, backbone_family="efficientnet_lite", backbone_width=0.5,
                                  backbone_depth=0.5, image_size=128, max_level=5, fpn_channels=32,
                                  fpn_repeats=1, head_repeats=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    n_act = sum(isinstance(m, BatchNormAct2d) for m in model.modules())
    converted = convert_sync_batchnorm(model, "cpu")
    assert sum(isinstance(m, CpuSyncBatchNorm) for m in converted.modules()) == n_bn
    assert sum(isinstance(m, CpuSyncBatchNormAct) for m in converted.modules()) == n_act > 0
    assert not any(type(m) in (nn.BatchNorm2d, BatchNormAct2d) for m in converted.modules())
    after = converted.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_single_process_falls_back_to_plain_batchnorm():
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(4)
    synced = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4)), "cpu")[0]
    x = torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(synced(x), plain(x))


def _bf16_worker(rank, world, port, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        bn = CpuSyncBatchNorm(6).train()
        x = _offset_data()[rank * 4:rank * 4 + 4].to(torch.bfloat16)  # what autocast hands a BN under amp: bf16
        torch.save({"y": bn(x).float().detach(), "running_var": bn.running_var.clone()}, folder / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _offset_data():
    # A large mean against a small spread: E[x^2] - E[x]^2 then needs more than bf16's 8 mantissa bits.
    return torch.randn(8, 6, 5, 5, generator=torch.Generator().manual_seed(2)) * 0.5 + 50


def test_bf16_inputs_keep_float32_statistics(tmp_path):
    x = _offset_data()
    expected = nn.BatchNorm2d(6).train()
    want = expected(x.to(torch.bfloat16).float()).detach()  # the same bf16-rounded values, statistics in float32
    mp.spawn(_bf16_worker, args=(2, _free_port(), tmp_path), nprocs=2, join=True)  # files, not a Manager: see above
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        # bf16 output rounding (~0.4% of a value of order 1) is all that may differ.
        torch.testing.assert_close(got["y"], want[rank * 4:rank * 4 + 4], atol=0.03, rtol=0.01)
        torch.testing.assert_close(got["running_var"], expected.running_var, atol=1e-3, rtol=1e-3)
