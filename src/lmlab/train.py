"""`lmlab-train`: compose the config, build data, model and Trainer, train, summarise."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from lmlab.callbacks import RunSummary, record_failure
from lmlab.checkpoint import check_resumable
from lmlab.distributed import distributed_job, use_job_directory_for_ddp_processes
from lmlab.errors import LmlabError
from lmlab.hparams import hparam_metrics, log_final_hparams, run_hparams
from lmlab.lit_module import LanguageModel
from lmlab.models import check_block_size, hyperparameter_names
from lmlab.resume import check_same_data, data_fingerprint
from lmlab.sweeps import (
    is_multirun,
    last_sweep_report,
    register_resolvers,
    threads_per_parallel_job,
)

log = logging.getLogger("lmlab")

# At import, not in main(): joblib and submitit workers import this module (to unpickle the
# task function) and resolve the sweep job's directory name there.
register_resolvers()

# Keys of a `model` config that configure training rather than the network itself.
TRAINING_KEYS = ("name", "compile", "optimizer", "scheduler")


def build_lit_module(
    model_cfg: DictConfig, datamodule: Any, data_cfg: DictConfig | None = None
) -> LanguageModel:
    """The vocabulary size and tokenizer come from the data, never from a hand-typed config.
    `data_cfg` is kept in the checkpoint, so that lmlab-eval can find the same text parts."""
    cfg = OmegaConf.to_container(model_cfg, resolve=True)
    hparams = {k: v for k, v in cfg.items() if k not in TRAINING_KEYS}
    hparams["vocab_size"] = datamodule.vocab_size
    if "boundary_id" in hyperparameter_names(cfg["name"]):  # what the MLP sees before a window
        hparams["boundary_id"] = datamodule.boundary_id
    return LanguageModel(
        model_name=cfg["name"],
        model_hparams=hparams,
        optimizer=cfg.get("optimizer", {"lr": 1e-3}),
        scheduler=cfg.get("scheduler"),
        tokenizer_state=datamodule.tokenizer.state(),
        bpc_factor=datamodule.bpc_factor,
        bpb_factor=datamodule.bpb_factor,
        compile=bool(cfg.get("compile", False)),
        data_fingerprint=data_fingerprint(datamodule.train_stream, datamodule.val_stream),
        data_config=OmegaConf.to_container(data_cfg, resolve=True) if data_cfg else None,
    )


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    if not group:
        return []
    return [hydra.utils.instantiate(node) for node in group.values() if node is not None]


def _instantiate_callbacks(cfg: DictConfig) -> list[Any]:
    callbacks = _instantiate_all(cfg.get("callbacks"))
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar it may not show
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return callbacks


def _check_resume(ckpt_path: str | None, module: LanguageModel) -> None:
    """Before Lightning loads a checkpoint: it exists, is one, and belongs to this data."""
    if ckpt_path is None:
        return
    saved = check_resumable(ckpt_path, module)
    if saved is not None:
        check_same_data(ckpt_path, saved, dict(module.hparams))


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job; return its summary (also written to `metrics.json`)."""
    with distributed_job():
        return _train(cfg)


def _train(cfg: DictConfig) -> dict[str, Any]:
    if (threads := threads_per_parallel_job()) is not None:
        torch.set_num_threads(threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = build_lit_module(cfg.model, datamodule, cfg.data)
    check_block_size(module.model, datamodule.block_size)  # before anything is written
    if cfg.get("test") and datamodule.test_stream is None:
        raise LmlabError(
            "test=true needs a test part: set data.test_fraction (e.g. data.test_fraction=0.1)"
        )
    for name, part in datamodule.part_summary().items():
        log.info(
            "corpus %s: %d documents, %d characters, %d bytes -> %d tokens",
            name,
            part["documents"],
            part["characters"],
            part["bytes"],
            part["tokens"],
        )
    log.info(
        "vocab %d; model %s: %.2fM parameters",
        datamodule.vocab_size,
        cfg.model.name,
        module.num_parameters() / 1e6,
    )
    callbacks = _instantiate_callbacks(cfg)
    use_job_directory_for_ddp_processes()
    loggers = _instantiate_all(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    if trainer.strategy.root_device.type == "cuda":
        # fp32 matrix products on TF32 tensor cores: ~8x the fp32 rate, 10-bit mantissa inputs
        torch.set_float32_matmul_precision("high")
    hparams = run_hparams(cfg)
    # trainer.loggers, not `loggers`: fast_dev_run swaps them for a logger that writes nothing
    for lg in trainer.loggers:
        lg.log_hyperparams(hparams)  # hparams.yaml; the full config is in .hydra/config.yaml
    summary = next((c for c in callbacks if isinstance(c, RunSummary)), None)
    if summary is not None:
        summary.extra["data"] = datamodule.part_summary()

    tune = cfg.get("tune") or {}
    if tune.get("lr_find"):
        from lmlab.tuning import find_lr  # imports the Tuner only when asked for

        found = find_lr(trainer, module, datamodule, tune, Path(cfg.paths.output_dir))
        if summary is not None:
            summary.extra["lr_find"] = found

    _check_resume(cfg.get("ckpt_path"), module)
    if cfg.get("ckpt_path") is None and cfg.get("val_at_start", True):
        _validate_at_start(trainer, module, datamodule)
    # weights_only: resuming never runs code pickled into a checkpoint
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    if summary is None:
        return {}
    if summary.last.get("step") != trainer.global_step and not trainer.fast_dev_run:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # the final estimate
    if cfg.get("test"):
        summary.extra.update(_test(trainer, module, datamodule))
        summary.write(trainer, module)
    log_final_hparams(
        trainer.loggers, hparams, hparam_metrics(summary.summary), trainer.global_step
    )
    return summary.summary


def _validate_at_start(trainer: L.Trainer, module: LanguageModel, datamodule: Any) -> None:
    """val/loss at step 0, against the loss of a uniform guess, ln V: a freshly initialised
    model should score close to it, and one far above it starts out confidently wrong."""
    trainer.validate(module, datamodule=datamodule, verbose=False)
    # the metric's state was reset under inference mode; fit validates outside it, where
    # such a tensor cannot be updated in place: reset it here, as a plain tensor
    module.val_loss.reset()
    loss = trainer.callback_metrics.get("val/loss")
    if loss is not None and trainer.is_global_zero:
        uniform = math.log(datamodule.vocab_size)
        log.info(
            "step 0: val/loss %.4f; a uniform guess over %d tokens scores %.4f",
            float(loss),
            datamodule.vocab_size,
            uniform,
        )


def _test(trainer: L.Trainer, module: LanguageModel, datamodule: Any) -> dict[str, Any]:
    """Score the held-out test part once, with the checkpoint that validation selected (the
    test figure never selects anything); test/* scalars go to the loggers too."""
    checkpoint = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
    module.eval_part = "test"
    module.eval_factors = datamodule.factors("test")
    trainer.test(
        module,
        dataloaders=datamodule.test_dataloader(),
        ckpt_path=checkpoint,
        verbose=False,
        weights_only=True,
    )
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    log.info(
        "test: loss %.4f, bpc %.4f, bpb %.4f (%s)",
        metrics["test/loss"],
        metrics["test/bpc"],
        metrics["test/bpb"],
        checkpoint or "the final weights",
    )
    return {**metrics, "test_checkpoint": checkpoint}


def optimized_value(summary: dict[str, Any], metric: str) -> float | None:
    """The run's best value of `metric` (what a sweeper minimises), None when it has none."""
    value = summary.get(metric, (summary.get("best") or {}).get(metric))
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _report_user_error(err: BaseException) -> LmlabError | None:
    """Find our own error inside Hydra's InstantiationException wrapping, if it is one."""
    while err is not None:
        if isinstance(err, LmlabError):
            return err
        err = err.__cause__
    return None


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    """One run, or one job of a sweep; returns `optimized_metric` for Hydra's sweepers."""
    started = time.time()
    output_dir = Path(cfg.paths.output_dir)
    try:
        summary = train(cfg)
    except SIGTERMException:
        # stopped by a signal; the checkpoint and "interrupted" status are written already.
        # 128 + 15, as a shell reports a process ended by SIGTERM; a sweep stops here too.
        sys.exit(143)
    except Exception as err:
        user_error = _report_user_error(err)
        record_failure(output_dir, _describe(user_error or err), started)
        if not is_multirun():
            if user_error is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise  # a bug, or the traceback was asked for
            print(f"lmlab-train: error: {user_error}", file=sys.stderr)
            sys.exit(1)
        # One failed job must not stop the sweep: log it and let the next job run. None
        # tells Optuna that the trial failed (it is left out of the search's model).
        if user_error is None:
            log.exception("job failed: %s", _describe(err))
        else:
            log.error("job failed: %s", user_error)
        return None
    last = summary.get("last", {})
    if rank_zero_only.rank != 0:  # the other processes of a distributed run
        return optimized_value(summary, cfg.get("optimized_metric") or "val/bpc")
    print(f"run directory: {output_dir}")
    if last:
        loss, bpc, step = last["val/loss"], last["val/bpc"], last["step"]
        bpb = f", val/bpb {last['val/bpb']:.4f}" if "val/bpb" in last else ""
        print(f"final val/loss {loss:.4f}, val/bpc {bpc:.4f}{bpb} (step {step})")
        if "test/loss" in summary:
            print(
                f"test/loss {summary['test/loss']:.4f}, test/bpc {summary['test/bpc']:.4f}, "
                f"test/bpb {summary['test/bpb']:.4f}"
            )
    return optimized_value(summary, cfg.get("optimized_metric") or "val/bpc")


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def main() -> None:
    _hydra_main()
    report = last_sweep_report()  # set by the SweepStatus callback after `-m`
    if report is not None and report.failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
