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
        self._windows = stream.unfold(0, block_size, 1)  # (N - T + 1, T), a view: no copy

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        high = len(self.stream) - self.block_size  # last valid start keeps y in range
        starts = torch.randint(high, (self.batch_size,), generator=generator)
        # Whole rows of a (N, T) strided view of the stream: a row copy each, not B x T
        # index computations (10x faster than indexing the stream with positions)
        x = self._windows.index_select(0, starts).long()  # (B, T)
        y = self._windows.index_select(0, starts + 1).long()  # (B, T): x shifted by one
        return x, y


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


class DocumentWindows(Dataset):
    """One example per document (makemore's names): windows never cross documents.

    A document `c1..cn` becomes `x = [b, c1, .., cn]`, `y = [c1, .., cn, b]` with `b` the
    boundary token, so the first character is predicted from the boundary alone, as in
    makemore. Windows are padded on the right to `block_size`; padded targets are
    `ignore_index` and do not count in the loss. A document longer than a window continues
    in the next window.
    """

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
                x[: len(piece) - 1] = piece[:-1]
                y[: len(piece) - 1] = piece[1:]
                xs.append(x)
                ys.append(y)
        if not xs:
            raise LmlabError("no documents to make examples from; the corpus part is empty")
        self.x = torch.stack(xs)  # (N, T)
        self.y = torch.stack(ys)  # (N, T)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]
