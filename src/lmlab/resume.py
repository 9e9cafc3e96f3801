"""Resuming: a checkpoint continues only the run it came from (same tokens, same tokenizer)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from lmlab.errors import LmlabError

# The fingerprint hashes 256 runs of 256 tokens spread evenly over the stream: runs, not single
# tokens every few KB, because touching a memory-mapped page maps its neighbours too, and a
# sample spread over every page would bring a 1 GB corpus into memory.
RUNS, RUN_LENGTH = 256, 256


def stream_fingerprint(stream: torch.Tensor) -> str:
    """A short hash of a token stream's length and an even sample of its tokens."""
    digest = hashlib.sha256(str(len(stream)).encode())
    starts = torch.linspace(0, max(len(stream) - RUN_LENGTH, 0), RUNS).long().unique()
    for start in starts.tolist():
        digest.update(stream[start : start + RUN_LENGTH].to(torch.int64).numpy().tobytes())
    return digest.hexdigest()[:16]


def data_fingerprint(train_stream: torch.Tensor, val_stream: torch.Tensor) -> dict[str, Any]:
    return {
        "train_tokens": len(train_stream),
        "val_tokens": len(val_stream),
        "hash": stream_fingerprint(train_stream) + stream_fingerprint(val_stream),
    }


def check_same_data(path: str | Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume on another corpus or tokenizer: the weights would be continued on
    tokens they were not trained on (or fail to load, with a less helpful message)."""
    if saved.get("tokenizer_state") != current["tokenizer_state"]:
        old, new = saved.get("tokenizer_state") or {}, current["tokenizer_state"]
        raise LmlabError(
            f"cannot resume from {path}: it was trained with another tokenizer "
            f"({_describe_tokenizer(old)}, now {_describe_tokenizer(new)}); use the data "
            "config of that run (see its .hydra/config.yaml) or start a new run without ckpt_path"
        )
    old_data = saved.get("data_fingerprint")
    if old_data is not None and old_data != current["data_fingerprint"]:
        raise LmlabError(
            f"cannot resume from {path}: it was trained on another corpus "
            f"({old_data['train_tokens']} + {old_data['val_tokens']} tokens, now "
            f"{current['data_fingerprint']['train_tokens']} + "
            f"{current['data_fingerprint']['val_tokens']}, or the same sizes with other "
            "tokens); use the data config of that run or start a new run without ckpt_path"
        )


def _describe_tokenizer(state: dict[str, Any]) -> str:
    kind = state.get("kind", "unknown")
    if kind == "char":
        return f"char, {len(state.get('chars', []))} characters"
    return f"{kind} {state.get('name') or state.get('encoding') or ''}".strip()
