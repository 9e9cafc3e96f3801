"""The causal bag of words: the lecture's three averaging formulations agree, the model is
causal, trains on the tiny corpus, and its checkpoint samples through lmlab-sample."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import compose_train, run_lmlab

from lmlab.errors import LmlabError
from lmlab.models import BagOfWords, build_model, check_block_size
from lmlab.models.bow import causal_average, uniform_causal_weights

V, T, B, C = 13, 8, 4, 5


def tiny(**overrides) -> BagOfWords:
    torch.manual_seed(0)
    hparams = {"n_embd": 8, "n_hidden": 32, **overrides}
    return build_model("bow", vocab_size=V, block_size=T, **hparams).eval()


def _loop_average(x: torch.Tensor) -> torch.Tensor:
    """Version 1: xbow[b, t] = mean(x[b, :t+1]), two Python loops."""
    xbow = torch.zeros_like(x)
    for b in range(x.size(0)):
        for t in range(x.size(1)):
            xbow[b, t] = x[b, : t + 1].mean(0)
    return xbow


def test_the_three_formulations_and_the_model_agree() -> None:
    torch.manual_seed(1337)
    x = torch.randn(B, T, C, dtype=torch.float64)
    xbow1 = _loop_average(x)
    tril = torch.tril(torch.ones(T, T, dtype=torch.float64))
    xbow2 = (tril / tril.sum(1, keepdim=True)) @ x  # version 2: a normalised tril matmul
    wei = torch.zeros(T, T, dtype=torch.float64).masked_fill(tril == 0, float("-inf"))
    xbow3 = wei.softmax(-1) @ x  # version 3: softmax over masked zeros
    for other in (xbow2, xbow3, causal_average(x)):
        assert torch.allclose(other, xbow1, rtol=0, atol=1e-12)
    assert torch.allclose(uniform_causal_weights(T).double(), tril / tril.sum(1, keepdim=True))
    # negative control: averaging over every position (no mask) sees the future
    unmasked = torch.zeros(T, T, dtype=torch.float64).softmax(-1) @ x
    assert not torch.allclose(unmasked, xbow1, atol=1e-3)
    assert torch.allclose(unmasked[:, -1], xbow1[:, -1])  # only the last position agrees


def test_logits_have_shape_b_t_v_and_longer_is_refused() -> None:
    model = tiny()
    idx = torch.randint(0, V, (B, T))
    assert model(idx).shape == (B, T, V)
    assert model(idx[:, :3]).shape == (B, 3, V)
    assert model.block_size == model.config.block_size == T
    with pytest.raises(LmlabError, match="model.block_size"):
        model(torch.zeros(1, T + 1, dtype=torch.long))
    check_block_size(model, T)
    with pytest.raises(LmlabError, match=f"data.block_size={T}"):
        check_block_size(model, T + 1)


@pytest.mark.parametrize("t", [0, 3, T - 2])
def test_logits_at_t_ignore_tokens_after_t(t: int) -> None:
    model = tiny()
    idx = torch.randint(0, V, (B, T))
    changed = idx.clone()
    changed[:, t + 1 :] = (idx[:, t + 1 :] + 1) % V
    with torch.no_grad():
        before, after = model(idx), model(changed)
    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], rtol=0, atol=0)
    assert not torch.allclose(after[:, t + 1 :], before[:, t + 1 :])


def test_logits_at_t_see_the_whole_past() -> None:
    """Unlike the MLP's fixed context, token 0 still informs the last position."""
    model = tiny()
    idx = torch.randint(0, V, (B, T))
    changed = idx.clone()
    changed[:, 0] = (idx[:, 0] + 1) % V
    with torch.no_grad():
        assert not torch.allclose(model(changed)[:, -1], model(idx)[:, -1])


def test_trains_on_the_tiny_corpus_and_samples(tiny_corpus: Path, tmp_path: Path) -> None:
    from lmlab.train import train  # imported late: collecting tests stays fast

    overrides = [
        f"data.path={tiny_corpus}",
        "model=bow",
        "trainer.accelerator=cpu",
        "trainer.max_steps=30",
        "trainer.val_check_interval=30",
        "trainer.enable_progress_bar=false",
        "data.block_size=16",
        "callbacks.sample_text.max_new_tokens=20",
    ]
    run = tmp_path / "run"
    summary = train(compose_train(overrides, run))
    vocab = len(set(tiny_corpus.read_text()))
    assert summary["last"]["val/loss"] < math.log(vocab)

    ckpt = run / "checkpoints" / "last.ckpt"
    result = run_lmlab("sample", f"ckpt_path={ckpt}", "prompt=Speak", "max_new_tokens=40")
    assert result.returncode == 0, result.stderr
    assert "Speak" in result.stdout
