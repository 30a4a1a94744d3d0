"""Training configuration: a frozen dataclass saved as a plain dict in every checkpoint."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .errors import UsageError

# The tutorial's recipe, for `--recipe tutorial`: the seed architecture trained as it was published.
TUTORIAL = dict(arch="seed", loss="bce", spectral_norm=False, ema_decay=0.0, label_smoothing=1.0,
                lr_g=2e-4, lr_d=2e-4, amp=False)


@dataclass(frozen=True)
class TrainConfig:
    data: str = "mnist"
    arch: str = "dcgan"
    epochs: int = 30
    max_steps: int | None = None
    batch_size: int = 32
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    loss: str = "logits"            # "logits": BCEWithLogitsLoss; "bce": Sigmoid + BCELoss (tutorial)
    spectral_norm: bool = False     # spectral norm in D instead of BatchNorm
    label_smoothing: float = 0.9    # target for real images (1.0: none)
    ema_decay: float = 0.999        # EMA generator used for samples and export (0: none)
    seed: int = 0
    device: str = "auto"
    amp: bool | None = None         # autocast; None: bf16 on a CPU with bf16 instructions, else off
    sync_bn: bool = False           # under torchrun: SyncBatchNorm across ranks (CUDA only)
    workers: int = 0
    data_count: int | None = None   # cap on training images (synthetic: how many to render)
    checkpoint_every: int = 1000    # steps; last.pt is also written at every epoch end
    keep: int = 3                   # step checkpoints kept besides last.pt
    log_every: int = 10             # steps per metrics.csv row
    sample_every: int = 1           # epochs per sample grid
    eval_every: int = 0             # steps between quality evaluations (0: none)
    eval_count: int = 1000          # samples per evaluation
    classifier: str | None = None   # classifier checkpoint for evaluations

    def __post_init__(self):
        from .models import ARCHS

        if self.arch not in ARCHS:
            raise UsageError(f"unknown arch {self.arch!r} (choose from {', '.join(ARCHS)})")
        if self.loss not in ("logits", "bce"):
            raise UsageError(f"unknown loss {self.loss!r} (choose logits or bce)")
        for name in ("epochs", "batch_size", "checkpoint_every", "log_every", "sample_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.data_count is not None and self.data_count < 1:
            raise UsageError(f"--data-count must be at least 1, got {self.data_count}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UsageError(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.eval_every < 0 or self.eval_count < 1:
            raise UsageError("--eval-every must not be negative and --eval-count must be at least 1")
        if self.keep < 0 or self.workers < 0:
            raise UsageError("--keep and --workers must not be negative")
        if not (0.0 <= self.ema_decay < 1.0):
            raise UsageError(f"--ema must be in [0, 1), got {self.ema_decay}")
        if not (0.5 < self.label_smoothing <= 1.0):
            raise UsageError(f"--label-smoothing must be in (0.5, 1], got {self.label_smoothing}")
        if not (0 < self.lr_g < math.inf and 0 < self.lr_d < math.inf):  # NaN fails both
            raise UsageError(f"learning rates must be positive and finite, got {self.lr_g:g} (G) {self.lr_d:g} (D)")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise UsageError(f"--betas must be in [0, 1), got {self.beta1} {self.beta2}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def replace(self, **changes: Any) -> "TrainConfig":
        return replace(self, **changes)
