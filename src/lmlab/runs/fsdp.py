"""`trainer=fsdp`: a model sharded over every process (PyTorch's FSDP2, `fully_shard`), for a
GPT whose weights, gradients and AdamW state do not fit on one GPU.

Lightning's `FSDPStrategy` wraps the model in FSDP1, whose flattened parameters hide the 2-D
shape that lmlab's AdamW groups go by (weight decay on matrices only), and which Lightning
refuses to run on a CPU. Its `ModelParallelStrategy` runs FSDP2, whose parameters are DTensors
of their full shape, on GPUs and on CPUs (gloo) alike; it expects the LightningModule to shard
itself in `configure_model`. Here the strategy shards the model instead, so the one
LightningModule trains unchanged under every strategy.

Checkpoints are gathered into one file on rank 0 (`save_distributed_checkpoint=False`): the
file lmlab-sample, lmlab-eval and a resume read with `torch.load(weights_only=True)`, exactly as
from any other run. Lightning's other format, a directory of shards per checkpoint, is not
offered: lmlab's checks read checkpoints whole, and Lightning's consolidation script reads only
its FSDP1 directories."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
from hydra.utils import get_class
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from lmlab.errors import LmlabError

# Callbacks that run the model (or read whole weights) in rank 0 alone: a sharded model's
# forward gathers each layer from every process, so rank 0 would wait for the others forever.
WHOLE_MODEL_CALLBACKS = {
    "SampleTextCallback": "sample_text",
    "EmbeddingProjector": "embeddings",
    "ModelDiagnostics": "diagnostics",
}


class FullyShardedStrategy(ModelParallelStrategy):
    """FSDP2 over all processes (one data-parallel dimension, no tensor parallelism): each
    module of `shard_classes` (a GPT's blocks) is one unit of sharding, gathered just before it
    runs and freed after; the rest of the model (embeddings, final norm, the tied head) is the
    root unit.

    Args:
        shard_classes: import paths of the module classes that each become a unit.
        reshard_after_forward: free each unit's gathered weights after its forward (and gather
            them again for the backward): less memory for one more all-gather per unit.
    """

    def __init__(
        self,
        shard_classes: Sequence[str] = ("lmlab.models.gpt.Block",),
        reshard_after_forward: bool = True,
        process_group_backend: str | None = None,
    ) -> None:
        super().__init__(
            tensor_parallel_size=1,
            save_distributed_checkpoint=False,  # one file: see the module's docstring
            process_group_backend=process_group_backend,
        )
        self.shard_classes = tuple(get_class(name) for name in shard_classes)
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # every process holds a shard: the data-parallel dimension spans the whole world
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def setup(self, trainer: L.Trainer) -> None:
        """`ModelParallelStrategy.setup`, with the sharding done here rather than in the
        LightningModule's `configure_model`; called again for each fit, validate and test,
        which find the model sharded already."""
        check_callbacks(trainer.callbacks)
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        model = self.lightning_module.model
        mesh = self.device_mesh["data_parallel"]
        shard_model(model, mesh, self.shard_classes, self.reshard_after_forward)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()  # the metrics and buffers outside the sharded model
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)  # over the sharded parameters
        self.setup_precision_plugin()


def shard_model(
    model: nn.Module, mesh: Any, shard_classes: tuple[type, ...], reshard_after_forward: bool
) -> int:
    """Shard each module of `shard_classes` in `model`, then `model` itself, over `mesh`
    (nothing if it is sharded already); return the number of units made."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return 0
    units = [m for m in model.modules() if isinstance(m, shard_classes) and m is not model]
    if not units:
        names = ", ".join(c.__name__ for c in shard_classes)
        raise LmlabError(
            f"trainer=fsdp shards the model by its {names} modules, and "
            f"{type(model).__name__} has none; use model=gpt, or set "
            "trainer.strategy.shard_classes to classes of this model"
        )
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
    # the root keeps the rest; it is needed again at once by the backward, so it stays gathered
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    return len(units) + 1


def check_callbacks(callbacks: Sequence[Any]) -> None:
    """Refuse callbacks that would run the sharded model in one process (see
    WHOLE_MODEL_CALLBACKS), naming the overrides that leave them out."""
    found = [key for c in callbacks if (key := WHOLE_MODEL_CALLBACKS.get(type(c).__name__))]
    if found:
        nulls = " ".join(f"callbacks.{key}=null" for key in found)
        raise LmlabError(
            f"trainer=fsdp shards the model over the processes, and callbacks "
            f"{', '.join(found)} run it in one process alone (they would wait for the others "
            f"forever); set {nulls}, or use experiment=gpt_large_fsdp, which does"
        )
