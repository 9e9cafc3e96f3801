"""The hyperparameters a run reports to its loggers, and the final metrics that go with them
in TensorBoard's HParams tab (one row per run of a sweep)."""

from __future__ import annotations

import json
import math
from typing import Any

from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

# Data settings that change what is learned; paths, workers and seeds of the split do not.
DATA_KEYS = (
    "corpus",
    "path",
    "text_field",
    "tokenizer",
    "block_size",
    "batch_size",
    "sampling",
    "stride",
    "train_fraction",
)
TRAINER_KEYS = ("max_steps", "precision", "accumulate_grad_batches", "gradient_clip_val")
# summary key -> HParams metric tag (a tag of its own: the curves stay under val/)
HPARAM_METRICS = {"val/loss": "hp/val_loss", "val/bpc": "hp/val_bpc"}


def run_hparams(cfg: DictConfig) -> dict[str, Any]:
    """Flat `model.n_embd: 128` pairs: the model with its optimizer and schedule, the data and
    budget settings, the seed and the experiment. The whole config is in `.hydra/config.yaml`;
    the HParams tab needs the few keys worth comparing."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    data = {k: cfg.data.get(k) for k in DATA_KEYS if k in cfg.data}
    trainer = {k: cfg.trainer.get(k) for k in TRAINER_KEYS if k in cfg.trainer}
    flat: dict[str, Any] = {}
    _flatten({"model": model, "data": data, "trainer": trainer}, "", flat)
    flat["seed"] = cfg.get("seed")
    if HydraConfig.initialized():
        experiment = HydraConfig.get().runtime.choices.get("experiment")
        flat["experiment"] = experiment if experiment is not None else "none"
    # TensorBoard takes numbers, strings and booleans only.
    return {
        k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in flat.items()
    }


def _flatten(node: dict[str, Any], prefix: str, out: dict[str, Any]) -> None:
    for key, value in node.items():
        if isinstance(value, dict) and value:
            _flatten(value, f"{prefix}{key}.", out)
        elif not str(key).startswith("_"):  # _target_ and friends are plumbing
            out[f"{prefix}{key}"] = value


def hparam_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The run's best validation metrics under their `hp/` tags (finite values only)."""
    metrics = {}
    for key, tag in HPARAM_METRICS.items():
        value = summary.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            metrics[tag] = float(value)
    return metrics


def log_final_hparams(
    loggers: list[Logger], params: dict[str, Any], metrics: dict[str, float], step: int
) -> None:
    """TensorBoard shows a run in its HParams tab only once hparams come with metrics, so they
    are logged at the end of training, with the best values."""
    if not metrics:
        return
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(params, metrics=metrics, step=step)
            logger.finalize("success")  # fit closed its writer; close the one this reopened
