"""One `generate()` for every model: temperature, top-k, top-p, multinomial sampling, and a
key/value cache for the models that have one (`model.init_cache()`).

The context window. A model sees at most `block_size` tokens. Once the sequence outgrows
them, the window jumps forward to keep the last `shifted_context(block_size)` (3/4) tokens and
grows again from there, llama.cpp's "context shift". A sliding window would move every token's
position at every step, so a cache of learned-position keys could never be reused past
block_size; the jump refills it once per block_size/4 tokens. With a cache or without, the
window follows this rule, so both compute the same logits and greedy decoding agrees.

Stopping. With `stop_id` (the tokenizer's boundary: "\n" for characters, <|endoftext|> for
BPE) a sample ends at its first boundary after the prompt, as a name ends at its line break.
The check sits after the next token is chosen, where the cached and uncached paths meet, so
both stop alike."""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
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
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already hold top_p of the mass
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


def shifted_context(block_size: int) -> int:
    """Tokens kept when the window jumps: 3/4 of the block, and at least one."""
    return max(1, block_size - max(1, block_size // 4))


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
    stop_id: int | None = None,
) -> torch.Tensor:
    """Extend `idx (B, T)` by `max_new_tokens` tokens; temperature 0 means greedy. With
    `use_cache` and a model that has `init_cache()`, the prompt is fed once and then one token
    per step; the cache is refilled only when the window jumps (see the module doc).

    With `stop_id`, a row ends at its first `stop_id` after the prompt: every later position
    of that row holds `stop_id` too (padding, never a sampled token), and generation stops
    early once every row has ended, so rows may be shorter than `max_new_tokens`."""
    # the same checks as every other way in: settings out of range are refused here too
    SamplingSettings(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p
    )
    was_training = model.training
    model.eval()
    block_size = model.block_size
    cache = model.init_cache() if use_cache and hasattr(model, "init_cache") else None
    start = max(0, idx.size(1) - block_size)  # the window: idx[:, start:], cropping the prompt
    cached_upto = start  # idx[:, start:cached_upto] is in the cache
    ended = torch.zeros(idx.size(0), 1, dtype=torch.bool, device=idx.device)  # (B, 1)
    for _ in range(max_new_tokens):
        if idx.size(1) - start > block_size:  # the window jumps
            start = idx.size(1) - shifted_context(block_size)
            if cache is not None:  # positions changed: the cached keys are stale
                cache.reset()
                cached_upto = start
        if cache is None:
            logits = model(idx[:, start:])[:, -1, :]  # (B, V)
        else:
            logits = model(idx[:, cached_upto:], kv_cache=cache)[:, -1, :]  # (B, V)
            cached_upto = idx.size(1)
        if temperature == 0:
            next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        else:
            probs = torch.softmax(filter_logits(logits.float() / temperature, top_k, top_p), -1)
            next_id = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
        if stop_id is not None:
            # Ended rows still draw (and discard) a token: the random stream advances as if
            # nothing stopped, so a row's tokens do not depend on when the other rows end.
            next_id = next_id.masked_fill(ended, stop_id)
            ended = ended | (next_id == stop_id)
        idx = torch.cat([idx, next_id], dim=1)
        if stop_id is not None and bool(ended.all()):
            break
    model.train(was_training)
    return idx


@dataclass(frozen=True)
class SamplingSettings:
    """What to generate: one set of settings for lmlab-sample, the sample-text callback and
    `sample_text`. Checked when made: values that would fail deep inside torch, or silently
    mean something else (a negative temperature inverts the distribution), are refused."""

    prompt: str = ""
    max_new_tokens: int = 200
    num_samples: int = 1
    temperature: float = 1.0
    top_k: int | None = None  # 0 or None: no cut
    top_p: float | None = None  # None: no cut
    seed: int | None = None  # the same seed gives the same texts
    # end each sample at the tokenizer's boundary (a name at its line break); callers decide
    # from the corpus (lmlab.sample_labels.is_line_corpus) when the user leaves it open
    stop_at_boundary: bool = False

    def __post_init__(self) -> None:
        problems = []
        for name, low in (("max_new_tokens", 0), ("num_samples", 1), ("top_k", 0)):
            value = getattr(self, name)
            if value is not None and (not _is_number(value, (int, np.integer)) or value < low):
                problems.append(f"{name} must be a whole number >= {low}, got {value!r}")
        if not _is_number(self.temperature) or not 0 <= self.temperature < math.inf:
            problems.append(f"temperature must be 0 (greedy) or more, got {self.temperature!r}")
        if self.top_p is not None and (not _is_number(self.top_p) or not 0 < self.top_p <= 1):
            problems.append(f"top_p must be in (0, 1], or null for no cut, got {self.top_p!r}")
        if not isinstance(self.stop_at_boundary, bool):
            problems.append(
                f"stop_at_boundary must be true or false, got {self.stop_at_boundary!r}"
            )
        if problems:
            raise LmlabError("; ".join(problems))


def _is_number(value: Any, kinds: tuple[type, ...] = (int, float, np.number)) -> bool:
    return isinstance(value, kinds) and not isinstance(value, bool)  # NaN fails range checks


def encode_prompt(tokenizer: Any, prompt: str) -> np.ndarray:
    """The prompt's token ids; an LmlabError naming the characters a char vocabulary lacks.
    Corpora are NFC-normalised by default, so a prompt typed in another normal form (a
    decomposed Hangul syllable, say) is normalised when that makes it fit the vocabulary."""
    from lmlab.data.tokenizers import unknown_characters_message

    for text in (prompt, unicodedata.normalize("NFC", prompt)):
        if not tokenizer.unknown_characters(text):
            return tokenizer.encode(text)
    unknown = tokenizer.unknown_characters(prompt)
    n = tokenizer.vocab_size
    vocabulary = f"the checkpoint's vocabulary (the {n} characters of its training corpus)"
    raise LmlabError(
        f"the prompt has {unknown_characters_message(unknown, vocabulary)}; leave them out "
        "or replace them, or train on a corpus that has them"
    )


def sample_text(
    model: nn.Module,
    tokenizer: Any,
    settings: SamplingSettings,
    device: str | torch.device | None = None,
) -> list[str]:
    """`settings.num_samples` texts, each the prompt and its continuation, in one batch. An
    empty prompt starts from the boundary token (the start of a document), which is not part
    of the returned text. The same seed gives the same texts. With `stop_at_boundary`, each
    text ends just before the first boundary token generated (which is not returned)."""
    device = torch.device(device if device is not None else next(model.parameters()).device)
    s = settings
    ids = encode_prompt(tokenizer, s.prompt) if s.prompt else [tokenizer.boundary_id]
    idx = torch.as_tensor(ids, dtype=torch.long, device=device).repeat(s.num_samples, 1)  # (N, T)
    generator = None if s.seed is None else torch.Generator(device=device).manual_seed(s.seed)
    stop_id = tokenizer.boundary_id if s.stop_at_boundary else None
    out = generate(
        model, idx, s.max_new_tokens, s.temperature, s.top_k, s.top_p, generator, stop_id=stop_id
    )
    skip = 0 if s.prompt else 1  # the boundary token that stood in for an empty prompt
    rows = [row.tolist() for row in out.cpu()]
    if stop_id is not None:  # cut at the first boundary after the prompt
        prompt_len = idx.size(1)
        rows = [r[: prompt_len + _index(r[prompt_len:], stop_id)] for r in rows]
    return [tokenizer.decode(row[skip:]) for row in rows]


def _index(ids: list[int], token: int) -> int:
    """The position of `token` in `ids`, or len(ids) when it is not there."""
    return ids.index(token) if token in ids else len(ids)
