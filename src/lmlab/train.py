"""`lmlab-train`: compose the config, build data, model and Trainer, train, summarise."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

import hydra
from omegaconf import DictConfig, OmegaConf

from lmlab.config_check import check_config
from lmlab.errors import LmlabError
from lmlab.runs.sweeps import (
    is_multirun,
    last_sweep_report,
    register_resolvers,
    threads_per_parallel_job,
)

# torch and Lightning are imported where they are used: `--help`, `--cfg job` and shell
# completion compose a config and never get that far, and should answer at once.
if TYPE_CHECKING:
    import lightning as L

    from lmlab.lit_module import LitLanguageModel
    from lmlab.optuna_pruning import PrunedTrial

log = logging.getLogger("lmlab")

# At import, not in main(): joblib and submitit workers import this module (to unpickle the
# task function) and resolve the sweep job's directory name there.
register_resolvers()

# Keys of a `model` config that configure training rather than the network itself.
TRAINING_KEYS = ("name", "compile", "optimizer", "scheduler")


def build_lit_module(
    model_cfg: DictConfig, datamodule: Any, data_cfg: DictConfig | None = None
) -> LitLanguageModel:
    """The vocabulary size and tokenizer come from the data, never from a hand-typed config.
    `data_cfg` is kept in the checkpoint, so that lmlab-eval can find the same text parts."""
    from lmlab.checkpoint import data_fingerprint
    from lmlab.lit_module import LitLanguageModel
    from lmlab.models import hyperparameter_names

    cfg = OmegaConf.to_container(model_cfg, resolve=True)
    hparams = {k: v for k, v in cfg.items() if k not in TRAINING_KEYS}
    hparams["vocab_size"] = datamodule.vocab_size
    if "boundary_id" in hyperparameter_names(cfg["name"]):  # what the MLP sees before a window
        hparams["boundary_id"] = datamodule.boundary_id
    return LitLanguageModel(
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


class Run(NamedTuple):
    """What one training run is made of, built from its config (see `build_run`)."""

    datamodule: Any
    module: LitLanguageModel
    trainer: L.Trainer
    callbacks: list[Any]


def build_run(cfg: DictConfig, extra_callbacks: tuple[Any, ...] = ()) -> Run:
    """Data (tokenized, split), the LightningModule and the Trainer with its callbacks and
    loggers, as `cfg` describes them; nothing is trained yet."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelSummary, ProgressBar

    from lmlab.console import is_terminal, progress_callbacks
    from lmlab.models import check_block_size
    from lmlab.runs.distributed import use_job_directory_for_ddp_processes

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = build_lit_module(cfg.model, datamodule, cfg.data)
    check_block_size(module.model, datamodule.block_size)  # before anything is written
    callbacks = [*_instantiate_all(cfg.get("callbacks")), *extra_callbacks]
    # the bar only on a terminal (its redraws are noise in a file); the progress lines always
    show_bar = bool(cfg.trainer.get("enable_progress_bar", True)) and is_terminal()
    callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    callbacks = [*progress_callbacks(show_bar), *callbacks]
    if not cfg.trainer.get("enable_model_summary", True):  # a configured one would still run
        callbacks = [c for c in callbacks if not isinstance(c, ModelSummary)]
    if (cfg.get("tune") or {}).get("lr_find"):
        from lmlab.lr_finder import LearningRateRangeTest

        tune = {k: v for k, v in cfg.tune.items() if k != "lr_find"}
        callbacks.append(LearningRateRangeTest(cfg.paths.output_dir, **tune))
    use_job_directory_for_ddp_processes()
    loggers = _instantiate_all(cfg.get("logger"))
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers,
        val_check_interval=validation_interval(cfg.trainer),
        enable_progress_bar=show_bar,  # else Lightning adds a bar of its own
        enable_model_summary=False,  # the configured PlainModelSummary is the summary
    )
    return Run(datamodule, module, trainer, callbacks)


# Validations a run gets when trainer.val_check_interval is null, whatever its length.
VALIDATIONS_PER_RUN = 10


def validation_interval(trainer_cfg: DictConfig) -> int | float:
    """trainer.val_check_interval as set, or a tenth of max_steps when it is null (every
    500 steps when the run is bounded by epochs rather than steps)."""
    interval = trainer_cfg.get("val_check_interval")
    if interval is not None:
        return interval
    max_steps = trainer_cfg.get("max_steps", -1)
    return max(1, round(max_steps / VALIDATIONS_PER_RUN)) if max_steps > 0 else 500


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    return [hydra.utils.instantiate(n) for n in (group or {}).values() if n is not None]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job; return its summary (also written to `metrics.json`)."""
    from lmlab.runs.distributed import distributed_job

    with distributed_job():
        return _train(cfg)


def _train(cfg: DictConfig) -> dict[str, Any]:
    # before anything is built or written, and before anything resolves an interpolation
    check_config(cfg)
    import torch
    from lightning.pytorch.utilities import rank_zero_only

    from lmlab.callbacks import RunSummary
    from lmlab.checkpoint import check_resumable, check_same_data, resolve_auto
    from lmlab.console import format_parameters, print_config_tree, start_banner
    from lmlab.hparams_tab import log_final_hparams, run_hparams
    from lmlab.optuna_pruning import pruning_callbacks
    from lmlab.runs import requeue
    from lmlab.runs.requeue import ckpt_path_for_this_job

    if (threads := threads_per_parallel_job()) is not None:
        torch.set_num_threads(threads)
    if rank_zero_only.rank == 0:  # not the other processes of a distributed run
        if cfg.get("print_config", True):
            print_config_tree(cfg)
        for line in start_banner(Path(cfg.paths.output_dir)).splitlines():
            log.info(line)
    run = build_run(cfg, pruning_callbacks(cfg))  # an Optuna trial's job reports to its trial
    datamodule, module, trainer = run.datamodule, run.module, run.trainer
    if cfg.get("test") and datamodule.test_stream is None:
        raise LmlabError(
            "test=true needs a test part: set data.test_fraction (e.g. data.test_fraction=0.1)"
        )
    for name, n in datamodule.part_summary().items():
        log.info(
            f"corpus {name}: {n['documents']} documents, {n['characters']} characters, "
            f"{n['bytes']} bytes -> {n['tokens']} tokens"
        )
    size = format_parameters(module.num_parameters())
    log.info(f"vocab {datamodule.vocab_size}; model {cfg.model.name}: {size} parameters")
    if trainer.strategy.root_device.type == "cuda":
        # fp32 matrix products on TF32 tensor cores (10-bit mantissa inputs)
        torch.set_float32_matmul_precision("high")
    hparams = run_hparams(cfg)
    # trainer.loggers, not the configured ones: fast_dev_run swaps them for one that writes nothing
    for lg in trainer.loggers:
        lg.log_hyperparams(hparams)  # hparams.yaml; the full config is in .hydra/config.yaml
    summary = next((c for c in run.callbacks if isinstance(c, RunSummary)), None)
    if summary is not None:
        summary.extra["data"] = datamodule.part_summary()

    # a requeued SLURM job continues from its own last.ckpt (lmlab.runs.requeue)
    ckpt_path = resolve_auto(ckpt_path_for_this_job(cfg.get("ckpt_path")), cfg.paths.output_dir)
    if ckpt_path is not None:  # it exists, is a checkpoint, and fits this data
        max_steps = cfg.trainer.get("max_steps", -1)
        if (saved := check_resumable(ckpt_path, module, max_steps)) is not None:
            check_same_data(ckpt_path, saved, dict(module.hparams))
    elif cfg.get("val_at_start", True):
        _validate_at_start(trainer, module, datamodule)
    # weights_only: resuming never runs code pickled into a checkpoint
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    # Lightning's teardown put back the signal handlers it found (submitit's among them): from
    # here on a SLURM time-limit signal must not requeue a finished run (lmlab.runs.requeue)
    requeue.release()
    if summary is None:
        return {}
    if summary.last.get("step") != trainer.global_step and not trainer.fast_dev_run:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # the final estimate
    if cfg.get("test"):
        summary.extra.update(_test(trainer, module, datamodule))
        summary.write(trainer, module)
    log_final_hparams(
        trainer.loggers, hparams, summary.summary, trainer.global_step, cfg.paths.output_dir
    )
    return summary.summary


def _validate_at_start(trainer: L.Trainer, module: LitLanguageModel, datamodule: Any) -> None:
    """val/loss at step 0, against the loss of a uniform guess, ln V: a freshly initialised
    model should score close to it, and one far above it starts out confidently wrong."""
    trainer.validate(module, datamodule=datamodule, verbose=False)
    # the metric's state was reset under inference mode; fit validates outside it, where
    # such a tensor cannot be updated in place: reset it here, as a plain tensor
    module.val_loss.reset()
    loss = trainer.callback_metrics.get("val/loss")
    if loss is not None and trainer.is_global_zero:
        vocab = datamodule.vocab_size
        log.info(
            f"step 0: val/loss {float(loss):.4f}; a uniform guess over {vocab} tokens "
            f"scores {math.log(vocab):.4f}"
        )


def _test(trainer: L.Trainer, module: LitLanguageModel, datamodule: Any) -> dict[str, Any]:
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
    log.info(f"{_figures(metrics, 'test')} ({checkpoint or 'the final weights'})")
    return {**metrics, "test_checkpoint": checkpoint}


def optimized_value(summary: dict[str, Any], metric: str) -> float | None:
    """The run's best value of `metric` (what a sweeper minimises), None when it has none."""
    value = summary.get(metric, (summary.get("best") or {}).get(metric))
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _report_user_error(err: BaseException) -> LmlabError | None:
    """Find our own error inside Hydra's InstantiationException wrapping, if it is one."""
    while err is not None and not isinstance(err, LmlabError):
        err = err.__cause__
    return err


@hydra.main(version_base="1.3", config_path="pkg://lmlab.conf", config_name="train")
def _hydra_main(cfg: DictConfig) -> float | PrunedTrial | None:
    """One run, or one job of a sweep; returns `optimized_metric` for Hydra's sweepers (a
    `PrunedTrial` when the Optuna sweeper's pruner stopped the run)."""
    from lightning.pytorch.utilities import rank_zero_only
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lmlab.callbacks import record_failure
    from lmlab.cli import refuse
    from lmlab.console import quiet_third_party
    from lmlab.runs.requeue import requeue_if_signalled

    quiet_third_party()  # before anything is built; again in each job of a sweep

    started = time.time()
    output_dir = Path(cfg.paths.output_dir)
    metric = cfg.get("optimized_metric") or "val/bpc"
    try:
        summary = train(cfg)
    except SIGTERMException:
        # stopped by a signal; the checkpoint and "interrupted" status are written already.
        # A SLURM job's time-limit signal: submitit requeues the job now (and exits).
        requeue_if_signalled()
        # 128 + 15, as a shell reports a process ended by SIGTERM; a sweep stops here too.
        sys.exit(143)
    except Exception as err:
        from lmlab.optuna_pruning import pruned_result

        if (pruned := pruned_result(err)) is not None:
            return pruned  # metrics.json says "pruned" already (RunSummary)
        user_error = _report_user_error(err)
        record_failure(
            output_dir, f"{type(user_error or err).__name__}: {user_error or err}", started
        )
        if not is_multirun():
            if user_error is None:
                raise  # a bug: the traceback is what helps
            refuse("lmlab-train", user_error)
        # One failed job must not stop the sweep: log it and let the next job run. None
        # tells Optuna that the trial failed (it is left out of the search's model).
        if user_error is None:
            log.exception("job failed: %s: %s", type(err).__name__, err)
        else:
            log.error("job failed: %s", user_error)
        return None
    if rank_zero_only.rank == 0:  # not the other processes of a distributed run
        _print_result(output_dir, summary)
    return optimized_value(summary, metric)


def _print_result(output_dir: Path, summary: dict[str, Any]) -> None:
    print(f"run directory: {output_dir}")
    if last := summary.get("last"):
        print(f"final {_figures(last, 'val')} (step {last['step']})")
    if "test/loss" in summary:
        print(_figures(summary, "test"))


def _figures(metrics: dict[str, Any], part: str) -> str:
    """`val/loss 1.2345, val/bpc 1.7810, val/bpb 1.7810`, for the figures that are there."""
    names = [f"{part}/{m}" for m in ("loss", "bpc", "bpb") if f"{part}/{m}" in metrics]
    return ", ".join(f"{name} {metrics[name]:.4f}" for name in names)


def _interrupted() -> NoReturn:
    print("lmlab-train: interrupted (Ctrl-C)", file=sys.stderr)
    sys.exit(130)  # 128 + SIGINT, as a shell reports it


def main() -> None:
    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        from lmlab.cli import train_help

        print(train_help())
        return
    from lmlab.cli import refuse
    from lmlab.runs.distributed import torchrun_arguments
    from lmlab.runs.resume import resume_arguments

    # ckpt_path inside a run directory: continue that run, where it was (under torchrun, rank 0
    # decides that, and the run's directory, for every rank)
    try:
        sys.argv[1:] = torchrun_arguments(sys.argv[1:], resume_arguments)
    except LmlabError as err:
        refuse("lmlab-train", err)
    if not sys.stderr.isatty():  # no colour codes in a log file (colorlog and Rich read it)
        os.environ.setdefault("NO_COLOR", "1")
    try:
        _hydra_main()
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (while tokenizing, say)
        _interrupted()
    except SystemExit:
        callbacks = sys.modules.get("lmlab.callbacks")  # imported once a run was built
        if callbacks is not None and callbacks.ctrl_c_in_fit.is_set():
            _interrupted()  # Lightning's own exit after Ctrl-C in fit(), outside the steps
        raise
    report = last_sweep_report()  # set by the SweepStatus callback after `-m`
    if report is not None and report.failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
