"""Up-front checks of a composed `lmlab-train` config, before any data, model or file is made.

One table, `CHECKS`, says for each setting what is allowed; `check_config` refuses a config
that breaks it with an `LmlabError` that names the key, the value and what is allowed. Checks
that the code already makes cleanly (data.train_fraction, data.test_fraction, data.examples,
the sampling settings of callbacks.sample_text) are left to it.

torch and Lightning are imported inside the functions that need them: `lmlab.train` imports
this module, and must stay importable without them.
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
import re
from collections.abc import Callable
from typing import Any, NamedTuple

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    GrammarParseError,
    InterpolationResolutionError,
    MissingMandatoryValue,
)

from lmlab.errors import LmlabError


class Check(NamedTuple):
    """What one setting accepts: `accepts(value)`, described as `allowed`; `reasons` explain
    particular values that look plausible but are refused."""

    accepts: Callable[[Any], bool]
    allowed: str
    reasons: dict[Any, str] = {}  # value -> why it is refused, e.g. "trains nothing"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def number(*, above: float | None = None, at_least: float | None = None) -> Check:
    def accepts(v: Any) -> bool:
        return (
            _is_number(v) and (above is None or v > above) and (at_least is None or v >= at_least)
        )

    bound = f"> {above:g}" if above is not None else f">= {at_least:g}"
    return Check(accepts, f"a number {bound}")


def whole(
    at_least: int,
    *,
    null: bool = False,
    allowed: str | None = None,
    reasons: dict[Any, str] | None = None,
) -> Check:
    def accepts(v: Any) -> bool:
        return (null and v is None) or (_is_whole(v) and v >= at_least)

    allowed = allowed or f"a whole number >= {at_least}" + (" or null" if null else "")
    return Check(accepts, allowed, reasons or {})


def choice(*options: str, null: bool = False, reasons: dict[Any, str] | None = None) -> Check:
    def accepts(v: Any) -> bool:
        return (null and v is None) or (isinstance(v, str) and v in options)

    allowed = "one of " + ", ".join(options) + (", or null" if null else "")
    return Check(accepts, allowed, reasons or {})


def _betas(v: Any) -> bool:
    return (
        isinstance(v, (list, tuple))
        and len(v) == 2
        and all(_is_number(b) and 0 <= b < 1 for b in v)
    )


def _val_check_interval(v: Any) -> bool:
    return v is None or (_is_whole(v) and v >= 1) or (_is_number(v) and 0 < v <= 1)


# decoding UTF-8 with these handlers gives text that encodes back to UTF-8 (lmlab counts the
# bytes of every document): surrogateescape and surrogatepass leave lone surrogates, and the
# encode-only handlers cannot decode at all
_ENCODING_ERRORS_REASON = (
    "is not allowed: it decodes bad bytes to lone surrogates, which lmlab cannot encode back "
    "to UTF-8"
)
_ENCODE_ONLY = "is not allowed: it is an error handler for encoding only and cannot decode text"

# The table: every setting that is checked, by its dotted key; a key that is not in the
# composed config (a model without a scheduler, say) is not checked.
CHECKS: dict[str, Check] = {
    "model.optimizer.lr": number(above=0),
    "model.optimizer.weight_decay": number(at_least=0),
    "model.optimizer.betas": Check(_betas, "two numbers, each in [0, 1), e.g. [0.9, 0.99]"),
    "model.scheduler.warmup_steps": whole(0),
    "model.scheduler.min_lr": number(at_least=0),
    "data.block_size": whole(1),
    "data.batch_size": whole(1),
    "data.val_batch_size": whole(1, null=True),
    "data.stride": whole(1, null=True),
    "data.samples_per_epoch": whole(1),
    "data.num_workers": whole(0),
    "data.encoding_errors": choice(
        "strict",
        "replace",
        "ignore",
        "backslashreplace",
        reasons={
            "surrogateescape": _ENCODING_ERRORS_REASON,
            "surrogatepass": _ENCODING_ERRORS_REASON,
            "xmlcharrefreplace": _ENCODE_ONLY,
            "namereplace": _ENCODE_ONLY,
        },
    ),
    "data.normalize": choice("NFC", "NFD", "NFKC", "NFKD", null=True),
    # lmlab.data.corpus.QUOTINGS (importing it would import Lightning); a plain-text corpus
    # never reads it, so a misspelt value would pass unnoticed there
    "data.quoting": choice("auto", "csv", "none"),
    "trainer.max_steps": whole(
        -1,
        allowed="1 or more (or -1 for no limit, with max_epochs)",
        reasons={0: "trains nothing"},
    ),
    "trainer.max_epochs": whole(-1, null=True),
    "trainer.val_check_interval": Check(
        _val_check_interval,
        "a whole number of steps >= 1, a fraction of an epoch in (0, 1], or null",
    ),
    "trainer.log_every_n_steps": whole(1),
    "trainer.accumulate_grad_batches": whole(1),
    "trainer.gradient_clip_val": Check(
        lambda v: v is None or (_is_number(v) and v >= 0), "a number >= 0, or null"
    ),
}

_ABSENT = object()


def check_config(cfg: DictConfig) -> None:
    """Refuse `cfg` (an LmlabError) if a setting is not allowed; before anything is built."""
    _check_interpolations(cfg)
    _check_data_keys(cfg)
    for key, check in CHECKS.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT:
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        shown = f"{key}={_show(value)}"
        # by type too: false == 0 and 0.0 == 0, but only the integer 0 trains nothing
        why = next((r for v, r in check.reasons.items() if _same(v, value)), None)
        if why is not None or not check.accepts(value):
            raise LmlabError(f"{shown} {why or 'is not allowed'}; set {key} to {check.allowed}")
    _check_accelerator(cfg)


def _check_interpolations(cfg: DictConfig) -> None:
    """Resolve every value once, so that a broken `${...}` is reported with its key here,
    not as a traceback from wherever it is first used."""

    def walk(node: DictConfig | ListConfig, prefix: str) -> None:
        keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
        for k in keys:
            key = f"{prefix}.{k}" if isinstance(node, DictConfig) else f"{prefix}[{k}]"
            key = key.lstrip(".")
            if key == "hydra":
                continue
            try:
                value = node[k]
            except MissingMandatoryValue:
                raise LmlabError(f"{key} has no value (???); set it, e.g. {key}=VALUE") from None
            except (InterpolationResolutionError, GrammarParseError) as err:
                raw = OmegaConf.to_container(node, resolve=False)[k]  # the text as written
                raise LmlabError(_interpolation_message(key, raw, err)) from None
            if isinstance(value, (DictConfig, ListConfig)):
                walk(value, key)

    walk(cfg, "")


def _interpolation_message(key: str, raw: Any, err: Exception) -> str:
    missing = re.search(r"Interpolation key '([^']+)' not found", str(err))
    if missing:
        name = missing.group(1)
        if "." not in name and (name in os.environ or name.isupper()):
            shell = str(raw).replace(f"${{{name}}}", f"${name}")
            env = str(raw).replace(f"${{{name}}}", f"${{oc.env:{name}}}")
            return (
                f"{key}: ${{{name}}} is not a config key; to use the shell's variable write "
                f"{key}={shell} (the shell expands it) or {key}={env}"
            )
        return (
            f"{key}={raw}: ${{{name}}} is not a config key; correct the key it names, or give "
            f"{key} a plain value"
        )
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{key}={raw} cannot be resolved ({first_line}); correct it, or give {key} a plain value"


def _check_data_keys(cfg: DictConfig) -> None:
    """A key under `data` that TextDataModule does not take (`+data.blok_size=8`)."""
    data = cfg.get("data")
    if not isinstance(data, DictConfig) or data.get("_target_") != "lmlab.data.TextDataModule":
        return
    from lmlab.data import TextDataModule

    parameters = [p for p in inspect.signature(TextDataModule).parameters if p != "self"]
    for key in data:
        if key.startswith("_") or key in parameters:
            continue
        close = difflib.get_close_matches(key, parameters, n=1)
        hint = f"did you mean data.{close[0]}?" if close else "remove it"
        raise LmlabError(
            f"data.{key} is not a data setting; {hint} (settings: {', '.join(parameters)})"
        )


def _check_accelerator(cfg: DictConfig) -> None:
    accelerator = OmegaConf.select(cfg, "trainer.accelerator", default=None)
    if accelerator not in ("gpu", "cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise LmlabError(
            f"trainer.accelerator={accelerator} but this machine has no CUDA GPU; "
            "use trainer=cpu or trainer=default"
        )


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _show(value: Any) -> str:
    """A value as it would be written on the command line (a string quoted, to tell `8` from
    `'8'`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)
