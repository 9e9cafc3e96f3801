"""The model diagnostics: attention weights recomputed from the GPT equal the ones its SDPA
forward uses, tanh saturation and update ratios equal independent computations, the callback
measures the step just before each validation, and a tiny run writes the expected TensorBoard
tags (and a short run without `callbacks=diagnostics` writes none)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lmlab.data.tokenizers import CharTokenizer
from lmlab.diagnostics import (
    ACTIVATION_TAG,
    ATTENTION_TAG,
    GRADIENT_TAG,
    SATURATION_CHART,
    SATURATION_TAG,
    UPDATE_CHART,
    UPDATE_TAG,
    ModelDiagnostics,
    activation_sites,
    histogram_sample,
    saturated_fraction,
    update_ratio,
    validation_follows,
)
from lmlab.errors import LmlabError
from lmlab.models import build_model
from lmlab.train import train

V, T = 11, 9


def tiny_gpt() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("gpt", vocab_size=V, block_size=T, n_layer=2, n_head=3, n_embd=24)
    return model.eval()


def project(attn: torch.nn.Module, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """What the attention module outputs when it attends with `probs` (B, nh, T, T)."""
    B, nh, t, hs = v.shape
    return attn.c_proj((probs @ v).transpose(1, 2).reshape(B, t, nh * hs))


def test_attention_weights_are_the_ones_the_forward_pass_uses():
    """Each layer's recomputed weights, applied to that layer's values, give exactly the
    attention output of the real (SDPA) forward pass on the same input; the rows are
    distributions and the future gets nothing. Negative control: weights without the causal
    mask give another output."""
    model = tiny_gpt()
    idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # each attention's (input, output)
    hooks = [
        block.attn.register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
        for block in model.transformer.h
    ]
    with torch.no_grad():
        model(idx)
        for h in hooks:
            h.remove()
        maps = model.attention_maps(idx)
    assert len(maps) == 2
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    for block, probs, (x, out) in zip(model.transformer.h, maps, seen, strict=True):
        assert probs.shape == (2, 3, T, T)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, T))
        assert (probs[..., future] == 0).all()
        assert (probs[..., ~future] > 0).all()
        q, k, v = block.attn.heads(x)
        torch.testing.assert_close(project(block.attn, probs, v), out, rtol=1e-5, atol=1e-6)
        unmasked = F.softmax(q @ k.transpose(-2, -1) / math.sqrt(k.shape[-1]), dim=-1)
        assert not torch.allclose(project(block.attn, unmasked, v), out, atol=1e-4)


def test_the_first_token_attends_only_to_itself():
    probs = tiny_gpt().attention_maps(torch.tensor([[3, 1, 4]]))[0]
    torch.testing.assert_close(probs[0, :, 0], torch.tensor([[1.0, 0, 0]] * 3))


def test_saturated_fraction_counts_strictly_above_threshold():
    # |x| > 0.97: -0.98, 0.99, -1.0 and 0.971; 0.97 itself is not saturated
    x = torch.tensor([[0.5, -0.98, 0.97, 0.99], [-1.0, 0.0, 0.971, -0.2]])
    assert saturated_fraction(x) == 4 / 8
    assert saturated_fraction(x, threshold=0.5) == 5 / 8  # 0.5 itself is not above it
    assert saturated_fraction(torch.zeros(10)) == 0.0


def test_the_mlp_site_records_its_tanh_layer():
    """The MLP calls torch.tanh: its site records the hidden Linear's output through tanh,
    which the output layer turns into exactly the model's logits."""
    torch.manual_seed(0)
    model = build_model("mlp", vocab_size=V, block_size=T, context=3, n_embd=4, n_hidden=16)
    site = activation_sites(model)["hidden_tanh"]
    recorded = []
    hook = site.module.register_forward_hook(lambda m, i, o: recorded.append(site.transform(o)))
    idx = torch.randint(0, V, (2, T))
    with torch.no_grad():
        logits = model(idx)
    hook.remove()
    assert site.tanh
    (tanh,) = recorded
    assert tanh.shape == (2, T, 16) and tanh.abs().max() < 1
    torch.testing.assert_close(model.lm_head(tanh), logits)


def sgd_step(lr: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One SGD step on a known gradient: (weights before, after, gradient)."""
    gen = torch.Generator().manual_seed(2)
    w = torch.nn.Parameter(torch.randn(6, 5, generator=gen) * 0.3)
    x = torch.randn(6, 5, generator=gen)
    before = w.detach().clone()
    (w * x).sum().backward()  # d/dw = x
    torch.optim.SGD([w], lr=lr).step()
    return before, w.detach(), x


def test_update_ratio_of_an_sgd_step_is_log10_of_lr_grad_over_data():
    before, after, grad = sgd_step(lr=0.1)
    expected = math.log10(np.std(0.1 * grad.numpy(), ddof=1) / np.std(before.numpy(), ddof=1))
    assert update_ratio(before, after) == pytest.approx(expected, abs=1e-6)
    # a 10x smaller rate is exactly one decade lower
    before2, after2, _ = sgd_step(lr=0.01)
    assert update_ratio(before2, after2) == pytest.approx(expected - 1, abs=1e-6)
    assert update_ratio(before, before) is None  # no change: no ratio (not -inf)
    assert update_ratio(torch.ones(3, 3), after[:3, :3]) is None  # constant data


class Recorder:
    """A logger that keeps what log_metrics received."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.append((step, dict(metrics)))


def fake_trainer(global_step: int, batch: int, every: int = 10, max_steps: int = 100):
    progress = SimpleNamespace(is_last_batch=False)
    loop = SimpleNamespace(batch_progress=progress, total_batch_idx=batch, batch_idx=batch)
    return SimpleNamespace(
        max_steps=max_steps,
        global_step=global_step,
        fit_loop=SimpleNamespace(epoch_loop=loop),
        val_check_batch=every,
        check_val_every_n_epoch=None,
        is_global_zero=True,
        loggers=[Recorder()],
        sanity_checking=False,
    )


def test_validation_follows_the_last_batch_of_each_interval_and_the_last_step():
    assert [b for b in range(30) if validation_follows(fake_trainer(b, b))] == [9, 19, 29]
    assert validation_follows(fake_trainer(99, 203))  # the last step: lmlab's final estimate
    time_based = fake_trainer(3, 3, every=float("inf"))
    assert not validation_follows(time_based)
    time_based.fit_loop.epoch_loop.batch_progress.is_last_batch = True
    assert validation_follows(time_based)


@pytest.mark.parametrize("batch", [9, 4])
def test_the_callback_logs_the_update_ratio_of_the_step_before_a_validation(batch: int):
    """The callback's hooks around one SGD step: the logged ratio is the independent one,
    under the weight's name, at the step count after it; on a step that no validation
    follows (batch 4 of 10; the negative control) nothing is copied or logged."""
    lr = 0.05
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh())
    module = SimpleNamespace(model=model)
    trainer = fake_trainer(global_step=batch, batch=batch)
    callback = ModelDiagnostics(min_steps=0)
    model(torch.randn(8, 4)).pow(2).sum().backward()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    weight = model[0].weight
    before, grad = weight.detach().clone(), weight.grad.clone()

    callback.on_before_optimizer_step(trainer, module, optimizer)
    optimizer.step()
    trainer.global_step += 1
    callback.on_train_batch_end(trainer, module, None, None, batch)

    logged = trainer.loggers[0].metrics
    if batch == 4:
        assert logged == []
        return
    expected = math.log10(float((lr * grad).std() / before.std()))
    assert logged == [(batch + 1, {UPDATE_TAG.format("0/weight"): pytest.approx(expected)})]


def test_the_callback_is_off_below_min_steps():
    callback = ModelDiagnostics(min_steps=500)
    assert not callback.enabled(fake_trainer(0, 0, max_steps=499))
    assert ModelDiagnostics(min_steps=500).enabled(fake_trainer(0, 0, max_steps=500))
    assert ModelDiagnostics(min_steps=500).enabled(fake_trainer(0, 0, max_steps=-1))  # epochs
    assert ModelDiagnostics(min_steps=0).enabled(fake_trainer(0, 0, max_steps=10))


def test_a_prompt_outside_the_vocabulary_fails_at_setup():
    tokenizer = CharTokenizer.fit("abc \n")
    module = SimpleNamespace(
        hparams=SimpleNamespace(tokenizer_state=tokenizer.state()),
        model=SimpleNamespace(block_size=4),
    )
    callback = ModelDiagnostics(min_steps=0, prompt="cab a")
    callback.setup(fake_trainer(0, 0), module, "fit")
    assert callback.prompt_ids.tolist() == tokenizer.encode("cab ").tolist()  # block_size 4
    with pytest.raises(LmlabError, match="Z"):
        ModelDiagnostics(min_steps=0, prompt="aZ").setup(fake_trainer(0, 0), module, "fit")


def chart_titles(run: Path) -> list[str]:
    """The titles of the Custom Scalars charts that the run's event files lay out."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    events = EventAccumulator(str(run))
    events.Reload()
    (config,) = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    return [chart.title for category in layout.category for chart in category.chart]


def tags_and_steps(run: Path) -> dict[str, list[int]]:
    events = EventAccumulator(str(run), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    steps = {t: [e.step for e in events.Scalars(t)] for t in tags["scalars"]}
    steps |= {t: [e.step for e in events.Histograms(t)] for t in tags["histograms"]}
    steps |= {t: [e.step for e in events.Images(t)] for t in tags["images"]}
    return steps


@pytest.mark.slow  # a short training
def test_a_tiny_gpt_run_writes_the_pictures_at_each_validation(tiny_train_cfg):
    """callbacks=diagnostics on a 20-step GPT run, validated at steps 0, 10 and 20:
    attention maps and activations at every validation, gradients and update ratios of the
    steps just before validations 10 and 20."""
    cfg = tiny_train_cfg(
        "callbacks=diagnostics",
        "model=gpt",
        "model.n_layer=2",
        "model.n_head=2",
        "model.n_embd=16",
        "data.block_size=16",
        "trainer.limit_val_batches=2",
    )
    assert train(cfg)["status"] == "completed"
    steps = tags_and_steps(Path(cfg.paths.output_dir))
    for layer in (0, 1):
        assert steps[ATTENTION_TAG.format(layer)] == [0, 10, 20]
        for site in ("attn", "mlp_gelu", "residual"):
            assert steps[ACTIVATION_TAG.format(f"layer{layer}/{site}")] == [0, 10, 20]
        weight = f"transformer/h/{layer}/mlp/c_fc/weight"
        assert steps[UPDATE_TAG.format(weight)] == [10, 20]
        assert steps[GRADIENT_TAG.format(weight)] == [10, 20]
    assert steps[UPDATE_TAG.format("transformer/wte/weight")] == [10, 20]
    assert not any("tanh_saturated" in tag for tag in steps)  # the GPT has no tanh
    assert chart_titles(Path(cfg.paths.output_dir)) == [*UPDATE_CHART]  # no saturation chart


@pytest.mark.slow  # two short trainings
def test_an_mlp_run_logs_tanh_saturation_and_a_short_run_logs_nothing(tiny_train_cfg):
    cfg = tiny_train_cfg("callbacks=diagnostics", "model=mlp", "trainer.limit_val_batches=2")
    assert train(cfg)["status"] == "completed"
    steps = tags_and_steps(Path(cfg.paths.output_dir))
    assert steps[SATURATION_TAG.format("hidden_tanh")] == [0, 10, 20]
    assert steps[ACTIVATION_TAG.format("hidden_tanh")] == [0, 10, 20]
    assert steps[UPDATE_TAG.format("hidden/weight")] == [10, 20]
    assert not any(tag.startswith("visual/attention") for tag in steps)  # no attention
    assert chart_titles(Path(cfg.paths.output_dir)) == [*UPDATE_CHART, *SATURATION_CHART]

    # negative control: the default callbacks skip a 20-step run (min_steps 500)
    short = tiny_train_cfg("model=mlp", "trainer.limit_val_batches=2")
    short.paths.output_dir = str(Path(cfg.paths.output_dir).with_name("short"))
    assert train(short)["status"] == "completed"
    steps = tags_and_steps(Path(short.paths.output_dir))
    assert "val/loss" in steps
    assert not any(tag.startswith(("diagnostics/", "visual/attention")) for tag in steps)


def test_histogram_sample_keeps_small_tensors_and_draws_fixed_positions_of_large_ones():
    small = torch.arange(12.0).reshape(3, 4)
    torch.testing.assert_close(histogram_sample(small, size=12), small.flatten())
    large = torch.arange(1000.0)
    sample = histogram_sample(large, size=100)
    assert sample.shape == (100,)
    assert set(sample.tolist()) <= set(large.tolist())
    torch.testing.assert_close(histogram_sample(large, size=100), sample)  # the same each time
    assert sample.std() > 200  # spread over the whole range, not its first 100 values
