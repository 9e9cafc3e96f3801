"""AdamW with weight decay on 2-D weights only, and nanoGPT's warmup + cosine schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lmlab.errors import LmlabError


def fused_adamw_available(device: torch.device) -> bool:
    """torch has one-kernel AdamW steps for CUDA and (since 2.4) CPU tensors; the default
    loops over the tensors, which a small model feels on every step."""
    return device.type in ("cuda", "cpu")


def build_adamw(model: nn.Module, fused: bool = False, **adamw_kwargs: Any) -> torch.optim.AdamW:
    """Decay matrices (linear and embedding weights), not biases or LayerNorm gains."""
    weight_decay = adamw_kwargs.pop("weight_decay", 0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if "betas" in adamw_kwargs:
        adamw_kwargs["betas"] = tuple(adamw_kwargs["betas"])
    return torch.optim.AdamW(groups, fused=fused or None, **adamw_kwargs)


def lr_multiplier(
    decay: str, warmup_steps: int, decay_steps: int, lr: float, min_lr: float
) -> Callable[[int], float]:
    """The factor on the base lr at each step: linear warmup, then constant or cosine to min_lr."""
    if decay not in ("constant", "cosine"):
        raise LmlabError(f"model.scheduler.decay must be 'constant' or 'cosine', got {decay!r}")
    min_ratio = min_lr / lr if lr > 0 else 0.0

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if decay == "constant":
            return 1.0
        if step >= decay_steps:
            return min_ratio
        progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
        return min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_ratio)

    return multiplier
