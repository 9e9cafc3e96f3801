"""A GPT in the style of nanoGPT's model.py: token + learned position embeddings, pre-LayerNorm
blocks of causal self-attention and a 4x GELU MLP, a final LayerNorm, an lm_head tied to the
token embedding, GPT-2 initialisation, and a key/value cache for incremental decoding."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import LmlabError


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False  # biases in Linears and LayerNorms: False is a bit better and faster

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if value < 1:
                raise LmlabError(f"model.{name} must be a positive integer, got {value}")
        if self.n_embd % self.n_head != 0:
            suggestion = _divisor_near(self.n_embd, self.n_head)
            raise LmlabError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head "
                f"({self.n_head}); set model.n_head={suggestion} or change model.n_embd"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise LmlabError(f"model.dropout must be in [0, 1), got {self.dropout}")


def too_long_message(what: str, length: int, block_size: int) -> str:
    """What to do when `what` (`length` tokens) meets a position table of `block_size`."""
    return (
        f"{what} is longer than model.block_size ({block_size}), the length of the GPT's "
        f"position table; set data.block_size={block_size} or less, or "
        f"model.block_size={length} or more (by default it follows data.block_size)"
    )


def _divisor_near(n: int, k: int) -> int:
    """The divisor of n closest to k, to suggest a valid n_head."""
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - k), d))


def _dropout(p: float) -> nn.Module:
    # no dropout, no module call: generation runs ~100 modules per token, overhead adds up
    return nn.Dropout(p) if p > 0 else nn.Identity()


class KVCache:
    """Keys and values of the tokens fed so far, per layer, in buffers of `max_len` positions.

    Buffers are allocated on the first write, with the batch size, dtype and device of the
    keys (so they follow autocast), and reused after `reset()`."""

    def __init__(self, n_layer: int, max_len: int):
        self.max_len = max_len
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer
        self.length = 0  # positions already filled: the position of the next token fed

    def reset(self) -> None:
        self.length = 0

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) at positions length..length+T; return all keys and values
        up to there (B, nh, length+T, hs). `length` itself advances once per forward."""
        B, nh, T, hs = k.shape
        buf = self.keys[layer]
        if buf is None or buf.shape[0] != B or buf.dtype != k.dtype or buf.device != k.device:
            self.keys[layer] = k.new_empty(B, nh, self.max_len, hs)
            self.values[layer] = v.new_empty(B, nh, self.max_len, hs)
        end = self.length + T
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = _dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)

        start = 0
        if kv_cache is not None:
            start = kv_cache.length
            k, v = kv_cache.update(layer, k, v)  # (B, nh, start+T, hs)
        mask, is_causal = _attention_mask(start, T, x.device)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


def _attention_mask(start: int, T: int, device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """How T queries at positions start..start+T-1 may see keys 0..start+T-1.

    SDPA's `is_causal` aligns the mask top-left, which is right only when queries and keys
    start together (no cache, or an empty one). One query after a cache sees every key, so it
    needs no mask; a chunk continuing a cache needs the bottom-right mask spelled out."""
    if start == 0:
        return None, True
    if T == 1:
        return None, False
    q_pos = torch.arange(start, start + T, device=device)  # (T,)
    k_pos = torch.arange(start + T, device=device)  # (start+T,)
    return k_pos[None, :] <= q_pos[:, None], False  # (T, start+T), True = may attend


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = _dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, layer)  # pre-LN: the residual stream is clean
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.block_size = config.block_size
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=_dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): one matrix embeds tokens and scores them.
        self.transformer.wte.weight = self.lm_head.weight

        self.apply(self._init_weights)
        # GPT-2: each block adds two projections to the residual stream, so scale them down
        # by sqrt(2 * n_layer) to keep its variance independent of depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def init_cache(self) -> KVCache:
        """An empty key/value cache for `forward(idx, kv_cache=...)` (block_size positions)."""
        return KVCache(self.config.n_layer, self.config.block_size)

    def forward(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, V) for every position of `idx (B, T)`.

        With a `kv_cache`, idx continues the tokens already in the cache: its positions start
        at `kv_cache.length`, it attends to the cached keys too, and the cache grows by T."""
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.block_size:
            if kv_cache is None:
                raise LmlabError(
                    too_long_message(f"a sequence of {T} tokens", T, self.config.block_size)
                )
            raise LmlabError(
                f"the kv cache holds {start} tokens and {T} more exceed model.block_size "
                f"({self.config.block_size}); reset the cache and feed a shorter context"
            )
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(pos)  # (T, C)
        x = self.transformer.drop(tok_emb + pos_emb)  # (B, T, C)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, kv_cache, layer)  # (B, T, C)
        x = self.transformer.ln_f(x)  # (B, T, C)
        if kv_cache is not None:
            kv_cache.length += T
        return self.lm_head(x)  # (B, T, V)
