"""Gradient accumulation: k micro-batches of B/k windows take the step of one batch of B."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lmlab.lit_module import LitLanguageModel

GPT = {"vocab_size": 11, "block_size": 8, "n_layer": 1, "n_head": 2, "n_embd": 16}


def _train(batch_size: int, accumulate: int, data: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module = LitLanguageModel("gpt", GPT, optimizer={"lr": 1e-2}, scheduler=None)
    loader = DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=batch_size)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=1.0,  # clips the accumulated gradient, as the large batch's
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    return module.model.state_dict()


def test_accumulated_micro_batches_equal_the_large_batch():
    data = torch.randint(0, 11, (24, 9), generator=torch.Generator().manual_seed(1))
    large = _train(batch_size=8, accumulate=1, data=data)  # 3 steps of 8 windows
    micro = _train(batch_size=4, accumulate=2, data=data)  # 3 steps of 2 x 4 windows
    assert all(torch.allclose(large[k], micro[k], atol=1e-6) for k in large)
    first = _train(batch_size=4, accumulate=1, data=data)  # 3 steps of 4: a different run
    assert not all(torch.allclose(large[k], first[k], atol=1e-6) for k in large)
