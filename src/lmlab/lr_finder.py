"""`tune.lr_find=true`: Lightning's learning-rate range test at the start of training.

The tutorials find a rate by training at 1e-3 ... 1 on an exponential grid and plotting the
loss against the exponent; the finder does the same in one short run, raising the rate at
every step, and suggests the rate where the loss falls fastest. Lightning restores the
initial weights afterwards, so training then starts from scratch.

Two things are done here rather than by Lightning (docs/lr_finder.md):

- Smoothing. Lightning smooths the losses with a bias-corrected moving average, but corrects
  with the step count after the optimizer step (1 at the first batch) where the average has
  seen one loss fewer: the first points come out about half the real loss and the curve
  climbs at the start. The raw losses are recorded here and smoothed with the right
  correction.
- The suggestion. Lightning takes the steepest slope against the rate itself, which divides
  the slope against log(rate) by the rate: on an exponential grid that favours the smallest
  rates, where the loss has barely moved. Here it is the steepest slope against log(rate),
  the fall per decade that the plot shows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import LearningRateFinder

log = logging.getLogger("lmlab")

PLOT_NAME = "lr_find.png"
# a group that sorts after train/ and val/, which Time Series opens on first
TENSORBOARD_TAG = "visual/lr_find"
# Lightning's smoothing factor (its `_LRCallback` default): the average forgets 2% a step.
BETA = 0.98
# Lightning's `suggestion()` defaults: the first points are mostly noise around the start
# loss, and the last one is often where the test stopped on a diverging loss.
SKIP_BEGIN = 10
SKIP_END = 1


def smooth_losses(losses: Sequence[float], beta: float = BETA) -> list[float]:
    """The exponential moving average of `losses`, bias-corrected by 1 - beta^n after its
    n-th loss, so the first point is the first loss itself. A loss that is not finite (a step
    that returned no loss, or one that overflowed) is left out of the average and shows as
    nan, rather than turning every later point into nan."""
    smoothed: list[float] = []
    average, seen = 0.0, 0
    for loss in losses:
        if not math.isfinite(loss):
            smoothed.append(math.nan)
            continue
        seen += 1
        average = beta * average + (1 - beta) * loss
        smoothed.append(average / (1 - beta**seen))
    return smoothed


def steepest_fall(
    lrs: Sequence[float],
    smoothed: Sequence[float],
    skip_begin: int = SKIP_BEGIN,
    skip_end: int = SKIP_END,
) -> int | None:
    """The index of the rate where the smoothed loss falls fastest per decade of rate (the
    most negative slope against log10(lr)), among the points after the first `skip_begin`
    and before the last `skip_end`; None with fewer than two finite points there."""
    points = [
        (math.log10(lr), loss, i)
        for i, (lr, loss) in enumerate(zip(lrs, smoothed, strict=True))
        if skip_begin <= i < len(lrs) - skip_end and math.isfinite(loss) and lr > 0
    ]
    if len(points) < 2:
        return None
    x = torch.tensor([p[0] for p in points], dtype=torch.float64)
    y = torch.tensor([p[1] for p in points], dtype=torch.float64)
    slopes = torch.gradient(y, spacing=(x,))[0]
    return points[int(torch.argmin(slopes))][2]


class LearningRateRangeTest(LearningRateFinder):
    """Lightning's finder, plus: the losses smoothed correctly (see the module docstring), the
    plot saved in the run directory and sent to TensorBoard, the result recorded in
    `metrics.json`, and (with `apply`) training at the suggestion. The rate lives in
    `hparams.optimizer` and applying it also moves the schedule's floor, which Lightning's
    `update_attr` cannot do."""

    def __init__(
        self, output_dir: str, apply: bool, num_training: int, min_lr: float, max_lr: float
    ) -> None:
        super().__init__(
            min_lr=float(min_lr),
            max_lr=float(max_lr),
            num_training_steps=int(num_training),
            update_attr=False,  # the rate is applied below, with the schedule's floor
        )
        self.plot_path = Path(output_dir) / PLOT_NAME
        self.apply = bool(apply)
        self.num_training = int(num_training)
        self.result: dict[str, Any] = {"suggestion": None, "applied": False}
        self.raw_losses: list[float] = []

    def lr_find(self, trainer, pl_module) -> None:
        self.raw_losses = []
        with _recording_losses(trainer, pl_module, self.raw_losses):
            super().lr_find(trainer, pl_module)
        if self.optimal_lr is None:  # fast_dev_run: Lightning skips the finder
            return
        self._resmooth(trainer)
        suggestion = self.suggestion()
        configured = float(pl_module.hparams.optimizer["lr"])
        applied = self.apply and suggestion is not None
        if trainer.is_global_zero:
            untrained = math.log(pl_module.hparams.model_hparams["vocab_size"])
            fig = draw_plot(
                self.optimal_lr.results, self.raw_losses, suggestion, untrained, configured
            )
            save_plot(fig, self.plot_path)
            send_plot(fig, trainer.loggers)
        if suggestion is None:
            log.warning("lr finder: no suggestion (too few steps; raise tune.num_training)")
        elif self._at_the_end(suggestion):
            log.warning(
                "lr finder: the loss still fell fastest at the end of the range, so the "
                "suggestion is only a bound; raise tune.max_lr (docs/lr_finder.md)"
            )
        else:
            log.info(
                "lr finder: suggested lr %.3g (configured %.3g)%s; plot in %s",
                suggestion,
                configured,
                ", training with the suggestion" if applied else "; tune.apply=true uses it",
                self.plot_path,
            )
        if applied:
            pl_module.set_learning_rate(float(suggestion))
            trainer.strategy.setup_optimizers(trainer)  # the optimizer and schedule at that rate
        self.result = {"suggestion": suggestion, "configured": configured, "applied": applied}

    def _resmooth(self, trainer: Any) -> None:
        """Replace Lightning's smoothed losses by the raw ones smoothed correctly (`results`
        is the finder's documented output), so that whoever reads them sees that curve."""
        results = self.optimal_lr.results
        # Lightning's results are rank 0's on every rank; the suggestion must be too, or the
        # processes of a DDP run would train at different rates
        self.raw_losses = trainer.strategy.broadcast(self.raw_losses)
        if len(self.raw_losses) != len(results["loss"]):
            # a step pattern the recorder does not mirror (Lightning changed how it records):
            # its curve is kept, with its skewed start, rather than one matched to wrong rates
            log.warning(
                "lr finder: recorded %d losses for Lightning's %d; keeping its smoothing",
                len(self.raw_losses),
                len(results["loss"]),
            )
            self.raw_losses = []
            return
        results["loss"] = smooth_losses(self.raw_losses)

    def _at_the_end(self, suggestion: float) -> bool:
        """Whether the test ran to max_lr without the loss diverging and the suggestion is
        among the last tenth of the rates: a larger rate might well have fallen faster."""
        lrs = self.optimal_lr.results["lr"]
        stopped_early = len(lrs) < self.num_training  # Lightning stops on a diverging loss
        return not stopped_early and lrs.index(suggestion) >= len(lrs) - max(2, len(lrs) // 10)

    def suggestion(self) -> float | None:
        """The rate where the smoothed loss falls fastest per decade (see `steepest_fall`)."""
        if self.optimal_lr is None:
            return None
        results = self.optimal_lr.results
        index = steepest_fall(results["lr"], results["loss"])
        return None if index is None else float(results["lr"][index])


@contextmanager
def _recording_losses(trainer: Any, pl_module: Any, into: list[float]) -> Iterator[None]:
    """Append each optimizer step's training loss to `into` while the finder runs.

    Lightning swaps the Trainer's callbacks for its own during the test and keeps only the
    smoothed values, so the raw ones are taken from the module's `on_train_batch_end` hook,
    which the Trainer calls whatever the callbacks are; the hook is wrapped on this instance
    only, and unwrapped afterwards. It records where Lightning does: at the last batch of
    each gradient accumulation, nan for a step that returned no loss."""
    hook = pl_module.on_train_batch_end

    def record(outputs: Any, batch: Any, batch_idx: int) -> None:
        if (trainer.fit_loop.batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            loss = outputs if not isinstance(outputs, dict) else outputs.get("loss")
            into.append(math.nan if loss is None else float(loss))
        hook(outputs, batch, batch_idx)

    pl_module.on_train_batch_end = record
    try:
        yield
    finally:
        del pl_module.on_train_batch_end  # the class's method again


def draw_plot(
    results: dict[str, Any],
    raw_losses: Sequence[float],
    suggestion: float | None,
    untrained_loss: float,
    configured_lr: float,
) -> Any:
    """Loss against rate (log axis): the raw losses, the smoothed curve the suggestion is
    read from, the loss of a uniform guess (ln V, where an untrained model starts), the
    configured rate and the suggestion."""
    from lmlab.runs.render import new_figure

    lrs = list(results["lr"])
    smoothed = list(results["loss"])
    fig = new_figure(6.5, 4.5)
    ax = fig.subplots()
    if raw_losses:
        ax.plot(lrs, raw_losses, color="tab:blue", alpha=0.4, lw=0.8, label="loss (raw)")
    ax.plot(lrs, smoothed, color="tab:blue", lw=1.8, label="loss (smoothed)")
    ax.axhline(
        untrained_loss, color="gray", ls="--", lw=1, label=f"untrained: ln V = {untrained_loss:.2f}"
    )
    ax.axvline(
        configured_lr, color="tab:green", ls=":", lw=1.2, label=f"configured {configured_lr:.3g}"
    )
    if suggestion is not None:
        ax.plot(suggestion, smoothed[lrs.index(suggestion)], "o", color="tab:red", ms=8)
        ax.axvline(
            suggestion, color="tab:red", lw=1, alpha=0.6, label=f"suggested {suggestion:.3g}"
        )
    ax.set_xscale("log")
    finite = [v for v in [*raw_losses, *smoothed] if math.isfinite(v)]
    if finite:  # a diverging end would squash the interesting part against the floor
        low = min(finite)
        high = max(untrained_loss, smoothed[0] if math.isfinite(smoothed[0]) else low)
        ax.set_ylim(low - 0.05 * (high - low) - 0.05, high + 0.5 * (high - low) + 0.05)
    ax.set(xlabel="learning rate", ylabel="training loss", title="learning-rate range test")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def save_plot(fig: Any, path: Path) -> None:
    from lmlab.runs.render import save_figure

    save_figure(fig, path)


def send_plot(fig: Any, loggers: Sequence[Any]) -> None:
    """The plot as an image for each logger that takes figures (TensorBoard's SummaryWriter)."""
    for logger in loggers:
        add_figure = getattr(logger.experiment, "add_figure", None)
        if callable(add_figure):
            add_figure(TENSORBOARD_TAG, fig, global_step=0, close=False)
