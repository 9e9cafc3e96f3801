"""`lmlab-sample ckpt_path=PATH [prompt=... max_new_tokens=... ...]`: text from a checkpoint.

Plain `key=value` arguments, not Hydra overrides: a prompt is user text and reaches the
tokenizer byte for byte (quotes, commas, `${...}` and all); nothing here composes a config.
"""

from __future__ import annotations

import sys
from typing import Any

from lmlab.cli import number, parse_key_values, refuse
from lmlab.errors import LmlabError

KEYS = {
    "ckpt_path": "the checkpoint (a run's checkpoints/last.ckpt)",
    "prompt": "the text to continue, taken literally (empty: start a new document)",
    "max_new_tokens": "tokens to generate (500)",
    "num_samples": "how many texts (1)",
    "temperature": "0 is greedy (0.8)",
    "top_k": "keep the k likeliest tokens (null: all)",
    "top_p": "keep the smallest set of tokens holding this probability (null: all)",
    "seed": "the same seed gives the same texts (1337)",
    "device": "auto | cpu | cuda (auto)",
}
# the numeric keys: how each is read, and its default (None: no cut)
NUMBERS: dict[str, tuple[type, Any]] = {
    "max_new_tokens": (int, 500),
    "num_samples": (int, 1),
    "temperature": (float, 0.8),
    "top_k": (int, None),
    "top_p": (float, None),
    "seed": (int, 1337),
}


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise LmlabError(f"device={name} is not a device; use auto, cpu or cuda") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmlabError(f"device={name} but this machine has no CUDA GPU; use device=cpu or auto")
    return name


def sample(values: dict[str, str]) -> list[str]:
    """The texts that `lmlab-sample` prints, from its `key=value` arguments."""
    from lmlab.checkpoint import load_for_sampling
    from lmlab.generation import SamplingSettings, sample_text

    if not values.get("ckpt_path"):
        raise LmlabError("give the checkpoint to sample from: lmlab-sample ckpt_path=PATH")
    read = {k: number(values, k, kind, default) for k, (kind, default) in NUMBERS.items()}
    settings = SamplingSettings(prompt=values.get("prompt", ""), **read)
    device = resolve_device(values.get("device", "auto"))
    model, tokenizer = load_for_sampling(values["ckpt_path"], device)
    return sample_text(model, tokenizer, settings, device=device)


def main(argv: list[str] | None = None) -> None:
    try:
        values = parse_key_values(
            "lmlab-sample",
            "Text from a checkpoint alone.",
            KEYS,
            sys.argv[1:] if argv is None else argv,
        )
        texts = sample(values)
    except LmlabError as err:
        refuse("lmlab-sample", err)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1} ---")
        print(text)


if __name__ == "__main__":
    main()
