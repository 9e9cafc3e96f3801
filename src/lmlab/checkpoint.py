"""Checkpoints: loading a trained model and its tokenizer without running pickled code, and
checking that a resume continues the run it came from (same model, tokens and tokenizer).

Every way a checkpoint can be wrong (missing, a directory, empty, truncated, another kind of
file, a pickle that would run code, a checkpoint of another program) ends in one `LmlabError`
that says what was found and what to give instead."""

from __future__ import annotations

import hashlib
import logging
import math
import pickle
import re
import typing
import warnings
import zipfile
from dataclasses import MISSING as _MISSING
from dataclasses import fields as _fields
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import torch
from lightning.fabric.plugins.io import TorchCheckpointIO
from torch import nn

from lmlab.atomic_write import atomic_write_bytes
from lmlab.data.tokenizers import EOT, UNK, Tokenizer, tokenizer_from_state
from lmlab.errors import LmlabError
from lmlab.models import MODELS, build_model

log = logging.getLogger("lmlab")

USE_INSTEAD = "give ckpt_path=<run dir>/checkpoints/last.ckpt, a file written by lmlab-train"
# ckpt_path values that Lightning resolves itself (the trainer's own last/best checkpoint)
LIGHTNING_KEYWORDS = ("last", "best", "hpc")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive
PICKLE_MAGIC = b"\x80"  # a raw pickle (protocol 2+): the legacy torch.save format, or no checkpoint
# bounds on a checkpoint's hyperparameters: past them, building the model would try to allocate
# more memory than any machine has (a crafted or damaged file, not a model this lab trains).
# Parameters: 6.9e10, 275 GB of fp32 weights; a sharded GPT (trainer=fsdp) has billions.
MAX_VOCAB, MAX_SIZE, MAX_PARAMETERS = 10_000_000, 2**31 - 1, 2**36


def local_path(path: str | Path) -> str | Path:
    """A `file://` URL (or `file:/...`, as Path() leaves it) as the local path it names."""
    url = urlparse(str(path)) if str(path).startswith("file:") else None
    if url is None or url.netloc not in ("", "localhost"):
        return path
    return unquote(url.path)


def read_checkpoint(path: str | Path, device: str = "cpu") -> dict[str, Any]:
    """The contents of an lmlab checkpoint, loaded with `weights_only=True` (tensors and plain
    data only: a checkpoint with code in it is refused before any of it runs)."""
    path = Path(local_path(path)).expanduser()
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
    if problem := _unusable(checkpoint):
        raise LmlabError(f"{path} is not a usable lmlab checkpoint: {problem}; {USE_INSTEAD}")
    return checkpoint


def _unusable(checkpoint: dict[str, Any]) -> str | None:
    """What makes a loaded checkpoint's contents unfit to build a model and tokenizer from (the
    file is untrusted: a wrong type or a huge size must not reach the model's constructor)."""
    weights, hparams = checkpoint["state_dict"], checkpoint["hyper_parameters"]
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        return "state_dict is not a mapping of names to tensors"
    name, values = hparams["model_name"], hparams.get("model_hparams")
    if not isinstance(name, str) or name not in MODELS:
        return f"model_name is {name!r}, not one of lmlab's models {sorted(MODELS)}"
    if not isinstance(values, dict):
        return f"model_hparams is {type(values).__name__}, not a mapping of settings"
    config = MODELS[name][0]
    types = typing.get_type_hints(config)
    if unknown := sorted(map(str, set(values) - set(types))):
        return f"model_hparams has {unknown}, which model {name!r} does not take"
    required = {f.name for f in _fields(config) if f.default is f.default_factory is _MISSING}
    if missing := sorted(required - set(values)):
        return f"model_hparams lacks {missing}, which model {name!r} needs"
    for key, value in values.items():
        if problem := _bad_value(value, types[key]):
            return f"model_hparams.{key} is {value!r}, {problem}"
    if values["vocab_size"] > MAX_VOCAB:
        return f"model_hparams.vocab_size is {values['vocab_size']}, over {MAX_VOCAB:,} tokens"
    if (count := _parameter_estimate(name, values)) > MAX_PARAMETERS:
        return f"its model_hparams describe about {count:.2g} parameters, over {MAX_PARAMETERS:.2g}"
    return _bad_tokenizer(hparams["tokenizer_state"])


def _bad_value(value: Any, annotation: Any) -> str | None:
    allowed = set(typing.get_args(annotation)) or {annotation}
    if value is None:
        return None if type(None) in allowed else "not a value"
    if bool in allowed:
        return None if isinstance(value, bool) else "not true or false"
    if int in allowed:
        if isinstance(value, bool) or not isinstance(value, int):
            return "not a whole number"
        return None if 0 <= value <= MAX_SIZE else f"not between 0 and {MAX_SIZE}"
    if float in allowed:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        return None if number and math.isfinite(value) else "not a finite number"
    return "not a setting lmlab can read"


def _parameter_estimate(name: str, v: dict[str, Any]) -> float:
    """Roughly how many numbers the model's weights hold (the big matrices only)."""
    vocab, embd = v["vocab_size"], v.get("n_embd", 0)
    if name == "gpt":
        embd = v.get("n_embd", 128)
        return (vocab + v["block_size"]) * embd + 12.0 * v.get("n_layer", 4) * embd**2
    if name == "mlp":
        embd, hidden = v.get("n_embd", 10), v.get("n_hidden", 200)
        return vocab * embd + v.get("context", 3) * embd * hidden + hidden * vocab
    if name == "bow":
        embd, hidden = v.get("n_embd", 64), v.get("n_hidden", 256)
        return (vocab + v["block_size"]) * embd + 2 * embd * hidden + hidden * vocab
    if name == "bigram" and vocab > (v.get("max_full_vocab") or 8192):
        return 2.0 * vocab * (v.get("rank") or 256)
    return float(vocab) * vocab


def _bad_tokenizer(state: Any) -> str | None:
    if not isinstance(state, dict):
        return f"tokenizer_state is {type(state).__name__}, not a mapping"
    kind = state.get("kind")
    if kind == "char":
        chars = state.get("chars")
        if not isinstance(chars, list) or not chars or len(chars) > MAX_VOCAB:
            return "tokenizer_state.chars is not a list of the tokenizer's characters"
        if not all(isinstance(c, str) and len(c) == 1 for c in chars):
            return "tokenizer_state.chars holds something other than single characters"
        return None
    if kind == "tiktoken":
        ranks, values = state.get("ranks", []), state.get("rank_values") or []
        if not isinstance(state.get("name"), str):
            return "tokenizer_state.name is not the name of a tiktoken encoding"
        if not (isinstance(ranks, list) and all(isinstance(r, str) for r in ranks)):
            return "tokenizer_state.ranks is not a list of base64 tokens"
        if not isinstance(values, list) or not all(type(r) is int for r in values):
            return "tokenizer_state.rank_values is not a list of whole numbers"
        return None
    if kind == "words":
        words = state.get("words")
        if not isinstance(words, list) or not 2 <= len(words) <= MAX_VOCAB:
            return "tokenizer_state.words is not a list of the tokenizer's words"
        if not all(isinstance(w, str) and w for w in words) or len(set(words)) < len(words):
            return "tokenizer_state.words holds something other than distinct words"
        if words[-2:] != [EOT, UNK]:
            return f"tokenizer_state.words does not end with {EOT} and {UNK}"
        return None
    return f"tokenizer_state.kind is {kind!r}, not 'char', 'words' or 'tiktoken'"


def load_for_sampling(path: str | Path, device: str = "cpu") -> tuple[nn.Module, Tokenizer]:
    """The model (in eval mode, on `device`) and tokenizer saved in a Lightning checkpoint."""
    checkpoint = read_checkpoint(path, device)
    hparams = checkpoint["hyper_parameters"]
    try:
        model = build_model(hparams["model_name"], **hparams["model_hparams"])
    except LmlabError as err:  # e.g. n_head = 0: the config's own check, about this file
        raise LmlabError(f"{path} is not a usable lmlab checkpoint: {err}; {USE_INSTEAD}") from err
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


def resolve_auto(ckpt_path: str | None, output_dir: str | Path) -> str | None:
    """`ckpt_path=auto`: the run directory's own `checkpoints/last.ckpt` when there is one (a
    restarted or requeued job continues where it stopped), else None (a fresh start). Any
    other value is returned as it is."""
    if ckpt_path != "auto":
        return ckpt_path
    last = Path(output_dir) / "checkpoints" / "last.ckpt"
    if last.is_file():
        log.info("ckpt_path=auto: resuming from %s", last)
        return str(last)
    log.info("ckpt_path=auto: no %s yet, starting fresh", last)
    return None


def check_resumable(
    path: str | Path, module: nn.Module | None = None, max_steps: int = -1
) -> dict[str, Any] | None:
    """Check `ckpt_path` before `trainer.fit` resumes from it; return its hyperparameters, or
    None for what Lightning resolves itself (`last`, `best`, `hpc`, URLs). Given this run's
    LightningModule, weights that do not fit its model are an LmlabError naming the settings
    that differ (another tokenizer is left to `check_same_data`); so is a checkpoint already at
    or past `max_steps`."""
    path = local_path(path)  # a file:// URL goes through the same checks as its path
    if str(path) in LIGHTNING_KEYWORDS or "://" in str(path):
        return None
    checkpoint = read_checkpoint(path)
    hparams = dict(checkpoint["hyper_parameters"])
    step = checkpoint.get("global_step")
    if isinstance(step, int) and 0 <= max_steps <= step:  # Lightning would stop at once, silently
        raise LmlabError(
            f"cannot resume from {path}: it is at step {step} and trainer.max_steps={max_steps}, "
            f"so there is nothing to train; set trainer.max_steps above {step}"
        )
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
    if kind == "words":
        return f"words, {len(state.get('words', []))} tokens"
    return f"{kind} {state.get('name') or state.get('encoding') or ''}".strip()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, with the temporary file in the checkpoint's own directory
    (Lightning's goes through the system temp directory, and a move across file systems is a
    copy that a kill can leave half done)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        size = _tensor_bytes(checkpoint)  # a full disk's message says how much was needed
        atomic_write_bytes(path, lambda f: torch.save(checkpoint, f), size_hint=size)


def _tensor_bytes(data: Any) -> int:
    if isinstance(data, torch.Tensor):
        return data.nelement() * data.element_size()
    if isinstance(data, dict):
        return sum(_tensor_bytes(v) for v in data.values())
    if isinstance(data, list | tuple):
        return sum(_tensor_bytes(v) for v in data)
    return 0
