"""Is a sample new? makemore's check for line corpora (names, reviews): a generated document is
"in train" when it is exactly one of the training documents, "in val" when one of the
validation documents (and not a training one), else "new". A model that only recites its
training names has memorised them; the share of new ones says how much it invents.

The documents are those training used, read and split exactly as tokenization does (the same
reader, normalisation, shuffle seed and fractions), from a datamodule or from the data
settings a checkpoint records."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab.data.tokenization import TokenSettings, read_part_documents

IN_TRAIN, IN_VAL, NEW = "in train", "in val", "new"


def is_line_corpus(datamodule: Any) -> bool:
    """A corpus of many short documents (a line each, or a TSV/CSV/JSONL field each), where a
    sample should end at the boundary and can be looked up; not running text (Shakespeare), nor
    a datamodule other than lmlab's."""
    settings = getattr(datamodule, "settings", None)
    if not isinstance(settings, TokenSettings):
        return False
    return settings.split_lines or settings.text_field is not None


def part_documents(path: str | Path, settings: TokenSettings) -> dict[str, list[str]]:
    """The documents of each part (train, val, and test when held out) of a document corpus,
    as `lmlab.data.tokenization` splits them before tokenizing."""
    return read_part_documents(Path(path), settings)[1]


@dataclass(frozen=True)
class KnownDocuments:
    """The training and validation documents, to label samples against."""

    train: frozenset[str]
    val: frozenset[str]

    @classmethod
    def of(cls, datamodule: Any) -> KnownDocuments:
        """The documents of lmlab's TextDataModule (set up or not: the corpus is read again)."""
        parts = part_documents(datamodule.corpus_path(), datamodule.settings)
        return cls(frozenset(parts["train"]), frozenset(parts["val"]))

    def label(self, text: str) -> str:
        """ "in train", "in val" or "new": where `text`, a whole document, was seen."""
        if text in self.train:
            return IN_TRAIN
        return IN_VAL if text in self.val else NEW

    def new_fraction(self, texts: Sequence[str]) -> float:
        """The share of `texts` labelled "new"."""
        if not texts:
            raise ValueError("no samples to label")
        return sum(self.label(t) == NEW for t in texts) / len(texts)


def new_summary(labels: Sequence[str]) -> str:
    """`new: 13 of 20 (65%)`: how many of the labelled samples are new."""
    new = sum(label == NEW for label in labels)
    return f"new: {new} of {len(labels)} ({new / max(1, len(labels)):.0%})"


def labelled_lines(texts: Sequence[str], labels: Sequence[str], width: int = 24) -> list[str]:
    """One line per sample, its label in a column after it (`kaelynn   new`); the column
    starts after the longest sample, or after `width` characters when samples are longer."""
    pad = min(width, max((len(t) for t in texts), default=0))
    return [f"{text:<{pad}}  {label}" for text, label in zip(texts, labels, strict=True)]


def checkpoint_datamodule(ckpt_path: str | Path) -> Any:
    """The TextDataModule (not set up: nothing is read yet) of the data a checkpoint was
    trained on, from the data config it records or its run directory's .hydra/config.yaml, as
    lmlab-eval rebuilds it; an LmlabError when it records neither."""
    from lmlab.checkpoint import read_checkpoint
    from lmlab.data.datamodule import TextDataModule
    from lmlab.evaluate import _data_config  # the one place that rebuilds a run's data config

    ckpt_path = Path(ckpt_path).expanduser()
    hparams = read_checkpoint(ckpt_path)["hyper_parameters"]
    return TextDataModule(**_data_config(ckpt_path, hparams))
