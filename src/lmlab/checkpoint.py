"""Checkpoints: loading a trained model and its tokenizer without running pickled code, and
checking that a resume continues the run it came from (same model, tokens and tokenizer).

Every way a checkpoint can be wrong (missing, a directory, empty, truncated, another kind of
file, a pickle that would run code, a checkpoint of another program) ends in one `LmlabError`
that says what was found and what to give instead."""

from __future__ import annotations

import hashlib
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io import TorchCheckpointIO
from torch import nn

from lmlab.atomic_write import atomic_write_bytes
from lmlab.data.tokenizers import Tokenizer, tokenizer_from_state
from lmlab.errors import LmlabError
from lmlab.models import build_model

USE_INSTEAD = "give ckpt_path=<run dir>/checkpoints/last.ckpt, a file written by lmlab-train"
# ckpt_path values that Lightning resolves itself (the trainer's own last/best checkpoint)
LIGHTNING_KEYWORDS = ("last", "best", "hpc")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive
PICKLE_MAGIC = b"\x80"  # a raw pickle (protocol 2+): the legacy torch.save format, or no checkpoint


def read_checkpoint(path: str | Path, device: str = "cpu") -> dict[str, Any]:
    """The contents of an lmlab checkpoint, loaded with `weights_only=True` (tensors and plain
    data only: a checkpoint with code in it is refused before any of it runs)."""
    path = Path(path).expanduser()
    # a clear error for a path that cannot hold a checkpoint, before torch.load sees it
    if path.is_dir():
        inside = path / "checkpoints" / "last.ckpt"
        hint = f"ckpt_path={inside}" if inside.is_file() else "the .ckpt file inside it"
        raise LmlabError(f"ckpt_path {path} is a directory; give {hint}")
    if not path.is_file():
        raise LmlabError(f"checkpoint not found: {path}; {USE_INSTEAD}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(len(ZIP_MAGIC))
    if size == 0:
        raise LmlabError(
            f"{path} is empty (0 bytes), as a run killed while saving leaves it; {USE_INSTEAD}"
        )
    is_zip = head == ZIP_MAGIC
    if is_zip and not zipfile.is_zipfile(path):  # the archive's directory is written last
        raise LmlabError(
            f"{path} is truncated ({size} bytes, the end of the archive is missing: a copy "
            f"or a save that did not finish); {USE_INSTEAD}"
        )
    if not is_zip and not head.startswith(PICKLE_MAGIC):
        raise LmlabError(
            f"{path} is not a checkpoint (a checkpoint is a zip archive written by torch.save; "
            f"this file starts with {head!r}); {USE_INSTEAD}"
        )
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise to a user
            warnings.simplefilter("ignore")
            # mmap: tensors are read when used, so checking a big checkpoint costs little
            mmap = is_zip and torch.device(device).type == "cpu"
            checkpoint = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if not is_zip:
            raise LmlabError(
                f"{path} was refused and not unpickled: it is a bare pickle, not a checkpoint "
                f"written by torch.save, and unpickling it could run code; {USE_INSTEAD}"
            ) from err
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"it calls {found.group(1)}, which is" if found else "it holds objects that are"
        raise LmlabError(
            f"{path} was refused and not loaded: {what} not tensors or plain data, so loading "
            f"it could run code. Load only checkpoints you or lmlab-train wrote; {USE_INSTEAD}"
        ) from err
    except Exception as err:  # the unpickler raises KeyError, OSError, RuntimeError, ...
        raise LmlabError(
            f"{path} is not a readable checkpoint (truncated or damaged: "
            f"{type(err).__name__}: {err}); {USE_INSTEAD}"
        ) from err
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    keys = set(hparams) if isinstance(hparams, dict) else set()
    if not {"model_name", "tokenizer_state"} <= keys or "state_dict" not in checkpoint:
        raise LmlabError(
            f"{path} is not an lmlab checkpoint (it has no model hyperparameters, tokenizer "
            f"or weights); {USE_INSTEAD}"
        )
    return checkpoint


def load_for_sampling(path: str | Path, device: str = "cpu") -> tuple[nn.Module, Tokenizer]:
    """The model (in eval mode, on `device`) and tokenizer saved in a Lightning checkpoint."""
    checkpoint = read_checkpoint(path, device)
    hparams = checkpoint["hyper_parameters"]
    model = build_model(hparams["model_name"], **hparams["model_hparams"])
    weights = checkpoint["state_dict"]
    state = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # weights that do not fit the hyperparameters saved with them
        raise LmlabError(
            f"{path}: the weights do not match the model described in the checkpoint "
            f"({str(err).splitlines()[-1].strip()}); {USE_INSTEAD}"
        ) from err
    model.to(device).eval()
    return model, tokenizer_from_state(hparams["tokenizer_state"])


def _differences(saved: dict[str, Any], now: dict[str, Any], template: str) -> list[str]:
    """`template` filled in with each key whose values differ, its value now and the saved one."""
    keys = sorted(set(saved) | set(now))
    return [
        template.format(k, now.get(k), saved.get(k)) for k in keys if saved.get(k) != now.get(k)
    ]


def check_resumable(path: str | Path, module: nn.Module | None = None) -> dict[str, Any] | None:
    """Check `ckpt_path` before `trainer.fit` resumes from it; return its hyperparameters, or
    None for what Lightning resolves itself (`last`, `best`, `hpc`, URLs). Given this run's
    LightningModule, weights that do not fit its model are an LmlabError naming the settings
    that differ (another tokenizer is left to `check_same_data`)."""
    if str(path) in LIGHTNING_KEYWORDS or "://" in str(path):
        return None
    checkpoint = read_checkpoint(path)
    hparams = dict(checkpoint["hyper_parameters"])
    if module is None or hparams["tokenizer_state"] != module.hparams.get("tokenizer_state"):
        return hparams
    saved_shapes = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if saved_shapes == shapes:
        return hparams
    saved, now = hparams["model_name"], module.hparams["model_name"]
    if saved != now:
        raise LmlabError(
            f"cannot resume from {path}: it holds a {saved} model and this run builds a {now}; "
            f"set model={saved} with that run's settings, or drop ckpt_path to start a new run"
        )
    old_settings = {"name": saved, **hparams["model_hparams"]}
    settings = {"name": now, **module.hparams["model_hparams"]}
    differ = _differences(old_settings, settings, "model.{}={} (the checkpoint has {})")
    # the same settings with other code: name the weights instead
    differ = differ or _differences(saved_shapes, shapes, "{} {} (the checkpoint has {})")[:3]
    raise LmlabError(
        f"cannot resume from {path}: its weights do not fit this run's model: "
        f"{', '.join(differ)}; resume with the checkpoint's model settings (see its run's "
        ".hydra/config.yaml), or drop ckpt_path to start a new run"
    )


# The fingerprint hashes 256 runs of 256 tokens spread evenly over the stream: runs, not single
# tokens every few KB, because touching a memory-mapped page maps its neighbours too, and a
# sample spread over every page would bring a 1 GB corpus into memory.
RUNS, RUN_LENGTH = 256, 256


def data_fingerprint(train_stream: torch.Tensor, val_stream: torch.Tensor) -> dict[str, Any]:
    """The streams' sizes and a short hash of each one's length and an even sample of it."""
    hashes = ""
    for stream in (train_stream, val_stream):
        digest = hashlib.sha256(str(len(stream)).encode())
        starts = torch.linspace(0, max(len(stream) - RUN_LENGTH, 0), RUNS).long().unique()
        for start in starts.tolist():
            digest.update(stream[start : start + RUN_LENGTH].to(torch.int64).numpy().tobytes())
        hashes += digest.hexdigest()[:16]
    return {"train_tokens": len(train_stream), "val_tokens": len(val_stream), "hash": hashes}


def check_same_data(path: str | Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume on another corpus or tokenizer: the weights would be continued on
    tokens they were not trained on (or fail to load, with a less helpful message)."""
    old = saved.get("data_fingerprint")
    if saved.get("tokenizer_state") != current["tokenizer_state"]:
        was = _describe_tokenizer(saved.get("tokenizer_state") or {})
        why = (
            f"with another tokenizer ({was}, now {_describe_tokenizer(current['tokenizer_state'])}"
            "); use the data config of that run (see its .hydra/config.yaml)"
        )
    elif old is not None and old != (new := current["data_fingerprint"]):
        why = (
            f"on another corpus ({old['train_tokens']} + {old['val_tokens']} tokens, now "
            f"{new['train_tokens']} + {new['val_tokens']}, or the same sizes with other "
            "tokens); use the data config of that run"
        )
    else:
        return
    raise LmlabError(
        f"cannot resume from {path}: it was trained {why} or start a new run without ckpt_path"
    )


def _describe_tokenizer(state: dict[str, Any]) -> str:
    kind = state.get("kind", "unknown")
    if kind == "char":
        return f"char, {len(state.get('chars', []))} characters"
    return f"{kind} {state.get('name') or state.get('encoding') or ''}".strip()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, with the temporary file in the checkpoint's own directory
    (Lightning's goes through the system temp directory, and a move across file systems is a
    copy that a kill can leave half done)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        atomic_write_bytes(path, lambda f: torch.save(checkpoint, f))
