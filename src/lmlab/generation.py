"""One `generate()` for every model: temperature, top-k, top-p, multinomial sampling, and a
key/value cache for the models that have one (`model.init_cache()`).

The context window. A model sees at most `block_size` tokens. While the sequence fits, each
step sees all of it. Once it outgrows the window, the window jumps forward to keep the last
`shifted_context(block_size)` (3/4 of block_size) tokens and grows again from there, the
"context shift" of llama.cpp. A plain sliding window would change every token's position at
every step, so a cache of learned-position keys could never be reused past block_size; the
jump lets the cache be refilled once per block_size/4 tokens instead. Both paths (cache or
not) follow the same rule, so they compute the same logits and greedy decoding agrees.
"""

from __future__ import annotations

import unicodedata
from typing import Any

import numpy as np
import torch
from torch import nn

from lmlab.errors import LmlabError


def filter_logits(
    logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest top-p nucleus."""
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already hold top_p of the mass
        drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def shifted_context(block_size: int) -> int:
    """Tokens kept when the window jumps: 3/4 of the block, and at least one."""
    return max(1, block_size - max(1, block_size // 4))


def _window_start(start: int, length: int, block_size: int) -> int:
    """Where the context of a sequence of `length` tokens begins, given the previous start."""
    if length - start <= block_size:
        return start
    return length - shifted_context(block_size)


@torch.inference_mode()  # lighter than no_grad: no version counters, no view tracking
def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Extend `idx (B, T)` by `max_new_tokens` tokens; temperature 0 means greedy.

    With `use_cache` and a model that has `init_cache()`, the prompt is fed once and then one
    token per step; the cache is refilled only when the window jumps (see the module doc)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    was_training = model.training
    model.eval()
    block_size = model.block_size
    cache = model.init_cache() if use_cache and hasattr(model, "init_cache") else None
    start = max(0, idx.size(1) - block_size)  # the prompt is cropped to one block
    cached_upto = start  # idx[:, start:cached_upto] is in the cache
    for _ in range(max_new_tokens):
        new_start = _window_start(start, idx.size(1), block_size)
        if cache is None:
            logits = model(idx[:, new_start:])[:, -1, :]  # (B, V)
        else:
            if new_start != start:  # positions changed: the cached keys are stale
                cache.reset()
                cached_upto = new_start
            logits = model(idx[:, cached_upto:], kv_cache=cache)[:, -1, :]  # (B, V)
            cached_upto = idx.size(1)
        start = new_start
        next_id = _pick(logits, temperature, top_k, top_p, generator)  # (B, 1)
        idx = torch.cat([idx, next_id], dim=1)
    model.train(was_training)
    return idx


def check_sampling(
    max_new_tokens: int,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    num_samples: int = 1,
) -> None:
    """An LmlabError for settings that would fail deep inside torch or silently mean something
    else (a negative temperature inverts the distribution)."""
    problems = []
    if max_new_tokens < 0:
        problems.append(f"max_new_tokens must be 0 or more, got {max_new_tokens}")
    if num_samples < 1:
        problems.append(f"num_samples must be 1 or more, got {num_samples}")
    if temperature < 0:
        problems.append(f"temperature must be 0 (greedy) or more, got {temperature}")
    if top_k is not None and top_k < 0:
        problems.append(f"top_k must be 1 or more (0 or null: no cut), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        problems.append(f"top_p must be in (0, 1], or null for no cut, got {top_p}")
    if problems:
        raise LmlabError("; ".join(problems))


def _pick(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def encode_prompt(tokenizer: Any, prompt: str) -> np.ndarray:
    """The prompt's token ids; an LmlabError naming the characters a char vocabulary lacks.

    Corpora are NFC-normalised by default, so a prompt typed in another normal form (a
    decomposed Hangul syllable, say) is normalised when that makes it fit the vocabulary."""
    stoi = getattr(tokenizer, "stoi", None)
    if stoi is None:  # BPE encodes any text
        return tokenizer.encode(prompt)
    missing = sorted(set(prompt) - stoi.keys())
    if missing:
        nfc = unicodedata.normalize("NFC", prompt)
        if set(nfc) <= stoi.keys():
            return tokenizer.encode(nfc)
        shown = ", ".join(repr(c) for c in missing[:20])
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise LmlabError(
            f"the prompt has {len(missing)} character(s) that are not in the checkpoint's "
            f"vocabulary (the {len(stoi)} characters of its training corpus): {shown}{more}; "
            "leave them out or replace them, or train on a corpus that has them"
        )
    return tokenizer.encode(prompt)


def sample_text(
    model: nn.Module,
    tokenizer: Any,
    prompt: str = "",
    max_new_tokens: int = 200,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    device: str | torch.device | None = None,
) -> list[str]:
    """`num_samples` texts, each the prompt and its continuation, generated in one batch.

    An empty prompt starts from the boundary token (the start of a document), which is not
    part of the returned text. The same seed gives the same texts."""
    check_sampling(max_new_tokens, temperature, top_k, top_p, num_samples)
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    if prompt:
        ids = encode_prompt(tokenizer, prompt)
        skip = 0
    else:
        ids = np.array([tokenizer.boundary_id], dtype=np.int64)
        skip = 1
    idx = torch.as_tensor(ids, dtype=torch.long, device=device)  # (T,)
    idx = idx.unsqueeze(0).repeat(num_samples, 1)  # (N, T)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    out = generate(
        model, idx, max_new_tokens, temperature, top_k, top_p, generator=generator
    )  # (N, T + max_new_tokens)
    return [tokenizer.decode(row[skip:].tolist()) for row in out.cpu()]
