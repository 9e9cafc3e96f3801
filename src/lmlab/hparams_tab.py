"""TensorBoard's HParams tab: the hyperparameters a run reports to its loggers, and the final
metrics that go with them (one row per run of a sweep)."""

from __future__ import annotations

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
    "examples",
    "stride",
    "train_fraction",
)
TRAINER_KEYS = ("max_steps", "precision", "accumulate_grad_batches", "gradient_clip_val")
# summary key -> HParams metric tag (a tag of its own: the curves stay under val/)
HPARAM_METRICS = {"val/loss": "hp/val_loss", "val/bpc": "hp/val_bpc"}


def run_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The model with its optimizer and schedule, the data and budget settings, the seed and
    the experiment, nested as in the config: the loggers flatten them (`model/n_embd`) and
    turn what TensorBoard cannot show into text. The whole config is in `.hydra/config.yaml`;
    the HParams tab needs the few keys worth comparing."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    params: dict[str, Any] = {
        "model": {k: v for k, v in model.items() if not k.startswith("_")},  # no _target_
        "data": {k: cfg.data.get(k) for k in DATA_KEYS if k in cfg.data},
        "trainer": {k: cfg.trainer.get(k) for k in TRAINER_KEYS if k in cfg.trainer},
        "seed": cfg.get("seed"),
    }
    # null means the default, random blocks (or what the deprecated data.sampling says)
    params["data"]["examples"] = cfg.data.get("examples") or cfg.data.get("sampling") or "random"
    if HydraConfig.initialized():
        params["experiment"] = HydraConfig.get().runtime.choices.get("experiment") or "none"
    return params


def hparam_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The run's best validation metrics under their `hp/` tags (finite values only)."""
    values = {tag: summary.get(key) for key, tag in HPARAM_METRICS.items()}
    return {
        t: float(v) for t, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)
    }


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
