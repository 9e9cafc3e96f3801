"""The Bengio et al. (2003) MLP as in makemore: embed the last `context` tokens, concatenate,
one tanh hidden layer, then logits of the next token. Every position of a window is predicted
at once, so it trains on the same (B, T) batches as the other models."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lmlab.errors import LmlabError, require_positive


@dataclass
class MLPConfig:
    vocab_size: int
    block_size: int  # the model reads only `context` tokens; this crops generation contexts
    context: int = 3  # tokens that predict the next one (the lecture's block_size)
    n_embd: int = 10  # dimension of each token's embedding (the lecture's C has 10 columns)
    n_hidden: int = 200
    boundary_id: int | None = None  # what positions before the window see; None means id 0

    def __post_init__(self) -> None:
        require_positive(self, "vocab_size", "block_size", "context", "n_embd", "n_hidden")
        if self.boundary_id is not None and not 0 <= self.boundary_id < self.vocab_size:
            raise LmlabError(
                f"model.boundary_id ({self.boundary_id}) must be a token id in "
                f"[0, {self.vocab_size}); use the tokenizer's boundary_id or leave it unset"
            )


class BengioMLP(nn.Module):
    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        self.block_size = config.block_size
        self.pad_id = config.boundary_id if config.boundary_id is not None else 0
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # the lecture's C
        self.hidden = nn.Linear(config.context * config.n_embd, config.n_hidden)
        self.lm_head = nn.Linear(config.n_hidden, config.vocab_size)
        # makemore part 3: tanh gain 5/3 over sqrt(fan_in) keeps the hidden layer out of
        # saturation, and a small output layer starts from near-uniform logits (loss ~ ln V
        # instead of a "hockey stick" first few hundred steps).
        nn.init.normal_(self.hidden.weight, std=(5 / 3) / math.sqrt(self.hidden.in_features))
        nn.init.zeros_(self.hidden.bias)
        nn.init.normal_(self.lm_head.weight, std=0.01)
        nn.init.zeros_(self.lm_head.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        k = self.config.context
        # Position t reads tokens t-k+1..t; the k-1 positions before the window are the
        # boundary token, as at the start of a name in makemore.
        pad = idx.new_full((B, k - 1), self.pad_id)
        padded = torch.cat([pad, idx], dim=1)  # (B, T+k-1)
        windows = padded.unfold(1, k, 1)  # (B, T, k): a view, no copy, no loop over T
        x = self.wte(windows).reshape(B, T, k * self.config.n_embd)  # (B, T, k*n_embd)
        return self.lm_head(torch.tanh(self.hidden(x)))  # (B, T, n_hidden) -> (B, T, V)
