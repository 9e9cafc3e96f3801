"""Training order as a function of (seed, epoch, batch, rank), never of hidden iterator state.

A run resumed from a checkpoint asks where it is (epoch and batches done, from the restored
trainer) and draws exactly the batches an uninterrupted run would have drawn from there on; a
process of a distributed run draws its own share of each global batch. Lightning's own
DistributedSampler is switched off (`trainer.use_distributed_sampler=false`): these samplers
split the work between ranks themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from lmlab.errors import LmlabError

# (epoch, batches done since the start of training) of the run that iterates the sampler
Position = Callable[[], tuple[int, int]]


def start_of_training() -> tuple[int, int]:
    return 0, 0


def _first_batch(position: Position, batches_per_epoch: int) -> tuple[int, int]:
    """The epoch and the first batch of it still to draw."""
    epoch, done = position()
    return epoch, min(max(done - epoch * batches_per_epoch, 0), batches_per_epoch)


class BatchNumberSampler(Sampler[int]):
    """Yields global batch numbers for datasets whose item `i` is a whole batch drawn from a
    generator seeded by `i` (RandomBlockBatches): rank `r` of `w` draws number `n * w + r`."""

    def __init__(
        self,
        batches_per_epoch: int,
        position: Position = start_of_training,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.batches_per_epoch = batches_per_epoch
        self.position = position
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[int]:
        epoch, first = _first_batch(self.position, self.batches_per_epoch)
        for i in range(first, self.batches_per_epoch):
            yield (epoch * self.batches_per_epoch + i) * self.world_size + self.rank


class WindowBatchSampler(Sampler[list[int]]):
    """Batches of window indices; with `shuffle`, epoch `e` uses a permutation seeded by
    (seed, e). Each global batch holds `batch_size * world_size` windows, rank `r` takes the
    `r`-th share, so the ranks never see the same window in an epoch."""

    def __init__(
        self,
        num_windows: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        position: Position = start_of_training,
        rank: int = 0,
        world_size: int = 1,
    ):
        if num_windows < world_size:
            raise LmlabError(
                f"{num_windows} training window(s) cannot be shared by {world_size} processes; "
                "use a longer corpus or fewer devices"
            )
        self.num_windows = num_windows
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.position = position
        self.rank = rank
        self.world_size = world_size
        global_batch = batch_size * world_size
        # Full batches only (drop_last); a corpus smaller than one global batch still gives one.
        self.batches_per_epoch = max(num_windows // global_batch, 1)
        self.per_rank = min(batch_size, math.ceil(num_windows / world_size))

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_windows)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_windows, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, first = _first_batch(self.position, self.batches_per_epoch)
        order = self._order(epoch)
        for i in range(first, self.batches_per_epoch):
            start = (i * self.world_size + self.rank) * self.per_rank
            yield order[start : start + self.per_rank].tolist()


def shard(num_items: int, rank: int, world_size: int) -> list[int]:
    """Items `rank, rank + w, ...`: every item is evaluated by exactly one process (no padding,
    so a metric reduced across processes is the exact mean over the whole split)."""
    return list(range(rank, num_items, world_size))


class PositionedDataLoader(DataLoader):
    """A DataLoader whose samplers take their position from the trainer (see above): it has
    no state of its own to save, and says so to Lightning, which would otherwise warn that a
    mid-epoch resume is not reproducible."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass
