"""Training examples `(x, y)`, `y` being `x` shifted by one token: random windows, sliding
windows, or one window per document; and the order they are drawn in, a function of (seed,
epoch, batch, rank), never of hidden iterator state: a resumed run draws exactly the batches
an uninterrupted run would have drawn from there on, and each process of a distributed run
draws its share of every global batch (`trainer.use_distributed_sampler=false`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from lmlab.errors import LmlabError

# Where the run that iterates a sampler stands: (epoch, batches done since training started),
# read when an epoch's iteration starts, so a resumed run goes on from there (None: the start).
ResumePoint = Callable[[], tuple[int, int]]


def check_long_enough(stream: torch.Tensor, block_size: int, part: str) -> None:
    if len(stream) < block_size + 1:
        raise LmlabError(
            f"the {part} part of the corpus has {len(stream)} tokens, fewer than one block of "
            f"{block_size} + 1; use a longer corpus, a smaller data.block_size, or change "
            "data.train_fraction"
        )


class RandomBlockBatches(Dataset):
    """Item `i` is a whole batch of random windows, as the tutorials' `get_batch()`, drawn
    with a generator seeded by (seed, i): no hidden sampler state to save for a resume."""

    def __init__(
        self, stream: torch.Tensor, block_size: int, batch_size: int, num_batches: int, seed: int
    ):
        check_long_enough(stream, block_size, "training")
        self.batch_size, self.num_batches, self.seed = batch_size, num_batches, seed
        # (N - T + 1, T), a view: a batch is whole rows of it, one copy per window rather
        # than an index computation per token
        self._windows = stream.unfold(0, block_size, 1)

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        high = len(self._windows) - 1  # starts below it keep y, one window on, in range
        starts = torch.randint(high, (self.batch_size,), generator=generator)
        x = self._windows.index_select(0, starts).long()  # (B, T)
        y = self._windows.index_select(0, starts + 1).long()  # (B, T): x shifted by one
        return x, y


class SlidingWindows(Dataset):
    """Windows of `block_size` tokens every `stride` tokens (the `GPTDatasetV1` way)."""

    def __init__(self, stream: torch.Tensor, block_size: int, stride: int, part: str = "training"):
        if stride < 1:
            raise LmlabError(f"data.stride must be at least 1, got {stride}")
        check_long_enough(stream, block_size, part)
        self._windows = stream.unfold(0, block_size + 1, stride)  # x and y: one token longer

    def __len__(self) -> int:
        return len(self._windows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self._windows[index].long()
        return chunk[:-1], chunk[1:]


class DocumentWindows(TensorDataset):
    """One example per document (makemore's names), never crossing documents: `c1..cn` is
    `x = [b, c1, .., cn]`, `y = [c1, .., cn, b]` (`b` the boundary token), padded on the right
    to `block_size` with targets `ignore_index` (out of the loss), continued in the next
    window when longer."""

    def __init__(
        self,
        documents: list[torch.Tensor],
        block_size: int,
        boundary_id: int,
        ignore_index: int = -1,
    ):
        xs, ys = [], []
        for doc in documents:
            seq = torch.cat([torch.tensor([boundary_id]), doc.long(), torch.tensor([boundary_id])])
            for start in range(0, len(seq) - 1, block_size):
                piece = seq[start : start + block_size + 1]
                x = torch.full((block_size,), boundary_id, dtype=torch.long)
                y = torch.full((block_size,), ignore_index, dtype=torch.long)
                x[: len(piece) - 1], y[: len(piece) - 1] = piece[:-1], piece[1:]
                xs.append(x)
                ys.append(y)
        if not xs:
            raise LmlabError("no documents to make examples from; the corpus part is empty")
        super().__init__(torch.stack(xs), torch.stack(ys))  # (N, T) each
        self.x, self.y = self.tensors


# -- the order of training batches ---------------------------------------------------------------
def _first_batch(position: ResumePoint | None, batches_per_epoch: int) -> tuple[int, int]:
    """The epoch and the first batch of it still to draw."""
    epoch, done = position() if position else (0, 0)
    return epoch, min(max(done - epoch * batches_per_epoch, 0), batches_per_epoch)


@dataclass(eq=False)
class BatchNumberSampler(Sampler[int]):
    """Yields global batch numbers for datasets whose item `i` is a whole batch drawn from a
    generator seeded by `i` (RandomBlockBatches): rank `r` of `w` draws number `n * w + r`."""

    batches_per_epoch: int
    position: ResumePoint | None = None
    rank: int = 0
    world_size: int = 1

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[int]:
        epoch, first = _first_batch(self.position, self.batches_per_epoch)
        for i in range(first, self.batches_per_epoch):
            yield (epoch * self.batches_per_epoch + i) * self.world_size + self.rank


@dataclass(eq=False)
class WindowBatchSampler(Sampler[list[int]]):
    """Batches of window indices, epoch `e` in a permutation seeded by (seed, e); rank `r` takes
    the `r`-th share of each global batch, so ranks never see the same window in an epoch."""

    num_windows: int
    batch_size: int
    seed: int
    position: ResumePoint | None = None
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.num_windows < self.world_size:
            raise LmlabError(
                f"{self.num_windows} training window(s) cannot be shared by {self.world_size} "
                "processes; use a longer corpus or fewer devices"
            )
        # Full batches only (drop_last); a corpus smaller than one global batch still gives one.
        self.batches_per_epoch = max(self.num_windows // (self.batch_size * self.world_size), 1)
        self.per_rank = min(self.batch_size, math.ceil(self.num_windows / self.world_size))

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        epoch, first = _first_batch(self.position, self.batches_per_epoch)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_windows, generator=generator)
        for i in range(first, self.batches_per_epoch):
            start = (i * self.world_size + self.rank) * self.per_rank
            yield order[start : start + self.per_rank].tolist()


def shard(num_items: int, rank: int, world_size: int) -> list[int]:
    """Items `rank, rank + w, ...`: every item is evaluated by exactly one process (no padding,
    so a metric reduced across processes is the exact mean over the whole split)."""
    return list(range(rank, num_items, world_size))


class ResumableDataLoader(DataLoader):
    """Its samplers take their resume point from the trainer: no state of its own to save, as
    it tells Lightning (which would warn that a mid-epoch resume is not reproducible)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass
