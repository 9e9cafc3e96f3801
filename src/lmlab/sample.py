"""`lmlab-sample ckpt_path=PATH [prompt=... max_new_tokens=... ...]`: text from a checkpoint.

Plain `key=value` arguments, not Hydra overrides: a prompt is user text and reaches the
tokenizer byte for byte (quotes, commas, `${...}` and all); nothing here composes a config.

On a line corpus (names) each sample ends at the boundary and is printed on one line with its
label ("in train", "in val" or "new": lmlab.sample_labels), then `new: 13 of 20 (65%)`;
`labels=false` prints the bare samples, one per line, for a script to read.
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

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
    "stop_at_boundary": "end each sample at the corpus's boundary, a newline or <|endoftext|> "
    "(auto: true for a line corpus such as names, false for running text)",
    "labels": "after each sample of a line corpus, 'in train', 'in val' or 'new', and a last "
    "line 'new: N of M (P%)'; false: bare samples, one per line (auto: true when samples end "
    "at the boundary of a line corpus)",
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


def switch(values: dict[str, str], key: str) -> bool | None:
    """`values[key]` as true, false or auto (None, also when absent)."""
    text = values.get(key, "auto").strip().lower()
    choices = {"true": True, "false": False, "auto": None}
    if text not in choices:
        raise LmlabError(f"{key} must be true, false or auto, got {values[key]!r}")
    return choices[text]


class Samples(NamedTuple):
    texts: list[str]
    labels: list[str] | None  # one per text; None: not labelled
    one_per_line: bool  # each text ended at the boundary and holds no line break


def sample(values: dict[str, str]) -> list[str]:
    """The texts that `lmlab-sample` prints, from its `key=value` arguments."""
    return sample_labelled(values).texts


def sample_labelled(values: dict[str, str]) -> Samples:
    """The texts, and their labels when they are labelled (see the module doc)."""
    from lmlab.checkpoint import load_for_sampling
    from lmlab.generation import SamplingSettings, sample_text
    from lmlab.sample_labels import KnownDocuments, checkpoint_datamodule, is_line_corpus

    if not values.get("ckpt_path"):
        raise LmlabError("give the checkpoint to sample from: lmlab-sample ckpt_path=PATH")
    read = {k: number(values, k, kind, default) for k, (kind, default) in NUMBERS.items()}
    stop, labels = switch(values, "stop_at_boundary"), switch(values, "labels")
    device = resolve_device(values.get("device", "auto"))
    model, tokenizer = load_for_sampling(values["ckpt_path"], device)
    try:
        datamodule = checkpoint_datamodule(values["ckpt_path"])
    except LmlabError:  # a checkpoint that records no data settings: running text, unlabelled
        if labels:
            raise
        datamodule = None
    lines = is_line_corpus(datamodule)
    stop = lines if stop is None else stop
    if labels and not (lines and stop):
        raise LmlabError(
            "labels=true needs samples that end at the boundary of a line corpus (data.split_lines"
            " or data.text_field), and this checkpoint's corpus is running text or "
            "stop_at_boundary=false; leave labels out"
        )
    settings = SamplingSettings(prompt=values.get("prompt", ""), stop_at_boundary=stop, **read)
    texts = sample_text(model, tokenizer, settings, device=device)
    one_per_line = stop and not any("\n" in t for t in texts)
    if not (lines and stop) or labels is False:
        return Samples(texts, None, one_per_line)
    try:
        known = KnownDocuments.of(datamodule)
    except LmlabError as err:  # the corpus moved or changed: the samples are still worth having
        if labels:
            raise
        print(f"lmlab-sample: samples not labelled: {err}", file=sys.stderr)
        return Samples(texts, None, one_per_line)
    return Samples(texts, [known.label(t) for t in texts], one_per_line)


def main(argv: list[str] | None = None) -> None:
    try:
        values = parse_key_values(
            "lmlab-sample",
            "Text from a checkpoint alone.",
            KEYS,
            sys.argv[1:] if argv is None else argv,
        )
        texts, labels, one_per_line = sample_labelled(values)
    except LmlabError as err:
        refuse("lmlab-sample", err)
    if labels is not None:
        from lmlab.sample_labels import labelled_lines, new_summary

        print("\n".join(labelled_lines(texts, labels)))
        print(new_summary(labels))
        return
    for i, text in enumerate(texts):
        if len(texts) > 1 and not one_per_line:
            print(f"--- sample {i + 1} ---")
        print(text)


if __name__ == "__main__":
    main()
