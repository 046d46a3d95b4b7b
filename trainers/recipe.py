"""Training settings (TrainConfig) and the optimizer, learning-rate schedule and precision they describe."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from trainers.typed import ConfigError

# Reading a job file builds a TrainConfig: torch is imported by the functions that build torch objects, so that a
# typo in the job is reported without waiting for torch (tests/test_cli.py).
if TYPE_CHECKING:
    import torch

OPTIMIZERS = ("adamw", "sgd")
AMP_MODES = ("auto", "bf16", "fp16", "off")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 8
    batch_size: int = 16  # per worker
    optimizer: str = "adamw"  # or "sgd", the paper's (with momentum below)
    momentum: float = 0.9  # SGD only
    # The learning rate for lr_batch images, scaled with the global batch (batch_size x workers): linearly
    # for SGD (Goyal et al. 2017), by the square root for AdamW (Malladi et al. 2022, the SDE scaling rule).
    # AdamW from scratch: at batch 16 on shapes, lr 1e-2 with half an epoch of warmup reached AP 0.62 in
    # 6 epochs where lr 3e-3 with one epoch of warmup reached 0.34 (same variant, same seed).
    lr: float = 1e-2
    lr_batch: int = 16
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    clip_grad_norm: float = 10.0  # effdet's; 0 turns clipping off
    ema: bool = True  # keep a timm ModelEmaV3 of the weights; both are evaluated and the better one is kept
    ema_decay: float = 0.9998  # effdet's; timm's warmup keeps the effective decay low for short runs
    scale_jitter: tuple[float, float] = (0.8, 1.2)  # random resize-pad scale range (effdet's COCO: 0.1-2.0)
    # Detection mixup (trainers/mixup.py): the chance that an image is blended with another of its batch,
    # and the Beta(α, α) of the blend ratio (the paper's 1.5). Off by default.
    mixup_prob: float = 0.0
    mixup_alpha: float = 1.5
    amp: str = "auto"  # auto: bf16 on CUDA where supported, else fp16 with a scaler; off on CPU
    channels_last: bool = True  # on CUDA only
    # Processes decoding, augmenting and labelling batches beside each trainer. -1 picks: none on CPU, where
    # the training threads already use every reserved core and a loader process only preempts them
    # (benchmarks/train_throughput.py), and 4 on CUDA, where the CPU would otherwise sit idle.
    loader_workers: int = -1
    eval_every: int = 2  # evaluating every epoch costs 2-5 s of a ~15 s CPU epoch; the last epoch always evaluates
    seed: int = 0
    threads: int = 0  # torch intra-op threads per worker; 0 leaves torch's default
    sync_bn: bool = True  # synchronise BatchNorm statistics across workers when there are several

    def __post_init__(self):
        for key in ("epochs", "batch_size", "lr_batch", "eval_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("lr", "ema_decay"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key}: must be > 0, got {getattr(self, key)}")
        if self.loader_workers < -1:
            raise ConfigError(f"loader_workers: must be >= 0, or -1 to choose by device, got {self.loader_workers}")
        for key in ("weight_decay", "warmup_epochs", "clip_grad_norm", "momentum", "threads"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer: must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.amp not in AMP_MODES:
            raise ConfigError(f"amp: must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        if not 0 <= self.mixup_prob <= 1:
            raise ConfigError(f"mixup_prob: must be in [0, 1], got {self.mixup_prob}")
        if not self.mixup_alpha > 0:
            raise ConfigError(f"mixup_alpha: must be > 0, got {self.mixup_alpha}")
        if not self.ema_decay < 1:
            raise ConfigError(f"ema_decay: must be < 1, got {self.ema_decay}")
        low, high = self.scale_jitter
        if not 0 < low <= high:
            raise ConfigError(f"scale_jitter: must be [low, high] with 0 < low <= high, got {list(self.scale_jitter)}")

    def to_dict(self) -> dict:
        return asdict(self)

    def scaled_lr(self, world_size: int) -> float:
        ratio = self.batch_size * world_size / self.lr_batch
        return self.lr * (ratio if self.optimizer == "sgd" else math.sqrt(ratio))


def build_optimizer(model: torch.nn.Module, recipe: TrainConfig, world_size: int = 1) -> torch.optim.Optimizer:
    import torch

    # No weight decay on norms and biases: decaying them only fights the normalisation.
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    lr = recipe.scaled_lr(world_size)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=recipe.momentum)
    return torch.optim.AdamW(groups, lr=lr)


def build_schedule(optimizer: torch.optim.Optimizer, recipe: TrainConfig, steps_per_epoch: int):
    """Linear warmup, then cosine decay to zero, stepped per batch."""
    import torch

    total = max(1, recipe.epochs * steps_per_epoch)
    warmup = min(total - 1, int(recipe.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass(frozen=True)
class Placement:
    """How a worker's process uses its device and reserved cores: decided here, and nowhere else."""

    threads: int  # torch intra-op threads; 0 leaves torch's default
    loader_workers: int
    pin_memory: bool
    channels_last: bool
    cudnn_benchmark: bool  # every batch of a trial has one input size, so cuDNN's autotuned choice holds


def placement(recipe: TrainConfig, device: torch.device, reserved_cpus: int | None = None) -> Placement:
    """reserved_cpus: the cores Ray reserved for this worker (None outside a search: unknown).

    On CPU the training threads use every reserved core and a loader process would only preempt them
    (benchmarks/train_throughput.py), so there are none. On CUDA the reserved cores beyond the first decode
    and augment (4 when the reservation is unknown), and pinned memory lets the copy overlap the step.
    """
    cuda = device.type == "cuda"
    threads = recipe.threads or (reserved_cpus if reserved_cpus and not cuda else 0)
    if recipe.loader_workers >= 0:
        workers = recipe.loader_workers
    elif cuda:
        workers = max(1, reserved_cpus - 1) if reserved_cpus else 4
    else:
        workers = 0
    return Placement(threads=threads, loader_workers=workers, pin_memory=cuda,
                     channels_last=recipe.channels_last and cuda, cudnn_benchmark=cuda)


def autocast_dtype(recipe: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The mixed-precision type for this device, or None for full float32."""
    import torch

    if recipe.amp == "off" or (recipe.amp == "auto" and device.type != "cuda"):
        return None
    # including_emulation=False: torch also says yes for GPUs before Ampere (V100, T4), which only emulate bf16,
    # slowly; "auto" gives those fp16 with the GradScaler.
    if recipe.amp == "bf16" or (recipe.amp == "auto" and torch.cuda.is_bf16_supported(including_emulation=False)):
        return torch.bfloat16
    return torch.float16  # needs the GradScaler: fp16 gradients underflow without loss scaling
