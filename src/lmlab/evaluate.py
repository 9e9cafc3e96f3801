"""`lmlab-eval ckpt_path=PATH [split=val|test] [data.path=FILE]`: score a checkpoint on a part
of its own corpus (the split is recorded in the checkpoint, so `split=test` is exactly what
`lmlab-train ... test=true` scored) or on any other text file, with its tokenizer. A plain
argument parser, not Hydra: nothing here is composed or swept."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from lmlab.cli import log_to_stderr, number, parse_key_values, refuse
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
    about = "Score a checkpoint: loss, bits per character and per byte, perplexity."
    values = parse_key_values("lmlab-eval", about, KEYS, argv)
    if "ckpt_path" not in values:
        raise LmlabError("give the checkpoint to score: lmlab-eval ckpt_path=PATH")
    if "split" in values and "data.path" in values:
        raise LmlabError("give split=val|test (the run's own corpus) or data.path=FILE, not both")
    if values.get("split", "val") not in ("val", "test"):
        raise LmlabError(f"split must be val or test, got {values['split']!r}")
    if (number(values, "batch_size", int, 64) or 0) < 1:
        raise LmlabError(
            f"batch_size must be a positive whole number, got {values['batch_size']!r}"
        )
    return values


def evaluate(values: dict[str, str]) -> dict[str, Any]:
    """The figures, as printed and written."""
    import lightning as L
    import torch

    from lmlab.checkpoint import read_checkpoint
    from lmlab.lit_module import LitLanguageModel
    from lmlab.sample import resolve_device

    # the Trainer's banner says nothing about the figures; set after Lightning's own setting
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    ckpt_path = Path(values["ckpt_path"]).expanduser()
    device = resolve_device(values.get("device", "auto"))
    checkpoint = read_checkpoint(ckpt_path)
    hparams = {**checkpoint["hyper_parameters"], "compile": False}
    module = LitLanguageModel(**hparams)
    module.load_state_dict(checkpoint["state_dict"])
    data_cfg = _data_config(ckpt_path, hparams)
    batch_size = int(values.get("batch_size", 64))  # checked by parse_args
    if "data.path" in values:
        what, loader, stats = _other_text(values, module, data_cfg, batch_size)
    else:
        what, loader, stats = _own_part(values.get("split"), hparams, data_cfg, batch_size)
    module.eval_part, module.eval_factors = what, stats.factors()
    trainer = L.Trainer(
        accelerator="gpu" if device.startswith("cuda") else "cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=stats.tokens > 1_000_000,
    )
    with torch.inference_mode():
        trainer.test(module, dataloaders=loader, verbose=False)
    figures = {"loss": "loss", "bpc": "bpc", "bpb": "bpb", "perplexity": "ppl"}
    metrics = {k: float(trainer.callback_metrics[f"{what}/{m}"]) for k, m in figures.items()}
    return {"checkpoint": str(ckpt_path), "text": what, **stats.public(), **metrics}


def _data_config(ckpt_path: Path, hparams: dict[str, Any]) -> dict[str, Any]:
    """The run's data settings: recorded in the checkpoint, or (for a checkpoint written
    before they were) read from its run directory's .hydra/config.yaml."""
    hydra_config = _run_dir(ckpt_path) / ".hydra" / "config.yaml"
    if hparams.get("data_config"):
        data_cfg = dict(hparams["data_config"])
    elif hydra_config.is_file():
        from omegaconf import OmegaConf

        data_cfg = OmegaConf.to_container(OmegaConf.load(hydra_config).data, resolve=True)
    else:
        raise LmlabError(
            f"{ckpt_path} does not record its data settings and has no .hydra/config.yaml "
            "beside it; score it on a file with data.path=FILE"
        )
    # a run from before data.sampling was renamed data.examples: read it under the new name
    settings = {k: v for k, v in data_cfg.items() if not k.startswith("_") and k != "sampling"}
    return {**settings, "examples": data_cfg.get("examples") or data_cfg.get("sampling")}


def _own_part(split: str | None, hparams: dict[str, Any], data_cfg: dict[str, Any], batch: int):
    from lmlab.data.datamodule import TextDataModule

    datamodule = TextDataModule(**{**data_cfg, "val_batch_size": batch})
    datamodule.setup("test")
    if datamodule.tokenizer.state() != hparams["tokenizer_state"]:
        raise LmlabError(
            "the checkpoint's corpus now gives another tokenizer (the file or its settings "
            "changed since training); score the file as it is with data.path=FILE"
        )
    split = split or ("test" if datamodule.test_stream is not None else "val")
    loader = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
    return split, loader, datamodule.parts[split]


def _other_text(values: dict[str, str], module, data_cfg: dict[str, Any], batch: int):
    """A whole file, read like a corpus and tokenized with the checkpoint's tokenizer. A
    character the vocabulary lacks cannot be scored: it is left out, and the log says so."""
    import torch
    from torch.utils.data import DataLoader

    from lmlab.data import corpus, examples, token_cache, tokenizers

    path = Path(values["data.path"]).expanduser()
    tokenizer = tokenizers.tokenizer_from_state(module.hparams.tokenizer_state)
    # as the run read its corpus, with the text field named here
    keys = "split_lines", "encoding_errors", "quoting", "normalize"
    how = {"normalize": "NFC"} | {k: data_cfg[k] for k in keys if k in data_cfg}
    documents = corpus.read_documents(path, values.get("data.text_field"), **how)
    if unknown := tokenizer.unknown_characters("\n".join(documents)):
        log.warning(
            "%s: %d of %d characters are left out, %s; the figures cover the other characters",
            path.name,
            sum(unknown.values()),
            sum(len(d) for d in documents),
            tokenizers.unknown_characters_message(unknown, "the checkpoint's vocabulary", True),
        )
        documents = [d.translate(dict.fromkeys(map(ord, unknown))) for d in documents]
    ids, lengths = tokenizer.encode_documents(documents)
    block_size = int(data_cfg.get("block_size") or 8)
    if data_cfg.get("examples") == "documents":
        pieces = [torch.from_numpy(d) for d in tokenizers.document_views(ids, lengths)]
        dataset = examples.DocumentWindows(pieces, block_size, tokenizer.boundary_id)
    else:
        dataset = examples.SlidingWindows(torch.from_numpy(ids), block_size, block_size, "scored")
    stats = token_cache.PartStats.of_documents(documents, len(ids))
    return path.stem, DataLoader(dataset, batch_size=batch, shuffle=False), stats


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
    log_to_stderr()
    try:
        values = parse_args(sys.argv[1:] if argv is None else argv)
        result = evaluate(values)
    except LmlabError as err:
        refuse("lmlab-eval", err)
    from lmlab.atomic_write import atomic_write_json

    out = values.get("out") or _run_dir(Path(values["ckpt_path"])) / f"eval_{result['text']}.json"
    atomic_write_json(out, result)
    print(report(result))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
