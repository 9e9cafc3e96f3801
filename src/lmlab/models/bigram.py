"""The bigram model: each token's row of a (V, V) table is the logits of the next token."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmlab.errors import LmlabError


@dataclass
class BigramConfig:
    vocab_size: int
    block_size: int = 8  # the model needs only one token; this crops generation contexts

    def __post_init__(self) -> None:
        if self.vocab_size < 1:
            raise LmlabError(f"model.vocab_size must be positive, got {self.vocab_size}")


class BigramLM(nn.Module):
    def __init__(self, config: BigramConfig):
        super().__init__()
        self.config = config
        self.block_size = config.block_size
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.token_embedding_table(idx)  # (B, T) -> (B, T, V)
