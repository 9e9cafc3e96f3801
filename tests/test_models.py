"""The model ladder: shapes, causality, learning, GPT details and its key/value cache."""

from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from lmlab.errors import LmlabError
from lmlab.lit_module import lm_loss
from lmlab.models import GPT, MODELS, build_model
from lmlab.models.gpt import GPTConfig
from lmlab.models.mlp import MLPConfig
from lmlab.optim import build_adamw

V, T, B = 13, 8, 4
TINY = {
    "bigram": {},
    "mlp": {"context": 3, "n_embd": 8, "n_hidden": 32, "boundary_id": 0},
    "bow": {"n_embd": 8, "n_hidden": 32},
    "gpt": {"n_layer": 2, "n_head": 2, "n_embd": 32},
}


def tiny(name: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, vocab_size=V, block_size=T, **{**TINY[name], **overrides}).eval()


@pytest.mark.parametrize("name", sorted(TINY))
def test_logits_have_shape_b_t_v(name: str) -> None:
    model = tiny(name)
    idx = torch.randint(0, V, (B, T))
    assert model(idx).shape == (B, T, V)
    assert model(idx[:, :3]).shape == (B, 3, V)  # shorter windows too
    assert model.block_size == T
    assert model.config.vocab_size == V


def test_every_registered_model_is_tested_here() -> None:
    assert set(MODELS) == set(TINY)


@pytest.mark.parametrize("name", ["mlp", "gpt"])
@pytest.mark.parametrize("t", [0, 3, T - 1])
def test_logits_at_t_depend_only_on_tokens_up_to_t(name: str, t: int) -> None:
    model = tiny(name)
    idx = torch.randint(0, V, (B, T))
    changed = idx.clone()
    changed[:, t] = (idx[:, t] + 1) % V
    with torch.no_grad():
        before, after = model(idx), model(changed)
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=0)
    assert not torch.allclose(after[:, t], before[:, t]), "token t must inform position t"


def test_mlp_reads_exactly_its_context() -> None:
    model = tiny("mlp", context=3)
    idx = torch.randint(0, V, (B, T))
    changed = idx.clone()
    changed[:, 2] = (idx[:, 2] + 1) % V
    with torch.no_grad():
        before, after = model(idx), model(changed)
    assert not torch.allclose(after[:, 4], before[:, 4])  # t=4 reads tokens 2, 3, 4
    torch.testing.assert_close(after[:, 5:], before[:, 5:], rtol=0, atol=0)  # t=5 does not


def test_mlp_pads_with_the_boundary_token() -> None:
    # A window that starts with the boundary token predicts, at t=1, exactly what a window
    # starting one token later predicts at t=0: both see (boundary, boundary, x).
    model = tiny("mlp", context=3, boundary_id=5)
    idx = torch.randint(0, V, (B, T))
    idx[:, 0] = 5
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[:, 1], model(idx[:, 1:])[:, 0])


def test_mlp_rejects_boundary_outside_vocabulary() -> None:
    with pytest.raises(LmlabError, match="boundary_id"):
        MLPConfig(vocab_size=V, block_size=T, boundary_id=V)


def _cyclic_batch() -> tuple[torch.Tensor, torch.Tensor]:
    # Each next token is a fixed function of the current one, so even the bigram can fit it.
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(V, generator=g)
    seq = torch.empty(B, T + 1, dtype=torch.long)
    seq[:, 0] = torch.randint(0, V, (B,), generator=g)
    for t in range(T):
        seq[:, t + 1] = perm[seq[:, t]]
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()  # lm_loss views the targets


@pytest.mark.parametrize(
    ("name", "lr", "steps"), [("bigram", 0.1, 100), ("mlp", 3e-2, 40), ("gpt", 1e-2, 40)]
)
def test_each_model_overfits_one_batch(name: str, lr: float, steps: int) -> None:
    model = tiny(name).train()
    x, y = _cyclic_batch()
    optimizer = build_adamw(model, lr=lr)
    losses = []
    for _ in range(steps):
        loss = lm_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 0.8 * math.log(V)  # starts from about chance
    assert losses[-1] < 0.1 * losses[0], f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_gpt_ignores_padded_targets() -> None:
    model = tiny("gpt")
    x, y = _cyclic_batch()
    padded = y.clone()
    padded[:, 5:] = -1
    logits = model(x)
    expected = torch.nn.functional.cross_entropy(logits[:, :5].reshape(-1, V), y[:, :5].reshape(-1))
    torch.testing.assert_close(lm_loss(logits, padded), expected)


def test_gpt_lm_head_is_tied_to_token_embedding() -> None:
    model = tiny("gpt")
    assert model.lm_head.weight is model.transformer.wte.weight
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == sum(p.numel() for p in set(model.parameters()))
    assert n_params < sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))


def test_gpt_init_scales_residual_projections() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=8, n_head=4, n_embd=128))
    std_proj = model.transformer.h[0].attn.c_proj.weight.std().item()
    std_fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert std_fc == pytest.approx(0.02, rel=0.05)
    assert std_proj == pytest.approx(0.02 / 4.0, rel=0.05)  # 0.02 / sqrt(2 * 8)


def test_gpt_n_embd_must_divide_by_n_head() -> None:
    with pytest.raises(LmlabError) as err:
        GPTConfig(vocab_size=V, block_size=T, n_embd=128, n_head=5)
    message = str(err.value)
    assert "model.n_embd (128) must be divisible by model.n_head (5)" in message
    assert "model.n_head=4" in message  # a divisor of 128 near what was asked


def test_gpt_rejects_sequences_longer_than_block_size() -> None:
    model = tiny("gpt")
    with pytest.raises(LmlabError, match=r"longer than model.block_size \(8\)"):
        model(torch.zeros(1, T + 1, dtype=torch.long))


def test_gpt_dropout_is_active_only_in_training() -> None:
    model = tiny("gpt", dropout=0.5)
    idx = torch.randint(0, V, (B, T))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), model(idx))
        model.train()
        assert not torch.allclose(model(idx), model(idx))


def test_kv_cache_logits_equal_full_recomputation() -> None:
    model = tiny("gpt", n_layer=3)
    idx = torch.randint(0, V, (B, T))
    with torch.no_grad():
        full = model(idx)  # (B, T, V)
        cache = model.init_cache()
        pieces = [model(idx[:, :3], kv_cache=cache)]  # prefill
        pieces += [model(idx[:, t : t + 1], kv_cache=cache) for t in (3, 4)]  # one at a time
        pieces.append(model(idx[:, 5:], kv_cache=cache))  # a chunk continuing the cache
    assert cache.length == T
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def test_kv_cache_reset_starts_over() -> None:
    model = tiny("gpt")
    a, b = torch.randint(0, V, (2, B, T))
    with torch.no_grad():
        cache = model.init_cache()
        model(a, kv_cache=cache)
        cache.reset()
        assert torch.allclose(model(b[:, :5], kv_cache=cache), model(b[:, :5]), atol=1e-5)
        assert torch.allclose(model(b[:, 5:6], kv_cache=cache)[:, 0], model(b)[:, 5], atol=1e-5)


def test_full_kv_cache_is_an_error() -> None:
    model = tiny("gpt")
    cache = model.init_cache()
    with torch.no_grad():
        model(torch.zeros(1, T - 1, dtype=torch.long), kv_cache=cache)
        with pytest.raises(LmlabError, match="reset the cache"):
            model(torch.zeros(1, 2, dtype=torch.long), kv_cache=cache)


@pytest.mark.parametrize("name", ["mlp", "gpt"])
def test_model_config_builds_from_its_yaml(name: str) -> None:
    """The yaml's network keys are exactly the config's hyperparameters (vocab is injected)."""
    with initialize_config_module(config_module="lmlab.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={name}"])
    hparams = OmegaConf.to_container(cfg.model, resolve=True)
    for key in ("name", "compile", "optimizer", "scheduler"):
        hparams.pop(key)
    model = build_model(name, vocab_size=V, **hparams)
    assert model.block_size == cfg.data.block_size
    assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, V)
