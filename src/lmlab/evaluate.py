"""`lmlab-eval ckpt_path=PATH [split=val|test] [data.path=FILE]`: score a checkpoint on text.

On a part of its own corpus (the text split is recorded in the checkpoint, so `split=test` is
exactly the text that `lmlab-train ... test=true` scored), or on any other text file with the
checkpoint's tokenizer. Prints and writes loss, bits per character, bits per byte and
perplexity. A plain argument parser, not Hydra: nothing here is composed or swept.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.errors import LmlabError

log = logging.getLogger("lmlab")

KEYS = {
    "ckpt_path": "the checkpoint (a file written by lmlab-train)",
    "split": "val or test: a part of the checkpoint's own corpus (default: test when the run "
    "held one out, else val)",
    "data.path": "any other text file, scored whole with the checkpoint's tokenizer",
    "data.text_field": "the TSV/CSV column or JSONL field of data.path that holds the text",
    "batch_size": "windows per forward pass (default 64)",
    "device": "auto, cpu or cuda (default auto)",
    "out": "where to write the figures as JSON (default: the run directory's eval_<what>.json)",
}


def parse_args(argv: list[str]) -> dict[str, str]:
    parser = argparse.ArgumentParser(
        prog="lmlab-eval",
        description="Score a checkpoint: loss, bits per character and per byte, perplexity.",
        epilog="keys: " + "; ".join(f"{k}: {v}" for k, v in KEYS.items()),
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    values: dict[str, str] = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in KEYS:
            raise LmlabError(f"unknown argument {item!r}; lmlab-eval takes {', '.join(KEYS)}")
        values[key] = value
    if "ckpt_path" not in values:
        raise LmlabError("give the checkpoint to score: lmlab-eval ckpt_path=PATH")
    if "split" in values and "data.path" in values:
        raise LmlabError("give split=val|test (the run's own corpus) or data.path=FILE, not both")
    if values.get("split", "val") not in ("val", "test"):
        raise LmlabError(f"split must be val or test, got {values['split']!r}")
    return values


def evaluate(values: dict[str, str]) -> dict[str, Any]:
    """The figures, as printed and written."""
    import lightning as L
    import torch

    from lmlab.checkpoint import read_checkpoint
    from lmlab.data.token_stream import PartStats
    from lmlab.lit_module import LanguageModel
    from lmlab.sample import resolve_device

    # the Trainer's banner (GPU available, tips) says nothing about the figures; set after
    # Lightning's import, which sets its own level
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    ckpt_path = Path(values["ckpt_path"]).expanduser()
    device = resolve_device(values.get("device", "auto"))
    checkpoint = read_checkpoint(ckpt_path)
    hparams = {**checkpoint["hyper_parameters"], "compile": False}
    module = LanguageModel(**hparams)
    module.load_state_dict(checkpoint["state_dict"])
    data_cfg = _data_config(ckpt_path, hparams)
    batch_size = _positive_int(values.get("batch_size", "64"), "batch_size")
    if "data.path" in values:
        what, loader, stats = _other_text(values, module, data_cfg, batch_size)
    else:
        what, loader, stats = _own_part(values.get("split"), hparams, data_cfg, batch_size)
    module.eval_part = what
    module.eval_factors = PartStats(**stats).factors()
    trainer = L.Trainer(
        accelerator="gpu" if device.startswith("cuda") else "cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=stats["tokens"] > 1_000_000,
    )
    with torch.inference_mode():
        trainer.test(module, dataloaders=loader, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return {
        "checkpoint": str(ckpt_path),
        "text": what,
        **stats,
        "loss": metrics[f"{what}/loss"],
        "bpc": metrics[f"{what}/bpc"],
        "bpb": metrics[f"{what}/bpb"],
        "perplexity": metrics[f"{what}/ppl"],
    }


def _data_config(ckpt_path: Path, hparams: dict[str, Any]) -> dict[str, Any]:
    """The run's data settings: recorded in the checkpoint, or (for a checkpoint written
    before they were) read from its run directory's .hydra/config.yaml."""
    if hparams.get("data_config"):
        return dict(hparams["data_config"])
    hydra_config = _run_dir(ckpt_path) / ".hydra" / "config.yaml"
    if hydra_config.is_file():
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(hydra_config)
        return OmegaConf.to_container(cfg.data, resolve=True)
    raise LmlabError(
        f"{ckpt_path} does not record its data settings and has no .hydra/config.yaml beside "
        "it; score it on a file with data.path=FILE"
    )


def _own_part(split: str | None, hparams: dict[str, Any], data_cfg: dict[str, Any], batch: int):
    from lmlab.data.datamodule import TextDataModule

    settings = {k: v for k, v in data_cfg.items() if not k.startswith("_")}
    settings["val_batch_size"] = batch
    datamodule = TextDataModule(**settings)
    datamodule.setup("test")
    if datamodule.tokenizer.state() != hparams["tokenizer_state"]:
        raise LmlabError(
            "the checkpoint's corpus now gives another tokenizer (the file or its settings "
            "changed since training); score the file as it is with data.path=FILE"
        )
    split = split or ("test" if datamodule.test_stream is not None else "val")
    loader = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
    return split, loader, datamodule.parts[split].public()


def _other_text(values: dict[str, str], module, data_cfg: dict[str, Any], batch: int):
    """A whole file, read like a corpus and tokenized with the checkpoint's tokenizer. A
    character the vocabulary lacks cannot be scored: it is left out, and the log says so."""
    import torch
    from torch.utils.data import DataLoader

    from lmlab.data.datasets import DocumentWindows, SlidingWindows
    from lmlab.data.token_stream import TokenSettings, read_normalized_documents
    from lmlab.data.tokenizers import CharTokenizer, tokenizer_from_state

    path = Path(values["data.path"]).expanduser()
    tokenizer = tokenizer_from_state(module.hparams.tokenizer_state)
    # read as the run read its corpus, with the text field named here
    settings = TokenSettings(
        text_field=values.get("data.text_field"),
        split_lines=bool(data_cfg.get("split_lines")),
        quoting=data_cfg.get("quoting", "auto"),
        normalize=data_cfg.get("normalize", "NFC"),
        encoding_errors=data_cfg.get("encoding_errors", "strict"),
    )
    documents = read_normalized_documents(path, settings)
    if isinstance(tokenizer, CharTokenizer):
        documents = _drop_unknown_characters(documents, tokenizer, path)
    pieces = [tokenizer.encode(d) for d in documents]
    stats = {
        "documents": len(documents),
        "characters": sum(len(d) for d in documents) + len(documents) - 1,
        "bytes": sum(len(d.encode("utf-8")) for d in documents) + len(documents) - 1,
    }
    block_size = int(data_cfg.get("block_size") or 8)
    if data_cfg.get("sampling") == "documents":
        stats["tokens"] = sum(len(p) for p in pieces) + len(pieces) - 1
        dataset = DocumentWindows(
            [torch.from_numpy(np.asarray(p)) for p in pieces], block_size, tokenizer.boundary_id
        )
    else:
        boundary = np.array([tokenizer.boundary_id], dtype=np.int64)
        joined = [boundary if i % 2 else pieces[i // 2] for i in range(2 * len(pieces) - 1)]
        stream = np.concatenate([np.asarray(p, dtype=np.int64) for p in joined])
        stats["tokens"] = len(stream)
        dataset = SlidingWindows(torch.from_numpy(stream), block_size, block_size, "scored")
    return path.stem, DataLoader(dataset, batch_size=batch, shuffle=False), stats


def _drop_unknown_characters(documents: list[str], tokenizer, path: Path) -> list[str]:
    known = set(tokenizer.itos)
    unknown: dict[str, int] = {}
    for document in documents:
        for char in set(document) - known:
            unknown[char] = unknown.get(char, 0) + document.count(char)
    if not unknown:
        return documents
    table = {ord(c): None for c in unknown}
    total = sum(len(d) for d in documents)
    log.warning(
        "%s: %d of %d characters (%s) are not in the checkpoint's vocabulary and are left "
        "out; the figures cover the other characters",
        path.name,
        sum(unknown.values()),
        total,
        ", ".join(f"{c!r} x{n}" for c, n in sorted(unknown.items(), key=lambda kv: -kv[1])[:10]),
    )
    return [d.translate(table) for d in documents]


def _positive_int(value: str, key: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise LmlabError(f"{key} must be a positive whole number, got {value!r}")
    return number


def _run_dir(ckpt_path: Path) -> Path:
    return ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent


def report(result: dict[str, Any]) -> str:
    return (
        f"{result['checkpoint']} on {result['text']} ({result['documents']} documents, "
        f"{result['characters']} characters, {result['bytes']} bytes, {result['tokens']} "
        f"tokens):\nloss {result['loss']:.4f}  bpc {result['bpc']:.4f}  "
        f"bpb {result['bpb']:.4f}  perplexity {result['perplexity']:.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("lmlab").addHandler(handler)
    logging.getLogger("lmlab").setLevel(logging.INFO)
    try:
        values = parse_args(sys.argv[1:] if argv is None else argv)
        result = evaluate(values)
    except LmlabError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"lmlab-eval: error: {err}", file=sys.stderr)
        return 1
    from lmlab.files import atomic_write_json

    out = values.get("out") or _run_dir(Path(values["ckpt_path"])) / f"eval_{result['text']}.json"
    atomic_write_json(out, result)
    print(report(result))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
