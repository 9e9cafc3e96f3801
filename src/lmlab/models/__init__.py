"""The model ladder. Every model maps `idx (B, T) long -> logits (B, T, V)` and has a
`block_size`, so one LightningModule and one `generate()` serve them all."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from lmlab.errors import LmlabError
from lmlab.models.bigram import BigramConfig, BigramLM
from lmlab.models.bow import BagOfWords, BOWConfig
from lmlab.models.gpt import GPT, GPTConfig, KVCache, too_long_message
from lmlab.models.mlp import BengioMLP, MLPConfig

MODELS: dict[str, tuple[type, type[nn.Module]]] = {
    "bigram": (BigramConfig, BigramLM),
    "mlp": (MLPConfig, BengioMLP),
    "bow": (BOWConfig, BagOfWords),
    "gpt": (GPTConfig, GPT),
}

__all__ = ["GPT", "BOWConfig", "BagOfWords", "BengioMLP", "MODELS", "BigramConfig", "BigramLM"]
__all__ += ["GPTConfig", "KVCache"]
__all__ += ["MLPConfig", "build_model", "check_block_size", "hyperparameter_names"]


def hyperparameter_names(name: str) -> set[str]:
    if name not in MODELS:
        raise LmlabError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return {f.name for f in dataclasses.fields(MODELS[name][0])}


def build_model(name: str, **hparams: Any) -> nn.Module:
    """Build a model from its registry name and hyperparameters (unknown keys are an error)."""
    fields = hyperparameter_names(name)
    if unknown := sorted(set(hparams) - fields):
        raise LmlabError(
            f"model {name!r} has no hyperparameter(s) {unknown}; it takes {sorted(fields)}"
        )
    config_cls, model_cls = MODELS[name]
    return model_cls(config_cls(**hparams))


def check_block_size(model: nn.Module, block_size: int) -> None:
    """An LmlabError when windows of `block_size` tokens outgrow the position table of the GPT
    or the bag of words (the bigram and the MLP read any length: their block_size only crops
    generation contexts)."""
    names = {GPT: "GPT's", BagOfWords: "bag-of-words model's"}
    name = names.get(type(model))
    if name is not None and block_size > model.config.block_size:
        what = f"data.block_size ({block_size})"
        raise LmlabError(too_long_message(what, block_size, model.config.block_size, name))
