"""A causal bag of words: the "mathematical trick" of self-attention from Karpathy's GPT lecture
as a model. Each position averages the embeddings of every position up to and including it,
with the weights of a masked softmax over zeros (uniform over the past), then an MLP reads
that average next to the position's own embedding and predicts the next token.

It is the rung between the MLP and the GPT: unlike the MLP it sees the whole context, unlike
the GPT it weighs every past token equally. Attention is this averaging with data-dependent
affinities in place of the zeros; the gap between this model and the GPT is what they buy."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lmlab.errors import LmlabError, require_positive
from lmlab.models.gpt import too_long_message as gpt_too_long_message


@dataclass
class BOWConfig:
    vocab_size: int
    block_size: int  # the length of the position table: the longest sequence it reads
    n_embd: int = 64
    n_hidden: int = 256
    dropout: float = 0.0

    def __post_init__(self) -> None:
        require_positive(self, "vocab_size", "block_size", "n_embd", "n_hidden")
        if not 0.0 <= self.dropout < 1.0:
            raise LmlabError(f"model.dropout must be in [0, 1), got {self.dropout}")


def too_long_message(what: str, length: int, block_size: int) -> str:
    return gpt_too_long_message(what, length, block_size, model="bag-of-words model's")


def uniform_causal_weights(
    T: int, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """(T, T) weights: row t is 1/(t+1) on columns 0..t and 0 after, as the lecture's version 3
    computes them: a softmax over affinities that are all zero, with the future masked to -inf
    (attention replaces these zeros with query-key products)."""
    tril = torch.tril(torch.ones(T, T, device=device))  # (T, T)
    wei = torch.zeros(T, T, device=device, dtype=dtype).masked_fill(
        tril == 0, float("-inf")
    )  # (T, T)
    return wei.softmax(dim=-1)  # (T, T): each row sums to 1


def causal_average(x: torch.Tensor) -> torch.Tensor:
    """x (B, T, C) -> (B, T, C): position t holds the mean of x[:, :t+1]."""
    wei = uniform_causal_weights(x.size(1), x.device, x.dtype)  # (T, T), in x's precision
    return wei @ x  # (T, T) @ (B, T, C) -> (B, T, C)


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


class BagOfWords(nn.Module):
    def __init__(self, config: BOWConfig):
        super().__init__()
        self.config = config
        self.block_size = config.block_size
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        # Learned positions: an average of token embeddings alone forgets order *and* how many
        # tokens went into it. The averaged position embeddings tell the MLP how far into the
        # window it is (how diluted the average is), and the position's own embedding says
        # where it stands; it costs block_size * n_embd numbers, few next to the vocabulary's.
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = _dropout(config.dropout)
        # The MLP reads [own embedding, average] side by side (not summed): the current token
        # predicts the next one best (the bigram), the average only adds context to it.
        self.hidden = nn.Linear(2 * config.n_embd, config.n_hidden)
        self.gelu = nn.GELU()
        self.lm_head = nn.Linear(config.n_hidden, config.vocab_size)
        # As in the MLP (makemore part 3): N(0, 1) embeddings (nn.Embedding's default; there is
        # no LayerNorm to rescale small ones), a hidden layer at 1/sqrt(fan_in) so its inputs
        # reach GELU at about unit variance, and a small output layer, so training starts near
        # loss ln V instead of with confidently wrong logits.
        nn.init.normal_(self.hidden.weight, std=1 / math.sqrt(self.hidden.in_features))
        nn.init.zeros_(self.hidden.bias)
        nn.init.normal_(self.lm_head.weight, std=0.01)
        nn.init.zeros_(self.lm_head.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        if self.block_size < T:
            raise LmlabError(too_long_message(f"a sequence of {T} tokens", T, self.block_size))
        pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        xbow = causal_average(x)  # (B, T, C): every past position weighs the same
        h = torch.cat([x, xbow], dim=-1)  # (B, T, 2C)
        return self.lm_head(self.drop(self.gelu(self.hidden(h))))  # (B, T, n_hidden) -> (B, T, V)
