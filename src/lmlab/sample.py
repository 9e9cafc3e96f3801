"""`lmlab-sample ckpt_path=PATH [prompt=... max_new_tokens=... ...]`: text from a checkpoint."""

from __future__ import annotations

import os
import re
import sys

import hydra
import torch
from omegaconf import DictConfig

from lmlab.checkpoint import load_for_sampling
from lmlab.errors import LmlabError
from lmlab.generation import sample_text


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise LmlabError(f"device={name} is not a device; use auto, cpu or cuda") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmlabError(f"device={name} but this machine has no CUDA GPU; use device=cpu or auto")
    return name


def sample(cfg: DictConfig) -> list[str]:
    if cfg.ckpt_path is None:
        raise LmlabError("give the checkpoint to sample from: lmlab-sample ckpt_path=PATH")
    device = resolve_device(cfg.device)
    model, tokenizer = load_for_sampling(cfg.ckpt_path, device)
    return sample_text(
        model,
        tokenizer,
        prompt=cfg.prompt,
        max_new_tokens=cfg.max_new_tokens,
        num_samples=cfg.num_samples,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        seed=cfg.seed,
        device=device,
    )


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        texts = sample(cfg)
    except LmlabError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":  # asked for the traceback
            raise
        print(f"lmlab-sample: error: {err}", file=sys.stderr)
        sys.exit(1)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1} ---")
        print(text)


def quote_prompt(arg: str) -> str:
    """`prompt=...` taken literally: any script, commas, colons, quotes, `${`.

    Hydra's override grammar would read `prompt=Hello, world` as a sweep over two values and
    refuse `prompt=안녕` or `prompt=€` (unquoted values are ASCII), so the value is quoted
    for Hydra here. A value the user already quoted for Hydra (`'prompt="..."'`) is kept."""
    key, sep, value = arg.partition("=")
    if not sep or key.lstrip("+~") != "prompt":
        return arg
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return arg
    # Hydra: a backslash is literal unless it precedes a quote or ends the string
    value = re.sub(r"(\\*)('|\Z)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value)
    value = value.replace("${", "\\${")  # OmegaConf would resolve an interpolation
    return f"{key}='{value}'"


def main() -> None:
    sys.argv[1:] = [quote_prompt(arg) for arg in sys.argv[1:]]
    _hydra_main()


if __name__ == "__main__":
    main()
