"""generate(): greedy and sampled decoding, top-k/top-p, the KV cache, and sample_text()."""

from __future__ import annotations

import unicodedata

import pytest
import torch

from lmlab.data.tokenizers import CharTokenizer
from lmlab.errors import LmlabError
from lmlab.generation import (
    SamplingSettings,
    filter_logits,
    generate,
    sample_text,
    shifted_context,
)
from lmlab.models import build_model

V, BLOCK = 11, 8


def gpt(block_size: int = BLOCK, vocab_size: int = V) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(
        "gpt", vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32
    )
    # GPT-2 init gives near-uniform logits; larger weights make greedy choices depend strongly
    # on the context, so that any difference in what the model sees shows up in the tokens.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0)
    return model


class Recorder:
    """Counts the query lengths a model is called with."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.lengths: list[int] = []
        model.register_forward_pre_hook(lambda mod, args: self.lengths.append(args[0].size(1)))


def reference_greedy(model, idx: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding written out: the full context window recomputed at every step."""
    for _ in range(steps):
        logits = model(idx[:, -model.block_size :])[:, -1]
        idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx


def test_temperature_zero_is_greedy() -> None:
    model = gpt().eval()
    prompt = torch.randint(0, V, (3, 2))
    with torch.no_grad():
        expected = reference_greedy(model, prompt, BLOCK - 2)  # stays within one block
    out = generate(model, prompt, BLOCK - 2, temperature=0.0, use_cache=False)
    assert torch.equal(out, expected)
    assert torch.equal(out[:, :2], prompt)
    assert max(len(set(row.tolist())) for row in out) > 2  # not stuck on one token


@pytest.mark.parametrize("prompt_len", [1, 5, BLOCK, BLOCK + 3])
def test_greedy_is_identical_with_and_without_cache(prompt_len: int) -> None:
    model = gpt()
    prompt = torch.randint(0, V, (4, prompt_len), generator=torch.Generator().manual_seed(7))
    steps = 4 * BLOCK  # well past block_size: the window jumps several times
    with_cache = generate(model, prompt, steps, temperature=0.0, use_cache=True)
    without = generate(model, prompt, steps, temperature=0.0, use_cache=False)
    assert with_cache.shape == (4, prompt_len + steps)
    assert torch.equal(with_cache, without)
    # The check has teeth: this model's greedy tokens vary and depend on what it sees; a plain
    # sliding window (which no cache of learned positions can reproduce) gives other tokens.
    assert max(len(set(row.tolist())) for row in with_cache[:, prompt_len:]) > 3
    with torch.no_grad():
        sliding = reference_greedy(model.eval(), prompt, steps)
    assert not torch.equal(sliding, with_cache)


def test_cache_feeds_one_token_per_step_between_window_jumps() -> None:
    model = gpt()
    calls = Recorder(model)
    generate(model, torch.zeros(1, 3, dtype=torch.long), 4 * BLOCK, temperature=0.0)
    keep = shifted_context(BLOCK)  # 6 of 8
    assert calls.lengths[0] == 3  # the prompt, once
    refills = [n for n in calls.lengths[1:] if n > 1]
    assert refills and all(n == keep for n in refills)
    assert calls.lengths.count(1) == len(calls.lengths) - 1 - len(refills)
    assert len(refills) <= 4 * BLOCK // (BLOCK - keep)


def test_uncached_context_stays_between_shifted_and_full_block() -> None:
    model = gpt()
    calls = Recorder(model)
    generate(model, torch.zeros(1, 20, dtype=torch.long), 30, temperature=0.0, use_cache=False)
    assert calls.lengths[0] == BLOCK  # a long prompt is cropped to one block
    assert all(shifted_context(BLOCK) <= n <= BLOCK for n in calls.lengths)


def test_generation_within_block_matches_full_recomputation_for_all_models() -> None:
    prompt = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(3))
    for name, hp in [("bigram", {}), ("mlp", {"n_embd": 4, "n_hidden": 16})]:
        torch.manual_seed(0)
        model = build_model(name, vocab_size=V, block_size=BLOCK, **hp).eval()
        with torch.no_grad():
            expected = reference_greedy(model, prompt, 3 * BLOCK)
        # bigram and MLP read fewer tokens than the shifted window, so even past block_size
        # they agree with a sliding window
        assert torch.equal(generate(model, prompt, 3 * BLOCK, temperature=0.0), expected)


def test_top_k_one_is_greedy_whatever_the_seed() -> None:
    model = gpt()
    prompt = torch.randint(0, V, (3, 2))
    greedy = generate(model, prompt, 20, temperature=0.0)
    for seed in (0, 1, 2):
        g = torch.Generator().manual_seed(seed)
        sampled = generate(model, prompt, 20, temperature=1.5, top_k=1, generator=g)
        assert torch.equal(sampled, greedy)


def test_same_generator_seed_gives_same_samples() -> None:
    model = gpt()
    prompt = torch.zeros(4, 1, dtype=torch.long)
    a = generate(model, prompt, 20, generator=torch.Generator().manual_seed(5))
    b = generate(model, prompt, 20, generator=torch.Generator().manual_seed(5))
    c = generate(model, prompt, 20, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    kept = filter_logits(probs.log(), top_p=0.7).isfinite()
    # 0.5 alone is under 0.7, so the nucleus is {0.5, 0.3}
    assert kept.tolist() == [[False, True, False, True]]
    assert filter_logits(probs.log(), top_p=0.5).isfinite().tolist() == [
        [False, True, False, False]
    ]
    assert filter_logits(probs.log(), top_p=1.0).isfinite().all()


def test_top_k_keeps_the_k_largest() -> None:
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert filter_logits(logits, top_k=2).isfinite().tolist() == [[False, True, True, False]]


def test_top_p_sampling_draws_only_from_the_nucleus() -> None:
    class Fixed(torch.nn.Module):
        """Next-token probabilities (0.6, 0.3, 0.05, 0.05) whatever the context."""

        block_size = 4

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            probs = torch.tensor([0.6, 0.3, 0.05, 0.05])
            return probs.log().expand(*idx.shape, 4)

    g = torch.Generator().manual_seed(0)
    out = generate(Fixed(), torch.zeros(200, 1, dtype=torch.long), 5, top_p=0.8, generator=g)
    drawn = out[:, 1:]
    assert set(drawn.unique().tolist()) == {0, 1}
    share = (drawn == 0).float().mean().item()
    assert share == pytest.approx(2 / 3, abs=0.05)  # renormalised: 0.6 / 0.9


def test_generate_restores_training_mode() -> None:
    model = gpt().train()
    generate(model, torch.zeros(1, 1, dtype=torch.long), 3)
    assert model.training


CORPUS = "anna\nbob\nclara\n"


def test_sample_text_returns_prompt_and_continuation() -> None:
    tok = CharTokenizer.fit(CORPUS)
    model = gpt(vocab_size=tok.vocab_size)
    texts = sample_text(
        model, tok, SamplingSettings("an", max_new_tokens=12, num_samples=3, seed=1)
    )
    assert len(texts) == 3
    assert all(t.startswith("an") and len(t) == 2 + 12 for t in texts)
    assert all(set(t) <= set(tok.itos) for t in texts)
    again = sample_text(
        model, tok, SamplingSettings("an", max_new_tokens=12, num_samples=3, seed=1)
    )
    assert again == texts
    other = sample_text(
        model, tok, SamplingSettings("an", max_new_tokens=12, num_samples=3, seed=2)
    )
    assert other != texts


def test_sample_text_empty_prompt_starts_from_boundary() -> None:
    tok = CharTokenizer.fit(CORPUS)
    model = gpt(vocab_size=tok.vocab_size)
    texts = sample_text(
        model, tok, SamplingSettings("", max_new_tokens=10, num_samples=2, temperature=0.0)
    )
    start = torch.tensor([[tok.boundary_id]])
    expected = generate(model, start, 10, temperature=0.0)[0, 1:].tolist()
    assert texts == [tok.decode(expected)] * 2  # the boundary itself is not returned


def test_sample_text_rejects_unknown_characters() -> None:
    tok = CharTokenizer.fit(CORPUS)
    model = gpt(vocab_size=tok.vocab_size)
    with pytest.raises(LmlabError, match="not in the checkpoint's vocabulary") as err:
        sample_text(model, tok, SamplingSettings("zed", max_new_tokens=5))
    missing = sorted(set("zed") - set(CORPUS))
    assert ", ".join(repr(c) for c in missing) in str(err.value)


def test_sample_text_normalises_a_decomposed_prompt_to_the_vocabulary() -> None:
    tok = CharTokenizer.fit("한국어 문장\n")  # NFC: one code point per syllable
    model = gpt(vocab_size=tok.vocab_size)
    decomposed = unicodedata.normalize("NFD", "한국")  # as macOS may type it
    settings = SamplingSettings(decomposed, max_new_tokens=3, temperature=0.0)
    (text,) = sample_text(model, tok, settings)
    assert text.startswith("한국")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"temperature": -1.0}, "temperature must be 0 .greedy. or more"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"temperature": float("nan")}, "temperature must be 0 .greedy. or more, got nan"),
        ({"top_k": -2}, "top_k must be a whole number >= 0"),
        ({"top_k": 1.5}, "top_k must be a whole number >= 0, got 1.5"),
        ({"max_new_tokens": -1}, "max_new_tokens must be a whole number >= 0"),
        ({"num_samples": 0}, "num_samples must be a whole number >= 1"),
    ],
)
def test_sampling_settings_out_of_range_are_refused(setting: dict, message: str) -> None:
    with pytest.raises(LmlabError, match=message):
        SamplingSettings(**{"max_new_tokens": 5, **setting})
    SamplingSettings(max_new_tokens=5)  # the negative control: the same call, in range
