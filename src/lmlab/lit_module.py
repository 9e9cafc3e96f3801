"""One LightningModule for every model of the ladder."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric

from lmlab.models import build_model
from lmlab.optim import build_adamw, fused_adamw_available, lr_multiplier

IGNORE_INDEX = -1  # targets that are padding (per-document examples) carry this id


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def is_logging_step(trainer: L.Trainer, step: int) -> bool:
    """Whether optimizer step `step` (from 1) is one on which Lightning's logger writes (every
    `log_every_n_steps`): work that syncs with the device is done on those steps only."""
    return step % max(trainer.log_every_n_steps, 1) == 0


class LitLanguageModel(L.LightningModule):
    """The Lightning side of a language model: the loss, metrics, optimizer and checkpoint
    extras around `self.model`, a plain `nn.Module` of the ladder (lmlab.models). Everything
    needed to rebuild the model is in `hparams`."""

    def __init__(
        self,
        model_name: str,
        model_hparams: dict[str, Any],
        optimizer: dict[str, Any],
        scheduler: dict[str, Any] | None = None,
        tokenizer_state: dict[str, Any] | None = None,
        bpc_factor: float = 1.0 / math.log(2),
        compile: bool = False,
        data_fingerprint: dict[str, Any] | None = None,
        bpb_factor: float | None = None,
        data_config: dict[str, Any] | None = None,
    ):
        super().__init__()
        # in checkpoints, not in the loggers: they get the comparable keys of run_hparams
        # (lmlab.hparams_tab), not the tokenizer's characters and data fingerprints
        self.save_hyperparameters(logger=False)
        self.model = build_model(model_name, **model_hparams)
        if compile:
            self.model.compile()  # in place: state_dict keys stay those of the plain model
        self.val_loss = MeanMetric()
        self.eval_loss = MeanMetric()
        # what trainer.test scores: the name its metrics are logged under, and the (bpc, bpb)
        # factors of that text (set by lmlab-train's test=true and by lmlab-eval)
        self.eval_part = "test"
        self.eval_factors: tuple[float, float] | None = None
        # training loss since the last logged step (a buffer: follows the module's device)
        self.register_buffer("interval_loss", torch.zeros(()), persistent=False)
        self.interval_steps = 0

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        loss = lm_loss(self(x), y)
        # Summed on the device, logged as the interval's mean on the steps the logger writes:
        # no host sync per step, and Lightning's per-call logging cost is paid once an interval.
        self.interval_loss.add_(loss.detach())
        self.interval_steps += 1
        if is_logging_step(self.trainer, self.trainer.global_step + 1):
            self._log_step(self.trainer.global_step + 1)  # the count once this step is done
            self.log("train/loss", self.interval_loss / self.interval_steps, prog_bar=True)
            # one tag for the rate (LearningRateMonitor would log one per parameter group)
            self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
            self.interval_loss.zero_()
            self.interval_steps = 0
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_loss.update(lm_loss(self(x), y), weight=(y != IGNORE_INDEX).sum())

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.eval_loss.update(lm_loss(self(x), y), weight=(y != IGNORE_INDEX).sum())

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val", self.val_loss, self.hparams.bpc_factor, self.hparams.bpb_factor)

    def on_test_epoch_end(self) -> None:
        if self.eval_factors is None:
            raise RuntimeError("set eval_factors (bpc, bpb) of the text before trainer.test")
        self._log_scores(self.eval_part, self.eval_loss, *self.eval_factors)

    def _log_step(self, step: int) -> None:
        """Log at `step` steps done: the one convention of samples, checkpoints, metrics.json
        and the console (Lightning's own is the index of the step, one less). A logged `step`
        also keeps Lightning from adding its `epoch` scalar, which counts pseudo-epochs."""
        self.log("step", float(step), logger=True, prog_bar=False)

    def _log_scores(self, part: str, metric: MeanMetric, bpc: float, bpb: float | None) -> None:
        loss = metric.compute()  # the exact mean over all processes' windows
        metric.reset()
        self._log_step(self.trainer.global_step)
        # equal on every process already; sync_dist tells Lightning so (one tiny all-reduce)
        self.log(f"{part}/loss", loss, prog_bar=metric is self.val_loss, sync_dist=True)
        self.log(f"{part}/bpc", loss * bpc, sync_dist=True)
        if bpb is not None:
            self.log(f"{part}/bpb", loss * bpb, sync_dist=True)
        self.log(f"{part}/ppl", torch.exp(loss), sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Dropout draws from the global generator: saving its state makes a resumed run draw
        # what the uninterrupted run would have drawn (Lightning restores everything else).
        checkpoint["rng_states"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()
        # a run stopped between two logged steps logs the same interval mean after a resume
        checkpoint["interval_loss"] = (self.interval_loss.cpu(), self.interval_steps)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "interval_loss" in checkpoint:
            loss, self.interval_steps = checkpoint["interval_loss"]
            self.interval_loss.copy_(loss)
        states = checkpoint.get("rng_states") or {}
        if "torch" in states:
            torch.set_rng_state(states["torch"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])

    def configure_optimizers(self):
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        optimizer, scheduler = self.build_optimizer(max_steps)
        scheduler_config = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler_config}

    def build_optimizer(self, max_steps: int) -> tuple[torch.optim.Optimizer, LambdaLR]:
        """AdamW and its per-step schedule from `hparams` (also what a plain loop would use)."""
        opt_cfg = dict(self.hparams.optimizer)
        optimizer = build_adamw(self.model, fused=fused_adamw_available(self.device), **opt_cfg)
        sched = dict(self.hparams.scheduler or {})
        multiplier = lr_multiplier(
            decay=sched.get("decay", "constant"),
            warmup_steps=int(sched.get("warmup_steps", 0)),
            decay_steps=int(sched.get("decay_steps") or max(max_steps, 1)),
            lr=float(opt_cfg["lr"]),
            min_lr=float(sched.get("min_lr", opt_cfg["lr"])),
        )
        return optimizer, LambdaLR(optimizer, multiplier)

    def set_learning_rate(self, lr: float) -> None:
        """Train at `lr` (read by configure_optimizers, saved in checkpoints); the schedule's
        floor min_lr moves with it, keeping the configured lr / min_lr ratio."""
        old = float(self.hparams.optimizer["lr"])
        self.hparams.optimizer = {**self.hparams.optimizer, "lr": lr}
        sched = dict(self.hparams.scheduler or {})
        if "min_lr" in sched and old > 0:
            sched["min_lr"] = float(sched["min_lr"]) * lr / old
            self.hparams.scheduler = sched

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())
