"""Loading a trained model and its tokenizer from a checkpoint, without running pickled code."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from lmlab.data.tokenizers import Tokenizer, tokenizer_from_state
from lmlab.errors import LmlabError
from lmlab.models import build_model


def load_for_sampling(path: str | Path, device: str = "cpu") -> tuple[nn.Module, Tokenizer]:
    """The model (in eval mode, on `device`) and tokenizer saved in a Lightning checkpoint."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LmlabError(
            f"checkpoint not found: {path}; give ckpt_path=<run dir>/checkpoints/last.ckpt"
        )
    try:
        # weights_only: tensors and plain data only; a checkpoint with code in it is refused.
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        raise LmlabError(
            f"{path} was refused: it holds objects other than tensors and plain data, so "
            "loading it could run code. Only load checkpoints written by lmlab-train"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise LmlabError(
            f"{path} is not a readable checkpoint (truncated or another kind of file: {err}); "
            "use a checkpoint written by lmlab-train, e.g. checkpoints/last.ckpt"
        ) from err
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not hparams or "model_name" not in hparams or "tokenizer_state" not in hparams:
        raise LmlabError(
            f"{path} is not an lmlab checkpoint (no model hyperparameters or tokenizer in it)"
        )
    model = build_model(hparams["model_name"], **hparams["model_hparams"])
    prefix = "model."
    state = {
        k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)
    }
    model.load_state_dict(state)
    model.to(device).eval()
    return model, tokenizer_from_state(hparams["tokenizer_state"])
