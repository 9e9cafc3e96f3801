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
    # A full table for GPT-2's 50,257 tokens would hold 2.5 billion numbers (10 GB, and 30 GB
    # with AdamW's state). Above `max_full_vocab` the table is factorised as (V, rank) x (rank, V)
    # with rank 256 unless `rank` says otherwise.
    rank: int | None = None
    max_full_vocab: int = 8192

    def __post_init__(self) -> None:
        if self.vocab_size < 1:
            raise LmlabError(f"model.vocab_size must be positive, got {self.vocab_size}")
        if self.rank is not None and self.rank < 1:
            raise LmlabError(f"model.rank must be positive or null, got {self.rank}")


class BigramLM(nn.Module):
    def __init__(self, config: BigramConfig):
        super().__init__()
        self.config = config
        self.block_size = config.block_size
        V, rank = config.vocab_size, config.rank
        if rank is None and config.vocab_size > config.max_full_vocab:
            rank = 256
        self.token_embedding_table = nn.Embedding(V, V if rank is None else rank)
        self.head = None if rank is None else nn.Linear(rank, V, bias=False)
        # Logits near zero: the untrained model guesses uniformly and scores ln V, as a model
        # that knows nothing should. nn.Embedding's N(0, 1) rows score ln V + 1/2 on average
        # (the tutorial's 4.87 against -ln(1/65) = 4.17): confidently wrong before step one.
        # A factorised table keeps unit rows; its head scales their products to 0.02.
        nn.init.normal_(self.token_embedding_table.weight, std=0.02 if self.head is None else 1.0)
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=0.02 / rank**0.5)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = self.token_embedding_table(idx)  # (B, T) -> (B, T, V), or (B, T, rank)
        return logits if self.head is None else self.head(logits)
