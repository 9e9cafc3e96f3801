"""Loading a trained model and its tokenizer from a checkpoint, without running pickled code.

Every way a checkpoint can be wrong (missing, a directory, empty, truncated, another kind of
file, a pickle that would run code, a checkpoint of another program) ends in one `LmlabError`
that says what was found and what to give instead."""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
    is_zip = _check_file(path)
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise to a user
            warnings.simplefilter("ignore")
            # mmap: tensors are read when used, so checking a big checkpoint costs little
            mmap = is_zip and torch.device(device).type == "cpu"
            checkpoint = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise LmlabError(_refusal(path, str(err), is_zip)) from err
    except Exception as err:  # the unpickler raises KeyError, OSError, RuntimeError, ...
        raise LmlabError(
            f"{path} is not a readable checkpoint (truncated or damaged: "
            f"{type(err).__name__}: {err}); {USE_INSTEAD}"
        ) from err
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if (
        not isinstance(hparams, dict)
        or "model_name" not in hparams
        or "tokenizer_state" not in hparams
        or "state_dict" not in checkpoint
    ):
        raise LmlabError(
            f"{path} is not an lmlab checkpoint (it has no model hyperparameters, tokenizer "
            f"or weights); {USE_INSTEAD}"
        )
    return checkpoint


def _check_file(path: Path) -> bool:
    """A clear error for a path that cannot hold a checkpoint, before torch.load sees it;
    True for a zip archive, False for a raw pickle (the legacy torch.save format)."""
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
    if head == ZIP_MAGIC:
        if not zipfile.is_zipfile(path):  # the archive's directory is written last
            raise LmlabError(
                f"{path} is truncated ({size} bytes, the end of the archive is missing: a copy "
                f"or a save that did not finish); {USE_INSTEAD}"
            )
        return True
    if not head.startswith(PICKLE_MAGIC):
        raise LmlabError(
            f"{path} is not a checkpoint (a checkpoint is a zip archive written by torch.save; "
            f"this file starts with {head!r}); {USE_INSTEAD}"
        )
    return False


def _refusal(path: Path, torch_message: str, is_zip: bool) -> str:
    if not is_zip:
        return (
            f"{path} was refused and not unpickled: it is a bare pickle, not a checkpoint "
            f"written by torch.save, and unpickling it could run code; {USE_INSTEAD}"
        )
    found = re.search(r"GLOBAL ([\w.]+)", torch_message)
    what = f"it calls {found.group(1)}, which is" if found else "it holds objects that are"
    return (
        f"{path} was refused and not loaded: {what} not tensors or plain data, so loading "
        f"it could run code. Load only checkpoints you or lmlab-train wrote; {USE_INSTEAD}"
    )


def load_for_sampling(path: str | Path, device: str = "cpu") -> tuple[nn.Module, Tokenizer]:
    """The model (in eval mode, on `device`) and tokenizer saved in a Lightning checkpoint."""
    checkpoint = read_checkpoint(path, device)
    hparams = checkpoint["hyper_parameters"]
    model = build_model(hparams["model_name"], **hparams["model_hparams"])
    prefix = "model."
    state = {
        k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)
    }
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # weights that do not fit the hyperparameters saved with them
        raise LmlabError(
            f"{path}: the weights do not match the model described in the checkpoint "
            f"({str(err).splitlines()[-1].strip()}); {USE_INSTEAD}"
        ) from err
    model.to(device).eval()
    return model, tokenizer_from_state(hparams["tokenizer_state"])


def check_resumable(path: str | Path, module: nn.Module | None = None) -> dict[str, Any] | None:
    """Check `ckpt_path` before `trainer.fit` resumes from it; return its hyperparameters.

    An LmlabError for a checkpoint that is missing, truncated, not a checkpoint, or would run
    code; given this run's LightningModule, also for weights that do not fit its model (the
    message names the model settings that differ). A checkpoint with another tokenizer is
    left to `lmlab.resume.check_same_data`, which says so. Lightning's own keywords (`last`,
    `best`, `hpc`) and URLs pass unchecked, returning None: Lightning resolves them."""
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
    if hparams["model_name"] != module.hparams["model_name"]:
        raise LmlabError(
            f"cannot resume from {path}: it holds a {hparams['model_name']} model and this run "
            f"builds a {module.hparams['model_name']}; set model={hparams['model_name']} with "
            "that run's settings, or drop ckpt_path to start a new run"
        )
    saved = {"name": hparams["model_name"], **hparams["model_hparams"]}
    now = {"name": module.hparams["model_name"], **module.hparams["model_hparams"]}
    differ = [
        f"model.{key}={now.get(key)} (the checkpoint has {saved.get(key)})"
        for key in sorted(set(saved) | set(now))
        if saved.get(key) != now.get(key)
    ]
    if not differ:  # same settings, other code: name the weights instead
        differ = [
            f"{key} {shapes.get(key)} (the checkpoint has {saved_shapes.get(key)})"
            for key in sorted(set(saved_shapes) | set(shapes))
            if saved_shapes.get(key) != shapes.get(key)
        ][:3]
    raise LmlabError(
        f"cannot resume from {path}: its weights do not fit this run's model: "
        f"{', '.join(differ)}; resume with the checkpoint's model settings (see its run's "
        ".hydra/config.yaml), or drop ckpt_path to start a new run"
    )
