"""One LightningModule for every model of the ladder."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from lmlab.models import build_model
from lmlab.optim import build_adamw, fused_adamw_available, lr_multiplier

IGNORE_INDEX = -1  # targets that are padding (per-document examples) carry this id


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    B, T, V = logits.shape
    return F.cross_entropy(logits.view(B * T, V), targets.view(B * T), ignore_index=IGNORE_INDEX)


class LanguageModel(L.LightningModule):
    """Wraps a plain `nn.Module` LM; everything needed to rebuild it is in `hparams`."""

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
        self.save_hyperparameters()
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
        # no host sync per step, and Lightning's per-call logging cost is paid once per
        # interval instead of on every step (it was 5% of a small model's step time).
        self.interval_loss.add_(loss.detach())
        self.interval_steps += 1
        if self._is_logging_step():
            self.log("train/loss", self.interval_loss / self.interval_steps, prog_bar=True)
            # one tag for the rate (LearningRateMonitor would log one per parameter group)
            self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
            self.interval_loss.zero_()
            self.interval_steps = 0
        return loss

    def _is_logging_step(self) -> bool:
        # the steps on which Lightning's logger connector writes (every log_every_n_steps)
        return (self.trainer.global_step + 1) % max(self.trainer.log_every_n_steps, 1) == 0

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        loss = lm_loss(self(x), y)
        self.val_loss.update(loss, weight=(y != IGNORE_INDEX).sum())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()  # the exact mean over all processes' windows
        self.val_loss.reset()
        # equal on every process already; sync_dist tells Lightning so (one tiny all-reduce)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/bpc", loss * self.hparams.bpc_factor, sync_dist=True)
        if self.hparams.bpb_factor is not None:
            self.log("val/bpb", loss * self.hparams.bpb_factor, sync_dist=True)
        self.log("val/ppl", torch.exp(loss), sync_dist=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.eval_loss.update(lm_loss(self(x), y), weight=(y != IGNORE_INDEX).sum())

    def on_test_epoch_end(self) -> None:
        if self.eval_factors is None:
            raise RuntimeError("set eval_factors (bpc, bpb) of the text before trainer.test")
        loss = self.eval_loss.compute()
        self.eval_loss.reset()
        bpc, bpb = self.eval_factors
        part = self.eval_part
        self.log(f"{part}/loss", loss, sync_dist=True)
        self.log(f"{part}/bpc", loss * bpc, sync_dist=True)
        self.log(f"{part}/bpb", loss * bpb, sync_dist=True)
        self.log(f"{part}/ppl", torch.exp(loss), sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Dropout draws from the global generator: saving its state makes a resumed run draw
        # what the uninterrupted run would have drawn (Lightning restores everything else).
        checkpoint["rng_states"] = {"torch": torch.get_rng_state()}
        # a run stopped between two logged steps logs the same interval mean after a resume
        checkpoint["interval_loss"] = (self.interval_loss.cpu(), self.interval_steps)
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "interval_loss" in checkpoint:
            loss, steps = checkpoint["interval_loss"]
            self.interval_loss.copy_(loss)
            self.interval_steps = steps
        states = checkpoint.get("rng_states") or {}
        if "torch" in states:
            torch.set_rng_state(states["torch"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])

    def configure_optimizers(self):
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        optimizer, scheduler = self.build_optimizer(max_steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def build_optimizer(
        self, max_steps: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """AdamW and its per-step schedule from `hparams` (also what a plain loop would use)."""
        opt_cfg = dict(self.hparams.optimizer)
        fused = fused_adamw_available(self.device)  # one kernel per step, not one per tensor
        optimizer = build_adamw(self.model, fused=fused, **opt_cfg)
        sched = dict(self.hparams.scheduler or {})
        multiplier = lr_multiplier(
            decay=sched.get("decay", "constant"),
            warmup_steps=int(sched.get("warmup_steps", 0)),
            decay_steps=int(sched.get("decay_steps") or max(max_steps, 1)),
            lr=float(opt_cfg["lr"]),
            min_lr=float(sched.get("min_lr", opt_cfg["lr"])),
        )
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)

    def set_learning_rate(self, lr: float) -> None:
        """Train at `lr` (read by configure_optimizers, saved in checkpoints); the schedule's
        floor min_lr moves with it, keeping the configured lr / min_lr ratio."""
        optimizer = dict(self.hparams.optimizer)
        old = float(optimizer["lr"])
        optimizer["lr"] = lr
        self.hparams.optimizer = optimizer
        sched = dict(self.hparams.scheduler or {})
        if "min_lr" in sched and old > 0:
            sched["min_lr"] = float(sched["min_lr"]) * lr / old
            self.hparams.scheduler = sched

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())
