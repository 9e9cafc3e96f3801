"""Callbacks: throughput, text samples, and the run summary `metrics.json`."""

from __future__ import annotations

import json
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lmlab.atomic_write import atomic_write_json, atomic_write_text
from lmlab.errors import LmlabError
from lmlab.lit_module import is_logging_step
from lmlab.lr_finder import LearningRateRangeTest
from lmlab.private_apis import note_sigterm
from lmlab.runs import requeue


class TokensPerSecond(L.Callback):
    """Logs `train/tokens_per_sec` every `log_every_n_steps` steps (no per-step host sync)."""

    def __init__(self) -> None:
        self._tokens = 0
        self._start: float | None = None
        self.total_tokens = 0
        self.train_seconds = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        tokens = batch[0].numel() * trainer.world_size
        self._tokens += tokens
        self.total_tokens += tokens
        if is_logging_step(trainer, trainer.global_step) and self._start:
            elapsed = time.perf_counter() - self._start
            self.train_seconds += elapsed
            pl_module.log("train/tokens_per_sec", self._tokens / max(elapsed, 1e-9))
            self._tokens, self._start = 0, time.perf_counter()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._flush()

    def on_train_end(self, trainer, pl_module) -> None:
        self._flush()

    def _flush(self) -> None:
        # Validation time is not training time: close the current interval, restart after.
        if self._start is not None:
            self.train_seconds += time.perf_counter() - self._start
            self._start = None

    @property
    def mean_tokens_per_sec(self) -> float:
        return self.total_tokens / self.train_seconds if self.train_seconds else 0.0


class RunSummary(L.Callback):
    """Writes `metrics.json` in the run directory: best and last validation metrics, size,
    steps, throughput, wall time and status (also when the run fails), and for a word model
    `val/unknown_rate`, the share of validation word tokens that are <|unk|>."""

    def __init__(self, output_dir: str) -> None:
        self.path = Path(output_dir) / "metrics.json"
        self.start = time.time()
        self.best: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.extra: dict[str, Any] = {}
        self.status = "running"
        self.summary: dict[str, Any] = {}
        self.unknown_rate: float | None = None  # words: validation word tokens that are <|unk|>

    def setup(self, trainer, pl_module, stage: str) -> None:
        # kept from the datamodule while there is one (trainer.test with loaders has none)
        rates = getattr(getattr(trainer, "datamodule", None), "unknown_rates", None) or {}
        if "val" in rates:
            self.unknown_rate = rates["val"]

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if "val/loss" not in metrics:
            return
        self.last = {**metrics, "step": trainer.global_step}
        if not self.best or metrics["val/loss"] < self.best["val/loss"]:
            self.best = {**metrics, "step": trainer.global_step}
        self.write(trainer, pl_module)  # a summary survives even a run that dies later

    def on_train_end(self, trainer, pl_module) -> None:
        self.status = "completed"
        self.write(trainer, pl_module)

    # Kept in checkpoints: a resumed run's best is the best over the whole run.
    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "last": self.last}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = dict(state_dict.get("best") or {})
        self.last = dict(state_dict.get("last") or {})

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        interrupted = isinstance(exception, (KeyboardInterrupt, SIGTERMException))
        # stopped by the Optuna sweeper's pruner (lmlab.optuna_pruning); optuna is loaded then
        optuna = sys.modules.get("optuna")
        pruned = optuna is not None and isinstance(exception, optuna.TrialPruned)
        self.status = "interrupted" if interrupted else "pruned" if pruned else "failed"
        self.write(trainer, pl_module, error=f"{type(exception).__name__}: {exception}")

    @rank_zero_only
    def write(self, trainer, pl_module, error: str | None = None) -> None:
        throughput = _find(trainer, TokensPerSecond)
        lr_finder = _find(trainer, LearningRateRangeTest)
        summary: dict[str, Any] = {
            "status": self.status,
            "best": self.best,
            "last": self.last,
            "val/loss": self.best.get("val/loss"),
            "val/bpc": self.best.get("val/bpc"),
            "val/bpb": self.best.get("val/bpb"),
            # a word model's unknown words cost what it gives <|unk|>: its figures flatter it
            **({"val/unknown_rate": self.unknown_rate} if self.unknown_rate is not None else {}),
            "num_params": sum(p.numel() for p in pl_module.parameters()),
            "steps": trainer.global_step,
            "tokens_per_sec": throughput.mean_tokens_per_sec if throughput else None,
            "wall_time_sec": round(time.time() - self.start, 3),
            "device": str(pl_module.device),
            "torch": torch.__version__,
            **({"lr_find": lr_finder.result} if lr_finder else {}),
            **self.extra,
        }
        if error:
            summary["error"] = error
        self.summary = summary
        atomic_write_json(self.path, summary)


@rank_zero_only
def record_failure(output_dir: str | Path, error: str, started: float) -> None:
    """Mark the run in `output_dir` as failed in its `metrics.json`. RunSummary records
    failures inside `trainer.fit`; this covers the rest (a bad override fails before there is
    a trainer). What this run already wrote is kept; a file left by an earlier run is not."""
    path = Path(output_dir) / "metrics.json"
    summary: dict[str, Any] = {}
    # a second of slack: some file systems keep modification times to the second
    if path.is_file() and path.stat().st_mtime >= started - 1.0:
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            summary = {}
    wall_time = round(time.time() - started, 3)
    defaults = {"val/loss": None, "val/bpc": None, "wall_time_sec": wall_time}
    atomic_write_json(path, {**defaults, **summary, "status": "failed", "error": error})


class FiniteLossCheck(L.Callback):
    """Fails the run as soon as the loss is NaN or infinite: a diverged run would otherwise
    spend its whole budget producing NaNs and finish as "completed". The training loss is
    checked every `log_every_n_steps` steps (a check is a device sync), the validation loss
    at every validation."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not is_logging_step(trainer, trainer.global_step):
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss).item():
            self._fail("train/loss", float(loss), trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        loss = trainer.callback_metrics.get("val/loss")
        if loss is not None and not torch.isfinite(loss).item():
            self._fail("val/loss", float(loss), trainer, pl_module)

    @staticmethod
    def _fail(tag: str, value: float, trainer, pl_module) -> None:
        lr = (pl_module.hparams.get("optimizer") or {}).get("lr")
        raise LmlabError(
            f"training diverged: {tag} is {value} at step {trainer.global_step}; lower "
            f"model.optimizer.lr (now {lr}) or set trainer.gradient_clip_val=1.0"
        )


class SampleTextCallback(L.Callback):
    """After every `every_n_validations`-th validation, generate a few samples (settings as
    lmlab-sample's) and write them to TensorBoard's text tab and to `samples.txt` in the run
    directory.

    On a line corpus (names: `data.split_lines`, or documents from `data.text_field`) samples
    end at the boundary and are labelled "in train", "in val" or "new" (lmlab.sample_labels);
    the share of new ones is logged as `samples/new_fraction`. `stop_at_boundary` and
    `num_samples` left at null follow the corpus: line corpora get `line_num_samples` short
    samples, running text `text_num_samples` long ones."""

    def __init__(
        self,
        output_dir: str,
        every_n_validations: int = 1,
        num_samples: int | None = None,
        line_num_samples: int = 20,
        text_num_samples: int = 2,
        stop_at_boundary: bool | None = None,
        **settings: Any,
    ) -> None:
        from lmlab.generation import SamplingSettings

        self.path = Path(output_dir) / "samples.txt"
        self.every_n_validations = max(1, every_n_validations)
        self.num_samples = num_samples
        self.line_num_samples, self.text_num_samples = line_num_samples, text_num_samples
        self.stop_at_boundary = stop_at_boundary
        # checked now, so that a bad setting fails before training rather than at validation
        for lines in (True, False):
            stop = lines if stop_at_boundary is None else stop_at_boundary
            SamplingSettings(
                **settings, num_samples=self._num_samples(lines), stop_at_boundary=stop
            )
        self.settings = settings
        self._known: Any = None  # the documents of a line corpus, read at the first sample
        self._validations = 0
        self._last_step = -1

    def _num_samples(self, lines: bool) -> int:
        if self.num_samples is not None:
            return self.num_samples
        return self.line_num_samples if lines else self.text_num_samples

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module) -> None:
        # Not at step 0 (an untrained model's noise), nor twice at one step; but after the
        # final validation too, which runs outside fit() when the last step is not a
        # validation step, and always gets a sample.
        step = trainer.global_step
        if trainer.sanity_checking or step == 0 or step == self._last_step:
            return
        self._validations += 1
        final = trainer.state.fn != "fit" or step >= trainer.max_steps > 0
        if self._validations % self.every_n_validations and not final:
            return
        self._last_step = step
        from lmlab.data.tokenizers import tokenizer_from_state
        from lmlab.generation import SamplingSettings, sample_text
        from lmlab.sample_labels import KnownDocuments, is_line_corpus, labelled_lines, new_summary

        lines = is_line_corpus(getattr(trainer, "datamodule", None))
        stop = lines if self.stop_at_boundary is None else self.stop_at_boundary
        settings = SamplingSettings(
            **self.settings, num_samples=self._num_samples(lines), stop_at_boundary=stop
        )
        tokenizer = tokenizer_from_state(pl_module.hparams.tokenizer_state)
        texts = sample_text(pl_module.model, tokenizer, settings, device=pl_module.device)
        if lines and stop:  # each sample is one document: label it
            if self._known is None:
                self._known = KnownDocuments.of(trainer.datamodule)
            labels = [self._known.label(t) for t in texts]
            for logger in trainer.loggers:
                logger.log_metrics({"samples/new_fraction": self._known.new_fraction(texts)}, step)
            shown = labelled_lines(texts, labels)
            # a markdown code block (indented 4 spaces): TensorBoard keeps the label column
            markdown = "".join(f"    {line}\n" for line in shown) + f"\n{new_summary(labels)}"
            block = f"=== step {step}: {new_summary(labels)} ===\n" + "\n".join(shown) + "\n"
        else:
            # two trailing spaces: TensorBoard renders markdown, keep the line breaks
            markdown = "\n\n---\n\n".join(t.replace("\n", "  \n") for t in texts)
            block = "".join(
                f"=== step {step}, sample {i + 1} ===\n{t}\n" for i, t in enumerate(texts)
            )
        for logger in trainer.loggers:
            if hasattr(logger.experiment, "add_text"):
                logger.experiment.add_text("samples", markdown, global_step=step)
        previous = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
        atomic_write_text(self.path, previous + block)


# Set when Ctrl-C stopped fit() outside the training steps (setup, the sanity check, a second
# Ctrl-C): Lightning then exits with status 1 itself, which lmlab-train turns into its
# usual "interrupted" line and status 130.
ctrl_c_in_fit = threading.Event()


class CheckpointOnInterrupt(L.Callback):
    """SIGTERM (`kill`, a cluster's notice before the end of a job) or Ctrl-C: finish the
    current step, save `last.ckpt`, stop. `lmlab-train ckpt_path=<that file>` continues.

    Lightning notes a SIGTERM in `trainer.received_sigterm` (and, under DDP, agrees on it across
    processes at the next batch). Ctrl-C is made to do the same instead of raising wherever
    the program happens to be, e.g. halfway through an optimizer step; a second Ctrl-C
    stops at once.
    """

    # Not Lightning's OnExceptionCheckpoint: it saves on any exception and deletes its file at
    # teardown, while this one saves only on a stop signal, to the last.ckpt a resume reads.
    def __init__(self, dirpath: str, filename: str = "last.ckpt") -> None:
        self.path = Path(dirpath) / filename
        self.signal_name = "SIGTERM"
        self._trainer: L.Trainer | None = None
        self._previous_handler: Any = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._trainer = trainer
        self.signal_name = "SIGTERM"
        if _in_main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
            # in a submitit SLURM job, its time-limit signal too; the job is requeued after
            # the save (lmlab.runs.requeue)
            requeue.hold_during_training(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handler()

    def _on_sigint(self, signum, frame) -> None:
        trainer = self._trainer
        if trainer is None or trainer.received_sigterm:
            raise KeyboardInterrupt  # the second Ctrl-C
        self.signal_name = "Ctrl-C"
        note_sigterm(trainer)
        print(
            "\nCtrl-C: saving a checkpoint after this step (Ctrl-C again to quit now)",
            file=sys.stderr,
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # One process: stop here, between steps. Several: Lightning raises the same exception
        # on every process at the start of the next batch, after agreeing on it.
        if trainer.received_sigterm and trainer.world_size == 1:
            raise SIGTERMException()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_handler()
        if isinstance(exception, KeyboardInterrupt):
            ctrl_c_in_fit.set()
        if not isinstance(exception, SIGTERMException):
            return
        trainer.save_checkpoint(self.path)  # every process takes part; rank zero writes
        if requeue.was_signalled():
            self.signal_name = requeue.requeue_signal().name
        if trainer.is_global_zero:
            print(
                f"lmlab-train: {self.signal_name} at step {trainer.global_step}: saved "
                f"{self.path}; continue with: lmlab-train ckpt_path={shlex.quote(str(self.path))}",
                file=sys.stderr,
            )

    def _restore_handler(self) -> None:
        if self._previous_handler is not None and _in_main_thread():
            signal.signal(signal.SIGINT, self._previous_handler)
        self._previous_handler = None
        requeue.release()


def _find(trainer: L.Trainer, kind: type) -> Any:
    return next((c for c in trainer.callbacks if isinstance(c, kind)), None)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
