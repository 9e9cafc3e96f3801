"""The LightningDataModule: corpus -> text split 9:1 (or train/val/test) -> tokens -> examples.

`prepare_data` finds (or downloads) the corpus; `setup` tokenizes it (or loads its tokens from
the cache), builds the datasets, and then answers what the model and the metrics need. The
loaders' order follows the trainer's position, so a resumed run goes on where it stopped."""

from __future__ import annotations

import logging
import warnings
from dataclasses import fields
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from lmlab.data.corpus import BUILTIN_CORPORA, locate_builtin
from lmlab.data.examples import (
    BatchNumberSampler,
    DocumentWindows,
    RandomBlockBatches,
    ResumableDataLoader,
    SlidingWindows,
    WindowBatchSampler,
    shard,
)
from lmlab.data.token_cache import PartStats
from lmlab.data.tokenization import TokenSettings, tokenize_corpus
from lmlab.data.tokenizers import Tokenizer
from lmlab.errors import LmlabError

log = logging.getLogger(__name__)

EXAMPLES = ("random", "sliding", "documents")


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
        examples: str | None = None,
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
        sampling: str | None = None,  # the deprecated name of `examples`
        min_count: int = 1,
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
        if sampling is not None:
            if examples is not None and examples != sampling:
                raise LmlabError(
                    f"data.examples={examples} and data.sampling={sampling} disagree; "
                    f"data.sampling is the deprecated name of data.examples: keep data.examples "
                    "and remove data.sampling"
                )
            message = f"data.sampling is deprecated: use data.examples={sampling}"
            warnings.warn(message, FutureWarning, stacklevel=2)
            examples = sampling
        self.examples = examples or "random"
        if self.examples not in EXAMPLES:
            raise LmlabError(f"data.examples must be one of {EXAMPLES}, got {self.examples!r}")
        if block_size < 1 or batch_size < 1:
            raise LmlabError("data.block_size and data.batch_size must be positive")
        if not isinstance(min_count, int) or isinstance(min_count, bool) or min_count < 1:
            raise LmlabError(
                f"data.min_count must be a whole number >= 1 (1 keeps every word of the "
                f"training part), got {min_count!r}"
            )
        self.corpus, self.path, self.data_dir = corpus, path, data_dir
        if text_field is None and path is None and corpus in BUILTIN_CORPORA:
            text_field = BUILTIN_CORPORA[corpus].text_field
        given = locals()  # the arguments that decide the tokens, by their names
        self.settings = TokenSettings(**{f.name: given[f.name] for f in fields(TokenSettings)})
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        # validation keeps no activations for backward: larger batches are cheaper per token
        self.val_batch_size = val_batch_size or batch_size
        self.stride = stride or block_size
        self.samples_per_epoch, self.num_workers = samples_per_epoch, num_workers
        self.cache_dir = cache_dir  # token streams are cached there; None: not cached
        self.tokenizer: Tokenizer | None = None
        self.train_stream: torch.Tensor | None = None
        self.val_stream: torch.Tensor | None = None
        self.test_stream: torch.Tensor | None = None
        self.documents: dict[str, list[torch.Tensor]] = {}
        # documents, characters, UTF-8 bytes and tokens of each part: what was scored
        self.parts: dict[str, PartStats] = {}
        # words: each part's share of word tokens that are <|unk|>; empty for other tokenizers
        self.unknown_rates: dict[str, float] = {}

    def corpus_path(self) -> Path:
        if self.path is not None:
            return Path(self.path).expanduser()
        return locate_builtin(self.corpus, self.data_dir)

    def prepare_data(self) -> None:
        self.corpus_path()  # downloads a built-in corpus once, on one process

    def setup(self, stage: str | None = None) -> None:
        if self.train_stream is not None:
            return
        tokens = tokenize_corpus(self.corpus_path(), self.settings, self.cache_dir)
        self.tokenizer, self.parts = tokens.tokenizer, tokens.parts
        # Views of the memory-mapped stream (uint8/16/32): batches are gathered from it and
        # made long there, so a big corpus is never held in memory as int64.
        streams = {name: torch.from_numpy(tokens.part(name)) for name in tokens.parts}
        self.train_stream, self.val_stream = streams["train"], streams["val"]
        self.test_stream = streams.get("test")
        self._count_unknown_words(streams)
        if self.examples == "documents":
            self.documents = {
                name: [torch.from_numpy(d) for d in tokens.documents(name)] for name in streams
            }
        # Built here, once: a corpus too short for one block fails now, with its message.
        if self.examples == "random":
            num_batches = max(1, self.samples_per_epoch // self.batch_size)
            self.train_dataset: Dataset = RandomBlockBatches(
                self.train_stream, self.block_size, self.batch_size, num_batches, self.seed
            )
        elif self.examples == "sliding":
            self.train_dataset = SlidingWindows(self.train_stream, self.block_size, self.stride)
        else:
            documents = self.documents["train"]
            self.train_dataset = DocumentWindows(documents, self.block_size, self.boundary_id)
        self.val_dataset = self._eval_dataset("val")

    def _count_unknown_words(self, streams: dict[str, torch.Tensor]) -> None:
        """Each part's share of word tokens (boundaries left out) that are <|unk|>. An unknown
        word costs only what the model gives <|unk|>, one token for every word it lacks, so
        the validation figures flatter a word model by about this share."""
        unknown_id = getattr(self.tokenizer, "unknown_id", None)
        if unknown_id is None:
            return
        for name, stream in streams.items():
            unknown = int((stream == unknown_id).sum())
            words = len(stream) - int((stream == self.boundary_id).sum())
            self.unknown_rates[name] = unknown / max(words, 1)
            if name == "val":
                log.info(
                    f"words: {unknown} of the {words} validation word tokens are <|unk|> "
                    f"(unknown rate {self.unknown_rates[name]:.2%}); each scores only what the "
                    "model gives <|unk|>, which flatters val/loss, val/bpc and val/bpb"
                )

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
    def bpc_factor(self) -> float:  # val/bpc = val/loss * bpc_factor
        return self.factors("val")[0]

    @property
    def bpb_factor(self) -> float:
        return self.factors("val")[1]

    def part_summary(self) -> dict[str, dict[str, int]]:
        """For metrics.json and the log: what each part holds."""
        return {name: stats.public() for name, stats in self.parts.items()}

    # -- datasets and loaders ---------------------------------------------------------------------
    def _eval_dataset(self, part: str) -> Dataset:
        if self.examples == "documents":
            return DocumentWindows(self.documents[part], self.block_size, self.boundary_id)
        # The whole part in non-overlapping windows: the same, exact estimate at every
        # evaluation (a random-block estimate has the same expectation, more noise).
        stream = self.val_stream if part == "val" else self.test_stream
        name = {"val": "validation", "test": "test"}[part]
        return SlidingWindows(stream, self.block_size, self.block_size, name)

    def _distribution(self) -> tuple[int, int]:
        """(rank, world size) of the trainer this module serves; (0, 1) outside a trainer."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _position(self) -> tuple[int, int]:
        """(epoch, batches done) of the trainer, restored after a resume."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        return trainer.current_epoch, trainer.global_step * trainer.accumulate_grad_batches

    def train_dataloader(self) -> DataLoader:
        dataset, trainer = self.train_dataset, self.trainer
        rank, world_size = self._distribution()
        if isinstance(dataset, RandomBlockBatches):  # items are whole batches already
            sampler = BatchNumberSampler(len(dataset), self._position, rank, world_size)
            batching = {"batch_size": None, "sampler": sampler}
        else:
            args = len(dataset), self.batch_size, self.seed, self._position, rank, world_size
            batching = {"batch_sampler": WindowBatchSampler(*args)}
        return ResumableDataLoader(
            dataset,
            # its own generator: a DataLoader draws a seed on every iter(), which must not move
            # the global one that dropout draws from (a resumed run draws as an unbroken one)
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
            # page-locked host memory lets Lightning's non-blocking copy overlap the GPU's work
            pin_memory=trainer is not None and trainer.strategy.root_device.type == "cuda",
            **batching,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        if self.test_stream is None:
            raise LmlabError(
                "this corpus has no test part: set data.test_fraction (e.g. 0.1) to hold one out"
            )
        return self._eval_loader(self._eval_dataset("test"))

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        rank, world_size = self._distribution()
        if world_size > 1:  # each process scores its share; the loss is reduced across them
            dataset = Subset(dataset, shard(len(dataset), rank, world_size))
        generator = torch.Generator().manual_seed(self.seed)  # as for training: not the global
        return DataLoader(dataset, self.val_batch_size, shuffle=False, generator=generator)
