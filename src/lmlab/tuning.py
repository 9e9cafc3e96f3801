"""`tune.lr_find=true`: Lightning's learning-rate range test before training.

The tutorials find a rate by training at 1e-3 ... 1 on an exponential grid and plotting the
loss against the exponent; the finder does the same in one short run, raising the rate at
every step, and suggests the rate where the loss falls fastest.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.tuner import Tuner
from omegaconf import DictConfig

from lmlab.lit_module import LanguageModel

log = logging.getLogger("lmlab")

PLOT_NAME = "lr_find.png"


def find_lr(
    trainer: L.Trainer,
    module: LanguageModel,
    datamodule: L.LightningDataModule,
    tune_cfg: DictConfig,
    output_dir: Path,
) -> dict[str, Any]:
    """Run the range test, save its plot in the run directory and, with `tune.apply`, train
    at the suggested rate. Returns what `metrics.json` records under `lr_find`."""
    # update_attr=False: the finder would look for a `lr` attribute, but the rate lives in
    # hparams.optimizer, and applying it is optional (tune.apply) and also moves min_lr.
    finder = Tuner(trainer).lr_find(
        module,
        datamodule=datamodule,
        min_lr=float(tune_cfg.min_lr),
        max_lr=float(tune_cfg.max_lr),
        num_training=int(tune_cfg.num_training),
        update_attr=False,
    )
    if finder is None:  # fast_dev_run: Lightning skips the finder
        return {"suggestion": None, "applied": False}
    suggestion = finder.suggestion()
    configured = float(module.hparams.optimizer["lr"])
    plot = output_dir / PLOT_NAME
    save_plot(finder, plot)
    applied = bool(tune_cfg.apply) and suggestion is not None
    if suggestion is None:
        log.warning("lr finder: no suggestion (too few steps; raise tune.num_training)")
    else:
        log.info(
            "lr finder: suggested lr %.3g (configured %.3g)%s; plot in %s",
            suggestion,
            configured,
            ", training with the suggestion" if applied else "; tune.apply=true uses it",
            plot,
        )
    if applied:
        module.set_learning_rate(float(suggestion))
    return {"suggestion": suggestion, "configured": configured, "applied": applied}


def save_plot(finder: Any, path: Path) -> None:
    # The Agg canvas directly, not pyplot: no global backend state, works without a display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    finder.plot(suggest=True, ax=ax)
    ax.set_title("learning-rate range test")
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
