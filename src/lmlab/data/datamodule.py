"""The LightningDataModule: corpus -> text split 9:1 (or train/val/test) -> tokens -> examples."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Subset

from lmlab.data.corpus import BUILTIN_CORPORA, locate_builtin
from lmlab.data.datasets import DocumentWindows, RandomBlockBatches, SlidingWindows
from lmlab.data.samplers import (
    BatchNumberSampler,
    PositionedDataLoader,
    WindowBatchSampler,
    shard,
)
from lmlab.data.token_stream import PartStats, TokenSettings, tokenize_corpus
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
        val_batch_size: int | None = None,
        sampling: str = "random",
        stride: int | None = None,
        train_fraction: float = 0.9,
        test_fraction: float = 0.0,
        quoting: str = "auto",
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
        if not 0.0 <= test_fraction < 1.0 - train_fraction:
            raise LmlabError(
                f"data.test_fraction must be at least 0 and leave some text to validate "
                f"(below 1 - data.train_fraction = {1 - train_fraction:.3g}), got {test_fraction}"
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
        # validation keeps no activations for backward: larger batches are cheaper per token
        self.val_batch_size = val_batch_size or batch_size
        self.sampling = sampling
        self.stride = stride or block_size
        self.train_fraction = train_fraction
        self.test_fraction = test_fraction
        self.quoting = quoting
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
        self.test_stream: torch.Tensor | None = None
        self.documents: dict[str, list[torch.Tensor]] = {}
        # documents, characters, UTF-8 bytes and tokens of each part: what was scored
        self.parts: dict[str, PartStats] = {}

    # -- corpus -------------------------------------------------------------------------------
    def corpus_path(self) -> Path:
        if self.path is not None:
            return Path(self.path).expanduser()
        return locate_builtin(self.corpus, self.data_dir)

    def prepare_data(self) -> None:
        self.corpus_path()  # downloads a built-in corpus once, on one process

    def token_settings(self) -> TokenSettings:
        text_field = self.text_field
        if text_field is None and self.path is None:
            text_field = BUILTIN_CORPORA[self.corpus].text_field
        return TokenSettings(
            tokenizer=self.tokenizer_spec,
            text_field=text_field,
            split_lines=self.split_lines,
            quoting=self.quoting,
            normalize=self.normalize,
            encoding_errors=self.encoding_errors,
            train_fraction=self.train_fraction,
            test_fraction=self.test_fraction,
            split_seed=self.split_seed,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_stream is not None:
            return
        tokens = tokenize_corpus(self.corpus_path(), self.token_settings(), self.cache_dir)
        self.tokenizer = tokens.tokenizer
        self.parts = tokens.parts
        # Views of the memory-mapped stream (uint8/16/32): batches are gathered from it and
        # made long there, so a big corpus is never held in memory as int64.
        streams = {name: torch.from_numpy(tokens.part(name)) for name in tokens.parts}
        self.train_stream, self.val_stream = streams["train"], streams["val"]
        self.test_stream = streams.get("test")
        if self.sampling == "documents":
            self.documents = {
                name: [torch.from_numpy(d) for d in tokens.documents(name)] for name in streams
            }
        # Built here, once: a corpus too short for one block fails now, with its message.
        self.train_dataset = self._train_dataset()
        self.val_dataset = self._eval_dataset("val")

    @property
    def train_documents(self) -> list[torch.Tensor]:
        return self.documents.get("train", [])

    @property
    def val_documents(self) -> list[torch.Tensor]:
        return self.documents.get("val", [])

    # -- what the model needs to know -----------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        if self.tokenizer is None:
            raise RuntimeError("call setup() before asking for the vocabulary size")
        return self.tokenizer.vocab_size

    @property
    def boundary_id(self) -> int:
        return self.tokenizer.boundary_id

    def factors(self, part: str = "val") -> tuple[float, float]:
        """(bpc, bpb) = loss * factor: nats -> bits, tokens -> characters or UTF-8 bytes of
        the part's text (the same text for every tokenizer)."""
        return self.parts[part].factors()

    @property
    def bpc_factor(self) -> float:
        """val/bpc = val/loss * bpc_factor."""
        return self.factors("val")[0]

    @property
    def bpb_factor(self) -> float:
        """val/bpb = val/loss * bpb_factor."""
        return self.factors("val")[1]

    def part_summary(self) -> dict[str, dict[str, int]]:
        """For metrics.json and the log: what each part holds."""
        return {name: stats.public() for name, stats in self.parts.items()}

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

    def _eval_dataset(self, part: str):
        if self.sampling == "documents":
            return DocumentWindows(self.documents[part], self.block_size, self.boundary_id)
        # The whole part in non-overlapping windows: the same, exact estimate at every
        # evaluation (a random-block estimate has the same expectation, more noise).
        stream = {"val": self.val_stream, "test": self.test_stream}[part]
        name = {"val": "validation", "test": "test"}[part]
        return SlidingWindows(stream, self.block_size, self.block_size, name)

    def _distribution(self) -> tuple[int, int]:
        """(rank, world size) of the trainer this module serves; (0, 1) outside a trainer."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _position(self) -> tuple[int, int]:
        """(epoch, batches done) of the attached trainer, read when an epoch's iteration
        starts: after a resume these are the restored counters, so the data order goes on
        where the interrupted run stopped."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        return trainer.current_epoch, trainer.global_step * trainer.accumulate_grad_batches

    def _pin_memory(self) -> bool:
        # page-locked host memory lets Lightning's non-blocking copy overlap the GPU's work
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset
        rank, world_size = self._distribution()
        # A DataLoader draws a seed for its workers on every iter(): from its own generator,
        # not the global one, so a resumed run's dropout draws stay those of an uninterrupted run.
        generator = torch.Generator().manual_seed(self.seed)
        if isinstance(dataset, RandomBlockBatches):  # items are whole batches already
            sampler = BatchNumberSampler(len(dataset), self._position, rank, world_size)
            return PositionedDataLoader(
                dataset,
                batch_size=None,
                sampler=sampler,
                generator=generator,
                num_workers=self.num_workers,
                pin_memory=self._pin_memory(),
            )
        batch_sampler = WindowBatchSampler(
            len(dataset), self.batch_size, self.seed, True, self._position, rank, world_size
        )
        return PositionedDataLoader(
            dataset,
            batch_sampler=batch_sampler,
            generator=generator,
            num_workers=self.num_workers,
            pin_memory=self._pin_memory(),
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        if self.test_stream is None:
            raise LmlabError(
                "this corpus has no test part: set data.test_fraction (e.g. 0.1) to hold one out"
            )
        return self._eval_loader(self._eval_dataset("test"))

    def _eval_loader(self, dataset) -> DataLoader:
        rank, world_size = self._distribution()
        if world_size > 1:  # each process scores its share; the loss is reduced across them
            dataset = Subset(dataset, shard(len(dataset), rank, world_size))
        # its own generator: iterating a loader draws a seed, which must not move the global
        # generator that dropout draws from (a step-0 validation would change training)
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            dataset, batch_size=self.val_batch_size, shuffle=False, generator=generator
        )
