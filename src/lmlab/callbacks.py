"""Callbacks: throughput, and the run summary `metrics.json`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from lmlab.files import atomic_write_json


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
        if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0 and self._start:
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
    steps, throughput, wall time and status (also when the run fails)."""

    def __init__(self, output_dir: str) -> None:
        self.path = Path(output_dir) / "metrics.json"
        self.start = time.time()
        self.best: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.extra: dict[str, Any] = {}
        self.status = "running"

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

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.status = "interrupted" if isinstance(exception, KeyboardInterrupt) else "failed"
        self.write(trainer, pl_module, error=f"{type(exception).__name__}: {exception}")

    @rank_zero_only
    def write(self, trainer, pl_module, error: str | None = None) -> None:
        throughput = next((c for c in trainer.callbacks if isinstance(c, TokensPerSecond)), None)
        summary: dict[str, Any] = {
            "status": self.status,
            "best": self.best,
            "last": self.last,
            "val/loss": self.best.get("val/loss"),
            "val/bpc": self.best.get("val/bpc"),
            "num_params": sum(p.numel() for p in pl_module.parameters()),
            "steps": trainer.global_step,
            "tokens_per_sec": throughput.mean_tokens_per_sec if throughput else None,
            "wall_time_sec": round(time.time() - self.start, 3),
            "device": str(pl_module.device),
            "torch": torch.__version__,
            **self.extra,
        }
        if error:
            summary["error"] = error
        atomic_write_json(self.path, summary)
