"""`tune.lr_find=true`: Lightning's learning-rate range test at the start of training.

The tutorials find a rate by training at 1e-3 ... 1 on an exponential grid and plotting the
loss against the exponent; the finder does the same in one short run, raising the rate at
every step, and suggests the rate where the loss falls fastest. Lightning restores the
initial weights afterwards, so training then starts from scratch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import LearningRateFinder

log = logging.getLogger("lmlab")

PLOT_NAME = "lr_find.png"


class LearningRateRangeTest(LearningRateFinder):
    """Lightning's finder, plus: the plot saved in the run directory, the result recorded in
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
        self.result: dict[str, Any] = {"suggestion": None, "applied": False}

    def lr_find(self, trainer, pl_module) -> None:
        super().lr_find(trainer, pl_module)
        if self.optimal_lr is None:  # fast_dev_run: Lightning skips the finder
            return
        suggestion = self.optimal_lr.suggestion()
        configured = float(pl_module.hparams.optimizer["lr"])
        applied = self.apply and suggestion is not None
        if trainer.is_global_zero:
            save_plot(self.optimal_lr, self.plot_path)
        if suggestion is None:
            log.warning("lr finder: no suggestion (too few steps; raise tune.num_training)")
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


def save_plot(finder: Any, path: Path) -> None:
    from lmlab.runs.render import new_figure, save_figure

    fig = new_figure(6, 4.5)
    ax = fig.subplots()
    finder.plot(suggest=True, ax=ax)
    ax.set(title="learning-rate range test")
    ax.grid(alpha=0.3)
    save_figure(fig, path)
