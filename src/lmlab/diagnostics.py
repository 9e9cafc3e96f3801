"""Pictures of what the model learned and of how healthy its training is, at each validation:
the GPT's attention maps on a fixed prompt, histograms of activations and gradients, the
fraction of saturated tanh units and the update-to-data ratio of each weight matrix (makemore
part 3's diagnostics), in TensorBoard. What healthy and unhealthy pictures look like:
docs/diagnostics.md.

Everything is measured on one step or one batch per validation, so it costs a fraction of the
validation itself: the first validation batch's activations (forward hooks), the gradients and
the parameter change of the optimizer step just before the validation (a copy of the weights
taken only on that step), one forward pass of the prompt for the attention maps."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lmlab.models import GPT, BagOfWords, BengioMLP

log = logging.getLogger("lmlab")

# |tanh| above this is a unit in its flat tail, whose gradient (1 - tanh^2 < 0.06) barely
# flows: makemore part 3's threshold.
SATURATION = 0.97
HISTOGRAM_VALUES = 1 << 16  # values of an activation that its histogram is drawn from
ATTENTION_TAG = "visual/attention/layer{}"  # the Images tab's group, as visual/token_embedding
ACTIVATION_TAG = "diagnostics/activation/{}"
GRADIENT_TAG = "diagnostics/gradient/{}"
UPDATE_TAG = "diagnostics/update_ratio/{}"
SATURATION_TAG = "diagnostics/tanh_saturated/{}"
# Custom Scalars tab: all update ratios on one chart, as makemore plots them, and the same for
# saturation, instead of one small chart per weight matrix
UPDATE_CHART = {
    "update-to-data ratio, log10 std(update) / std(weights)": [
        "Multiline",
        [UPDATE_TAG.format(".*")],
    ]
}
SATURATION_CHART = {
    "fraction of saturated tanh units (|tanh| > 0.97)": [
        "Multiline",
        [SATURATION_TAG.format(".*")],
    ]
}


@dataclass
class Site:
    """A place whose activations are recorded: the output of `module`, through `transform`
    when the activation itself is not a module's output (the MLP's functional tanh)."""

    module: nn.Module
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    tanh: bool = False  # its saturation fraction is logged too


def activation_sites(model: nn.Module) -> dict[str, Site]:
    """The activations worth a histogram, by name: the MLP's tanh layer (recomputed from the
    hidden Linear's output, since the model calls torch.tanh), the bag of words' GELU, and
    for each GPT block its attention output, its MLP's GELU and the residual stream after it.
    Another model: its tanh, GELU and ReLU modules."""
    if isinstance(model, BengioMLP):
        return {"hidden_tanh": Site(model.hidden, torch.tanh, tanh=True)}
    if isinstance(model, BagOfWords):
        return {"hidden_gelu": Site(model.gelu)}
    if isinstance(model, GPT):
        sites = {}
        for i, block in enumerate(model.transformer.h):
            sites[f"layer{i}/attn"] = Site(block.attn)
            sites[f"layer{i}/mlp_gelu"] = Site(block.mlp.gelu)
            sites[f"layer{i}/residual"] = Site(block)
        return sites
    kinds = (nn.Tanh, nn.GELU, nn.ReLU)
    return {
        name.replace(".", "/"): Site(module, tanh=isinstance(module, nn.Tanh))
        for name, module in model.named_modules()
        if isinstance(module, kinds)
    }


def weight_matrices(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters with two or more dimensions (embeddings, Linear weights), by name with
    `/` for `.`: makemore's update-ratio plot leaves out biases and LayerNorm gains, whose
    scale says little. A tied matrix (the GPT's wte = lm_head) appears once."""
    return {
        name.replace(".", "/"): p
        for name, p in model.named_parameters()
        if p.ndim >= 2 and p.requires_grad
    }


def saturated_fraction(activation: torch.Tensor, threshold: float = SATURATION) -> float:
    """The fraction of the values of a tanh activation with |value| > threshold."""
    return float((activation.abs() > threshold).float().mean())


def update_ratio(old: torch.Tensor, new: torch.Tensor) -> float | None:
    """log10(std(new - old) / std(old)): the step's size relative to the weights' (makemore
    part 3: about -3 is healthy; far below, the weights barely move; near -1, each step
    rewrites a tenth of them). None when the ratio is undefined (weights all equal, no change).
    For plain SGD, new - old = -lr * grad, so this is makemore's std(lr * grad) / std(data)."""
    data_std = float(old.double().std())
    change_std = float((new.double() - old.double()).std())
    if not (data_std > 0 and change_std > 0 and math.isfinite(change_std / data_std)):
        return None
    return math.log10(change_std / data_std)


def histogram_sample(values: torch.Tensor, size: int = HISTOGRAM_VALUES) -> torch.Tensor:
    """At most `size` of the values, drawn at random positions (the same ones each time): a
    histogram of a few thousand values has the shape of the whole, at a fraction of the cost
    (a GPT's MLP activations are millions of values a batch)."""
    flat = values.flatten()
    if flat.numel() <= size:
        return flat
    positions = torch.randint(flat.numel(), (size,), generator=torch.Generator().manual_seed(0))
    return flat[positions]


def validation_follows(trainer: L.Trainer) -> bool:
    """Whether the Trainer validates right after the batch in progress: every
    `val_check_batch` batches (counted over the run, or within the epoch when validating
    every n epochs), at an epoch's last batch, and after the last step (lmlab-train's final
    estimate). Lightning's own test is private; a validation that this misses simply has no
    gradient and update pictures."""
    loop = trainer.fit_loop.epoch_loop
    if trainer.max_steps > 0 and trainer.global_step + 1 >= trainer.max_steps:
        return True
    if loop.batch_progress.is_last_batch:
        return True
    every = trainer.val_check_batch
    if every is None or not math.isfinite(every):
        return False
    index = loop.total_batch_idx if trainer.check_val_every_n_epoch is None else loop.batch_idx
    return (index + 1) % int(every) == 0


class AttentionFigure:
    """One layer's heads side by side: head h's (T, T) weights, queries down, keys across,
    the prompt's tokens as both axes' labels, white for 0 and dark for 1.

    Drawn in full once; later validations draw only the pictures and the title over a copy of
    the rest (matplotlib's blitting): laying out and drawing a few hundred tick labels again
    would cost more than the validation's forward passes of a small model."""

    def __init__(self, maps: torch.Tensor, labels: list[str], title: str) -> None:
        from lmlab.runs.render import new_figure

        n_head, T, _ = maps.shape
        size = 1.2 + 0.17 * T  # inches a head: room for T labels
        self.figure = new_figure(size * n_head + 1.0, size + 1.0)
        axes = self.figure.subplots(1, n_head, squeeze=False)[0]
        self.images = []
        for h, ax in enumerate(axes):
            self.images.append(ax.imshow(maps[h].numpy(), cmap="Blues", vmin=0.0, vmax=1.0))
            ax.set_title(f"head {h}", fontsize=10)
            ax.set_xticks(range(T), labels, rotation=90, fontsize=8)
            ax.set_yticks(range(T), labels if h == 0 else [""] * T, fontsize=8)
            ax.set_xlabel("key (attended to)", fontsize=9)
            if h == 0:
                ax.set_ylabel("query (attending)", fontsize=9)
        self.figure.colorbar(self.images[0], ax=list(axes), shrink=0.8, label="attention weight")
        self.title = self.figure.suptitle(title, fontsize=10)
        self.figure.canvas.draw()  # the constrained layout, computed once and then kept
        self.figure.set_layout_engine("none")
        changing = [*self.images, self.title]
        for artist in changing:
            artist.set_visible(False)
        self.figure.canvas.draw()
        self.background = self.figure.canvas.copy_from_bbox(self.figure.bbox)
        for artist in changing:
            artist.set_visible(True)

    def render(self, maps: torch.Tensor, title: str) -> np.ndarray:
        """The picture of `maps` (nh, T, T) as an (H, W, 3) uint8 array."""
        canvas = self.figure.canvas
        canvas.restore_region(self.background)
        for image, head in zip(self.images, maps, strict=True):
            image.set_data(head.numpy())
            self.figure.draw_artist(image)
            for spine in image.axes.spines.values():  # the frame, which the picture covered
                self.figure.draw_artist(spine)
        self.title.set_text(title)
        self.figure.draw_artist(self.title)
        return np.asarray(canvas.buffer_rgba())[..., :3].copy()


class ModelDiagnostics(L.Callback):
    """At each validation (not the sanity check), to TensorBoard:

    - `visual/attention/layer<i>` (Images): each head's attention weights on a fixed prompt
      (a GPT only): `prompt`, or else the first `prompt_tokens` tokens of the first
      validation batch of the run;
    - `diagnostics/activation/<site>` (Histograms): the activations of the first validation
      batch at each site of `activation_sites`, and `diagnostics/tanh_saturated/<site>`
      (Scalars) for a tanh;
    - `diagnostics/gradient/<weight>` (Histograms) and `diagnostics/update_ratio/<weight>`
      (Scalars, also one chart in Custom Scalars) for each weight matrix, from the optimizer
      step just before the validation (the gradient as the optimizer got it, after clipping).

    Scalars go to every logger; images and histograms to TensorBoard loggers only. Runs of
    fewer than `min_steps` steps (trainer.max_steps) are left alone: their validations are
    seconds apart and would be mostly pictures.
    """

    def __init__(self, min_steps: int = 500, prompt: str = "", prompt_tokens: int = 24) -> None:
        self.min_steps = int(min_steps)
        self.prompt = prompt
        self.prompt_tokens = max(1, int(prompt_tokens))
        self.prompt_ids: torch.Tensor | None = None  # (T,), fixed at the first validation
        self._enabled: bool | None = None  # decided once, when the trainer is known
        self._hooks: list[Any] = []
        self._activations: dict[str, torch.Tensor] = {}
        self._before_step: dict[str, torch.Tensor] | None = None
        self._layout_written = False
        self._figures: dict[int, AttentionFigure] = {}  # by layer
        self._labels: list[str] = []  # the prompt's tokens

    # ---- on or off ----------------------------------------------------------------------
    def enabled(self, trainer: L.Trainer) -> bool:
        if self._enabled is None:
            max_steps = trainer.max_steps
            self._enabled = self.min_steps <= 0 or max_steps < 0 or max_steps >= self.min_steps
            if not self._enabled:
                log.info(
                    "diagnostics: off for a run of %d steps (fewer than "
                    "callbacks.diagnostics.min_steps=%d); callbacks=diagnostics turns them on",
                    max_steps,
                    self.min_steps,
                )
        return self._enabled and trainer.is_global_zero

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # a prompt the tokenizer cannot encode fails the run now, not at its first validation
        if self.prompt and self.prompt_ids is None and self.enabled(trainer):
            from lmlab.data.tokenizers import tokenizer_from_state

            tokenizer = tokenizer_from_state(pl_module.hparams.tokenizer_state)
            ids = torch.as_tensor(tokenizer.encode(self.prompt), dtype=torch.long)
            self.prompt_ids = ids[: min(self.prompt_tokens, pl_module.model.block_size)]

    # ---- the step before a validation: gradients and update ratios ----------------------
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        if self.enabled(trainer) and validation_follows(trainer):
            weights = weight_matrices(pl_module.model)
            self._before_step = {name: p.detach().clone() for name, p in weights.items()}

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._before_step is None:
            return
        before, self._before_step = self._before_step, None
        step = trainer.global_step
        scalars = {}
        writers = tensorboards(trainer)
        for name, p in weight_matrices(pl_module.model).items():
            if name not in before:
                continue
            ratio = update_ratio(before[name], p.detach())
            if ratio is not None:
                scalars[UPDATE_TAG.format(name)] = ratio
            if p.grad is not None:
                for writer in writers:
                    grad = p.grad.detach().float().cpu()
                    writer.add_histogram(GRADIENT_TAG.format(name), grad, global_step=step)
        self._write_layout(writers, pl_module.model)
        log_scalars(trainer, scalars, step)

    # ---- validation: activations of the first batch, attention on the prompt ------------
    def on_validation_batch_start(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx != 0 or dataloader_idx != 0 or trainer.sanity_checking:
            return
        if not self.enabled(trainer):
            return
        if self.prompt_ids is None:
            self.prompt_ids = batch[0][0, : self.prompt_tokens].detach().cpu()
        for name, site in activation_sites(pl_module.model).items():
            self._hooks.append(site.module.register_forward_hook(self._recorder(name, site)))

    def _recorder(self, name: str, site: Site) -> Callable[..., None]:
        def record(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            value = output.detach()
            if site.transform is not None:
                value = site.transform(value)
            self._activations[name] = value.float().cpu()

        return record

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._remove_hooks()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_hooks()
        if trainer.sanity_checking or not self.enabled(trainer):
            return
        step = trainer.global_step
        writers = tensorboards(trainer)
        activations, self._activations = self._activations, {}
        sites = activation_sites(pl_module.model)
        scalars = {}
        for name, value in activations.items():
            sample = histogram_sample(value)
            for writer in writers:
                writer.add_histogram(ACTIVATION_TAG.format(name), sample, global_step=step)
            if sites[name].tanh:
                scalars[SATURATION_TAG.format(name)] = saturated_fraction(value)
        self._write_layout(writers, pl_module.model)
        log_scalars(trainer, scalars, step)
        if writers and isinstance(pl_module.model, GPT) and self.prompt_ids is not None:
            self._write_attention(writers, pl_module, step)

    def _write_attention(self, writers: list[Any], pl_module: L.LightningModule, step: int) -> None:
        from lmlab.data.tokenizers import tokenizer_from_state
        from lmlab.embeddings import token_labels

        model = pl_module.model
        ids = self.prompt_ids[: model.block_size]
        with torch.no_grad():
            maps = model.attention_maps(ids[None].to(pl_module.device))  # n_layer x (1, nh, T, T)
        if not self._figures:  # the labels once: a BPE tokenizer takes a while to load
            tokenizer = tokenizer_from_state(pl_module.hparams.tokenizer_state)
            # token_labels adds `#id` to repeated labels: a repeated token is the same token
            self._labels = [token_labels(tokenizer, [i])[0] for i in ids.tolist()]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Glyph .* missing from")
            for layer, probs in enumerate(maps):
                probs = probs[0].float().cpu()  # (nh, T, T)
                title = f"layer {layer} attention at step {step}"
                if layer not in self._figures:
                    self._figures[layer] = AttentionFigure(probs, self._labels, title)
                picture = self._figures[layer].render(probs, title)  # (H, W, 3)
                for writer in writers:
                    tag = ATTENTION_TAG.format(layer)
                    writer.add_image(tag, picture, step, dataformats="HWC")

    def _write_layout(self, writers: list[Any], model: nn.Module) -> None:
        if writers and not self._layout_written:
            charts = dict(UPDATE_CHART)
            if any(site.tanh for site in activation_sites(model).values()):
                charts |= SATURATION_CHART
            for writer in writers:
                writer.add_custom_scalars({"diagnostics": charts})
            self._layout_written = True

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._remove_hooks()


def tensorboards(trainer: L.Trainer) -> list[Any]:
    """The SummaryWriters of the run's TensorBoard loggers: images and histograms go there."""
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def log_scalars(trainer: L.Trainer, scalars: dict[str, float], step: int) -> None:
    """To every logger (CSV and MLflow keep them too), at `step`, as lmlab logs val/loss."""
    if scalars:
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
