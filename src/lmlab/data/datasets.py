"""Training examples from a token stream: `y` is always `x` shifted by one token."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from lmlab.errors import LmlabError


def check_long_enough(stream: torch.Tensor, block_size: int, part: str) -> None:
    if len(stream) < block_size + 1:
        raise LmlabError(
            f"the {part} part of the corpus has {len(stream)} tokens, fewer than one block of "
            f"{block_size} + 1; use a longer corpus, a smaller data.block_size, or change "
            "data.train_fraction"
        )


class RandomBlockBatches(Dataset):
    """Item `i` is a whole batch of random windows, as the tutorials' `get_batch()`.

    Offsets are drawn from a generator seeded by (seed, i), so the batch at a given step is a
    function of the seed and the step alone: no hidden sampler state to save for a resume.
    All windows are gathered with one indexing operation.
    """

    def __init__(
        self, stream: torch.Tensor, block_size: int, batch_size: int, num_batches: int, seed: int
    ):
        check_long_enough(stream, block_size, "training")
        self.stream = stream
        self.block_size = block_size
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.seed = seed
        self._window = torch.arange(block_size)

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        high = len(self.stream) - self.block_size  # last valid start keeps y in range
        starts = torch.randint(high, (self.batch_size,), generator=generator)
        positions = starts[:, None] + self._window  # (B, T)
        return self.stream[positions].long(), self.stream[positions + 1].long()


class SlidingWindows(Dataset):
    """Windows of `block_size` tokens every `stride` tokens (the `GPTDatasetV1` way)."""

    def __init__(self, stream: torch.Tensor, block_size: int, stride: int, part: str = "training"):
        if stride < 1:
            raise LmlabError(f"data.stride must be at least 1, got {stride}")
        check_long_enough(stream, block_size, part)
        self.stream = stream
        self.block_size = block_size
        self.stride = stride
        self._window = torch.arange(block_size + 1)

    def __len__(self) -> int:
        return (len(self.stream) - self.block_size - 1) // self.stride + 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        chunk = self.stream[index * self.stride + self._window].long()
        return chunk[:-1], chunk[1:]
