"""The LightningDataModule: corpus -> tokens -> 9:1 split -> training examples."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from lmlab.data.corpus import BUILTIN_CORPORA, locate_builtin
from lmlab.data.datasets import DocumentWindows, RandomBlockBatches, SlidingWindows
from lmlab.data.token_stream import TokenSettings, tokenize_corpus
from lmlab.data.tokenizers import Tokenizer
from lmlab.errors import LmlabError

SAMPLINGS = ("random", "sliding", "documents")


class TextDataModule(L.LightningDataModule):
    def __init__(
        self,
        corpus: str | None = None,
        path: str | None = None,
        text_field: str | None = None,
        split_lines: bool = False,
        tokenizer: str = "char",
        block_size: int = 8,
        batch_size: int = 32,
        sampling: str = "random",
        stride: int | None = None,
        train_fraction: float = 0.9,
        samples_per_epoch: int = 32_000,
        split_seed: int = 42,
        data_dir: str = "data",
        seed: int = 1337,
        normalize: str | None = "NFC",
        encoding_errors: str = "strict",
        num_workers: int = 0,
        cache_dir: str | None = None,
    ):
        super().__init__()
        if corpus is None and path is None:
            raise LmlabError("no corpus: choose a data config (data=...) or set data.path=FILE")
        if not 0.0 < train_fraction < 1.0:
            raise LmlabError(
                f"data.train_fraction must be between 0 and 1 (exclusive), got {train_fraction}"
            )
        if sampling not in SAMPLINGS:
            raise LmlabError(f"data.sampling must be one of {SAMPLINGS}, got {sampling!r}")
        if block_size < 1 or batch_size < 1:
            raise LmlabError("data.block_size and data.batch_size must be positive")
        self.corpus = corpus
        self.path = path
        self.text_field = text_field
        self.split_lines = split_lines
        self.tokenizer_spec = tokenizer
        self.block_size = block_size
        self.batch_size = batch_size
        self.sampling = sampling
        self.stride = stride or block_size
        self.train_fraction = train_fraction
        self.samples_per_epoch = samples_per_epoch
        self.split_seed = split_seed
        self.data_dir = data_dir
        self.seed = seed
        self.normalize = normalize
        self.encoding_errors = encoding_errors
        self.num_workers = num_workers
        self.cache_dir = cache_dir  # token streams are cached there; None: not cached
        self.tokenizer: Tokenizer | None = None
        self.train_stream: torch.Tensor | None = None
        self.val_stream: torch.Tensor | None = None
        self.train_documents: list[torch.Tensor] = []
        self.val_documents: list[torch.Tensor] = []
        self.val_tokens_per_char = 1.0

    # -- corpus -------------------------------------------------------------------------------
    def corpus_path(self) -> Path:
        if self.path is not None:
            return Path(self.path).expanduser()
        return locate_builtin(self.corpus, self.data_dir)

    def prepare_data(self) -> None:
        self.corpus_path()  # downloads a built-in corpus once, on one process

    def setup(self, stage: str | None = None) -> None:
        if self.train_stream is not None:
            return
        path = self.corpus_path()
        text_field = self.text_field
        if text_field is None and self.path is None:
            text_field = BUILTIN_CORPORA[self.corpus].text_field
        settings = TokenSettings(
            tokenizer=self.tokenizer_spec,
            text_field=text_field,
            split_lines=self.split_lines,
            normalize=self.normalize,
            encoding_errors=self.encoding_errors,
            shuffle_seed=self.split_seed if self.sampling == "documents" else None,
        )
        tokens = tokenize_corpus(path, settings, self.cache_dir)
        ids, tokenizer = tokens.ids, tokens.tokenizer
        split = int(len(ids) * self.train_fraction)
        if self.sampling == "documents":
            self._split_documents(ids, tokenizer.boundary_id, tokens.num_documents)
            split = sum(len(d) + 1 for d in self.train_documents)
        self.tokenizer = tokenizer
        # Views of the memory-mapped stream (uint16/uint32): batches are gathered from it and
        # made long there, so a big corpus is never held in memory as int64.
        self.train_stream = torch.from_numpy(ids[:split])
        self.val_stream = torch.from_numpy(ids[split:])
        self.val_tokens_per_char = len(self.val_stream) / max(tokens.characters(split), 1)
        # Built here, once: a corpus too short for one block fails now, with its message.
        self.train_dataset = self._train_dataset()
        self.val_dataset = self._val_dataset()

    def _split_documents(self, ids: np.ndarray, boundary_id: int, num_documents: int) -> None:
        """Cut the joined stream back into documents and give the first 90% to training."""
        cuts = np.flatnonzero(ids == boundary_id)
        pieces = [torch.from_numpy(p) for p in np.split(ids, cuts)]
        pieces = [pieces[0]] + [p[1:] for p in pieces[1:]]  # drop the boundary itself
        n_train = int(num_documents * self.train_fraction)
        if n_train == 0 or n_train == len(pieces):
            raise LmlabError(
                f"{num_documents} document(s) cannot be split {self.train_fraction:.0%} / "
                f"{1 - self.train_fraction:.0%}; use a corpus with more documents"
            )
        self.train_documents, self.val_documents = pieces[:n_train], pieces[n_train:]

    # -- what the model needs to know -----------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        if self.tokenizer is None:
            raise RuntimeError("call setup() before asking for the vocabulary size")
        return self.tokenizer.vocab_size

    @property
    def boundary_id(self) -> int:
        return self.tokenizer.boundary_id

    @property
    def bpc_factor(self) -> float:
        """val/bpc = val/loss * bpc_factor: nats -> bits, tokens -> characters."""
        return self.val_tokens_per_char / math.log(2)

    # -- datasets and loaders ---------------------------------------------------------------------
    def _train_dataset(self):
        if self.sampling == "documents":
            return DocumentWindows(self.train_documents, self.block_size, self.boundary_id)
        if self.sampling == "random":
            num_batches = max(1, self.samples_per_epoch // self.batch_size)
            return RandomBlockBatches(
                self.train_stream, self.block_size, self.batch_size, num_batches, self.seed
            )
        return SlidingWindows(self.train_stream, self.block_size, self.stride)

    def _val_dataset(self):
        if self.sampling == "documents":
            return DocumentWindows(self.val_documents, self.block_size, self.boundary_id)
        # The whole validation split in non-overlapping windows: the same, exact estimate at
        # every evaluation (a random-block estimate has the same expectation, more noise).
        return SlidingWindows(self.val_stream, self.block_size, self.block_size, "validation")

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset
        if isinstance(dataset, RandomBlockBatches):  # items are whole batches already
            return DataLoader(dataset, batch_size=None, num_workers=self.num_workers)
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=len(dataset) >= self.batch_size,
            generator=generator,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=self.batch_size, shuffle=False)
