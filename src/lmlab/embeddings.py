"""What the model learned in its token embeddings: at the end of training, the embedding matrix
goes to TensorBoard's Projector (tokens as labels) and to `embeddings.png` in the run directory,
the tokens on the matrix's first two principal components, as makemore part 2 draws them."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from lmlab.models import GPT, BagOfWords, BengioMLP, BigramLM

log = logging.getLogger("lmlab")

PLOT_NAME = "embeddings.png"
TAG = "token_embedding"  # the Projector's tag
# The Images tab's: a group that sorts after train/ and val/, which Time Series opens on first
IMAGE_TAG = "visual/token_embedding"
# Token counts that pick the most frequent tokens are read from at most this many tokens of
# the training stream: ~16M ids, a fraction of a second, however large the corpus.
FREQUENCY_SAMPLE = 1 << 24
# Whitespace and line ends, shown: a label that is a blank, or that breaks metadata.tsv's lines
# and columns, would be useless in the Projector and the plot.
VISIBLE = {" ": "\u2423", "\n": "\\n", "\t": "\\t", "\r": "\\r"}  # \u2423 is the open box ␣


def token_embedding(model: nn.Module) -> torch.Tensor | None:
    """The (V, C) token embedding matrix of a model of the ladder; None for another model.

    The bigram's table has a row per token, its next-token logits (or, when factorised, a
    `rank`-dimensional code for them): tokens close together predict alike. The MLP's lookup
    table is the lecture's C. The GPT's `wte` is tied to its lm_head: one matrix both embeds
    tokens and scores them."""
    if isinstance(model, BigramLM):
        return model.token_embedding_table.weight
    if isinstance(model, (BengioMLP, BagOfWords)):
        return model.wte.weight
    if isinstance(model, GPT):
        return model.transformer.wte.weight
    return None


def visible_text(text: str) -> str:
    """`text` with its whitespace and control characters made visible: a space is ␣, a line
    end `\\n`, a tab `\\t`, any other character that does not print `\\xNN` or `\\uNNNN`."""
    out = []
    for ch in text:
        if ch in VISIBLE:
            out.append(VISIBLE[ch])
        elif not ch.isprintable():  # control characters, non-breaking and other odd spaces
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def token_labels(tokenizer: Any, ids: list[int]) -> list[str]:
    """A label for each token id: its text (decoded alone, made visible). Tokens whose labels
    coincide (byte pieces of one character all decode to "\ufffd"; a literal ␣ looks like a
    space) get their id appended, `label#id`, so that no two points share a name."""
    labels = [visible_text(tokenizer.decode([i])) or f"#{i}" for i in ids]
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    return [f"{lab}#{i}" if counts[lab] > 1 else lab for lab, i in zip(labels, ids, strict=True)]


def choose_token_ids(
    vocab_size: int, max_tokens: int, train_stream: torch.Tensor | None = None
) -> list[int]:
    """Which tokens to show: every id in order when there are at most `max_tokens`. Otherwise
    the `max_tokens` most frequent in (the first FREQUENCY_SAMPLE tokens of) the training
    stream, most frequent first, ties by id; without a stream, the first `max_tokens` ids."""
    if vocab_size <= max_tokens:
        return list(range(vocab_size))
    if train_stream is None or len(train_stream) == 0:
        return list(range(max_tokens))
    sample = np.asarray(train_stream[:FREQUENCY_SAMPLE].numpy())  # uint8/16/32: numpy counts
    counts = np.bincount(sample, minlength=vocab_size)[:vocab_size]
    return np.argsort(-counts, kind="stable")[:max_tokens].tolist()  # stable: ties by id


def principal_components(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(coordinates (N, 2), fraction of the variance on each of the 2 axes).

    The rows projected on the first two principal components of the centred matrix (an SVD:
    the right singular vectors are the axes, the squared singular values their variances). A
    2-column matrix is drawn as it is (no fractions: None), a 1-column one against zeros.
    SVD leaves each axis' sign open; here an axis' largest loading is positive, so that the
    picture does not flip between runs or machines for nothing."""
    x = matrix.detach().to("cpu", torch.float64)
    n, dim = x.shape
    if dim <= 2:
        return torch.cat([x, x.new_zeros(n, 2 - dim)], dim=1), None
    centred = x - x.mean(dim=0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    axes = vh[:2]  # (k, dim), k = min(2, n): one row only when there is one token
    largest = axes.abs().argmax(dim=1)
    axes = axes * torch.sign(axes[torch.arange(len(axes)), largest])[:, None]
    coords = centred @ axes.T  # (n, k)
    coords = torch.cat([coords, coords.new_zeros(n, 2 - coords.shape[1])], dim=1)
    variance = s**2
    total = float(variance.sum())
    fractions = torch.zeros(2, dtype=torch.float64)
    if total > 0:
        fractions[: len(axes)] = variance[: len(axes)] / total
    return coords, fractions


def draw_embeddings(
    coords: torch.Tensor, labels: list[str], fractions: torch.Tensor | None, title: str
) -> Any:
    """The makemore picture: a dot per token, its label on it (white on a large dot for up to
    100 tokens, small and dark just above a small dot when there are more), a grid."""
    from lmlab.runs.render import new_figure

    fig = new_figure(8, 8)
    ax = fig.subplots()
    xs, ys = coords[:, 0].tolist(), coords[:, 1].tolist()
    few = len(labels) <= 100
    ax.scatter(xs, ys, s=200 if few else 12, color="tab:blue", alpha=1.0 if few else 0.5)
    # on the dot, or just above it; parse_math=False: a label such as "$" or "$$" is text
    style = dict(color="white", fontsize=8) if few else dict(color="black", fontsize=5)
    offset = (0, 0) if few else (0, 3)  # points
    for x, y, label in zip(xs, ys, labels, strict=True):
        ax.annotate(
            label,
            (x, y),
            xytext=offset,
            textcoords="offset points",
            ha="center",
            va="center" if few else "bottom",
            parse_math=False,
            **style,
        )
    if fractions is None:
        ax.set(xlabel="dimension 1", ylabel="dimension 2")
    else:
        ax.set(
            xlabel=f"principal component 1 ({100 * float(fractions[0]):.0f}% of the variance)",
            ylabel=f"principal component 2 ({100 * float(fractions[1]):.0f}% of the variance)",
        )
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    return fig


class EmbeddingProjector(L.Callback):
    """At the end of training, the model's token embeddings (see `token_embedding`): to
    TensorBoard's Projector tab (tag `token_embedding`, the tokens' texts as labels, for each
    TensorBoard logger) and as `embeddings.png` in `output_dir` (their first two principal
    components, also in TensorBoard's Images tab).

    At most `max_tokens` tokens go to the Projector: the whole vocabulary of a character
    model, but of a 50k BPE vocabulary the `max_tokens` most frequent in the training stream
    (counted on its first 16M tokens), most frequent first; the first `max_tokens` ids when
    the datamodule has no training stream. The picture labels the first `plot_tokens` of them
    (beyond a few hundred, labels are a blot); the principal components are those of all the
    tokens sent to the Projector."""

    def __init__(self, output_dir: str, max_tokens: int = 1000, plot_tokens: int = 200) -> None:
        self.path = Path(output_dir) / PLOT_NAME
        self.max_tokens = max(1, int(max_tokens))
        self.plot_tokens = max(1, int(plot_tokens))

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        matrix = token_embedding(pl_module.model)
        if matrix is None:
            name = type(pl_module.model).__name__
            log.warning("embeddings: %s has no known token embedding; nothing drawn", name)
            return
        # A picture is not worth a failed run: the training is done, so a problem here is
        # reported and the run still counts as completed (metrics.json, sweeps).
        try:
            self.write(trainer, pl_module, matrix)
        except Exception as err:
            log.warning("embeddings: could not write the token embeddings: %s", err)

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, matrix: torch.Tensor) -> None:
        from lmlab.data.tokenizers import tokenizer_from_state
        from lmlab.runs.render import save_figure

        tokenizer = tokenizer_from_state(pl_module.hparams.tokenizer_state)
        stream = getattr(getattr(trainer, "datamodule", None), "train_stream", None)
        ids = choose_token_ids(matrix.shape[0], self.max_tokens, stream)
        labels = token_labels(tokenizer, ids)
        rows = matrix.detach().float().cpu()[ids]  # (N, C)
        step = trainer.global_step
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_embedding(rows, metadata=labels, tag=TAG, global_step=step)

        coords, fractions = principal_components(rows)
        shown = min(len(ids), self.plot_tokens)
        model = pl_module.hparams.get("model_name", type(pl_module.model).__name__)
        title = (
            f"token embeddings of the {model} model at step {step}: "
            f"{shown} of {matrix.shape[0]} tokens, {rows.shape[1]} dimensions"
        )
        with warnings.catch_warnings():
            # a character the font lacks (CJK, emoji) is drawn as a box: no warning per glyph
            warnings.filterwarnings("ignore", message="Glyph .* missing from")
            fig = draw_embeddings(coords[:shown], labels[:shown], fractions, title)
            save_figure(fig, self.path)
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_figure(IMAGE_TAG, fig, global_step=step, close=False)
        log.info("embeddings: drew %s; the matrix is in TensorBoard's Projector tab", self.path)
