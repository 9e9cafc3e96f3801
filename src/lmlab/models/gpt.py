"""A GPT in the style of nanoGPT's model.py: token + learned position embeddings, pre-LayerNorm
blocks of causal self-attention and a 4x GELU MLP, a final LayerNorm, an lm_head tied to the
token embedding, GPT-2 initialisation, and a key/value cache for incremental decoding."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import LmlabError, require_positive


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
        require_positive(self, "vocab_size", "block_size", "n_layer", "n_head", "n_embd")
        if self.n_embd % self.n_head != 0:
            n, k = self.n_embd, self.n_head  # suggest the divisor of n_embd closest to n_head
            divisor = min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - k), d))
            raise LmlabError(
                f"model.n_embd ({n}) must be divisible by model.n_head ({k}); "
                f"set model.n_head={divisor} or change model.n_embd"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise LmlabError(f"model.dropout must be in [0, 1), got {self.dropout}")


def too_long_message(what: str, length: int, block_size: int, model: str = "GPT's") -> str:
    """What to do when `what` (`length` tokens) meets `model`'s position table of
    `block_size`."""
    return (
        f"{what} is longer than model.block_size ({block_size}), the length of the {model} "
        f"position table; set data.block_size={block_size} or less, or "
        f"model.block_size={length} or more (by default it follows data.block_size)"
    )


def _dropout(p: float) -> nn.Module:
    # no dropout, no module call: generation runs ~100 modules per token, overhead adds up
    return nn.Dropout(p) if p > 0 else nn.Identity()


class KVCache:
    """Keys and values of the tokens fed so far, per layer, in buffers of `max_len` positions,
    allocated on the first write with the batch size, dtype and device of the keys (so they
    follow autocast) and reused after `reset()`."""

    def __init__(self, n_layer: int, max_len: int):
        self.max_len = max_len
        self.buffers: list[torch.Tensor | None] = [None] * n_layer  # (2, B, nh, max_len, hs)
        self.length = 0  # positions already filled: the position of the next token fed

    def reset(self) -> None:
        self.length = 0

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) at positions length..length+T; return all keys and values
        up to there (B, nh, length+T, hs). `length` itself advances once per forward."""
        B, nh, T, hs = k.shape
        buf = self.buffers[layer]  # keys, values
        if buf is None or buf.shape[1] != B or buf.dtype != k.dtype or buf.device != k.device:
            buf = self.buffers[layer] = k.new_empty(2, B, nh, self.max_len, hs)
        end = self.length + T
        buf[0, :, :, self.length : end] = k
        buf[1, :, :, self.length : end] = v
        return buf[0, :, :, :end], buf[1, :, :, :end]


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


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer  # which of the cache's per-layer buffers holds this one's keys
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = _dropout(config.dropout)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of x (B, T, C), split into heads: 3 x (B, nh, T, hs)."""
        B, T, C = x.shape
        q, k, v = (
            t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
            for t in self.c_attn(x).split(C, dim=2)
        )
        return q, k, v

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """The attention weights (B, nh, T, T) of x (B, T, C), no cache, no dropout: row t is
        how query t spreads over keys 0..t. SDPA's fused kernels never materialise this matrix,
        so it is recomputed, softmax(q k^T / sqrt(hs)) under the causal mask, for pictures
        (lmlab.diagnostics); `probs @ v` is what forward attends to."""
        q, k, _ = self.heads(x)  # (B, nh, T, hs)
        T = q.shape[-2]
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])  # (B, nh, T, T)
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(diagonal=1)
        return F.softmax(scores.masked_fill(future, float("-inf")), dim=-1)  # (B, nh, T, T)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.heads(x)  # 3 x (B, nh, T, hs)
        start = 0 if kv_cache is None else kv_cache.length
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)  # (B, nh, start+T, hs)
        mask, causal = _attention_mask(start, T, x.device)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class FeedForward(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = _dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = FeedForward(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache)  # pre-LN: the residual stream is clean
        return x + self.mlp(self.ln_2(x))


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
                h=nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): one matrix embeds tokens and scores them.
        self.transformer.wte.weight = self.lm_head.weight
        for module in self.modules():  # GPT-2: N(0, 0.02) weights, zero biases
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        # GPT-2: each block adds two projections to the residual stream, so scale them down
        # by sqrt(2 * n_layer) to keep its variance independent of depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def init_cache(self) -> KVCache:
        """An empty key/value cache for `forward(idx, kv_cache=...)` (block_size positions)."""
        return KVCache(self.config.n_layer, self.config.block_size)

    def attention_maps(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """The attention weights of every layer for idx (B, T), no cache: a list of n_layer
        tensors (B, nh, T, T) (see CausalSelfAttention.attention_probs), for pictures of what
        each head looks at. Each layer's weights are computed from the input its attention
        sees in the forward pass."""
        B, T = idx.shape
        if self.block_size < T:
            raise LmlabError(too_long_message(f"a sequence of {T} tokens", T, self.block_size))
        pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        x = self.transformer.drop(tok_emb + self.transformer.wpe(pos))  # (B, T, C)
        maps = []
        for block in self.transformer.h:
            maps.append(block.attn.attention_probs(block.ln_1(x)))  # (B, nh, T, T)
            x = block(x)  # (B, T, C)
        return maps

    def forward(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, V) for every position of `idx (B, T)`. With a `kv_cache`, idx continues
        the tokens in it: its positions start at `kv_cache.length`, and the cache grows by T."""
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.block_size:
            if kv_cache is None:
                raise LmlabError(too_long_message(f"a sequence of {T} tokens", T, self.block_size))
            raise LmlabError(
                f"the kv cache holds {start} tokens and {T} more exceed model.block_size "
                f"({self.block_size}); reset the cache and feed a shorter context"
            )
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(pos)  # (T, C)
        x = self.transformer.drop(tok_emb + pos_emb)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, kv_cache)  # (B, T, C)
        x = self.transformer.ln_f(x)  # (B, T, C)
        if kv_cache is not None:
            kv_cache.length += T
        return self.lm_head(x)  # (B, T, V)
