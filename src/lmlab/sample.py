"""`lmlab-sample ckpt_path=PATH [prompt=... max_new_tokens=... ...]`: text from a checkpoint."""

from __future__ import annotations

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
        print(f"lmlab-sample: error: {err}", file=sys.stderr)
        sys.exit(1)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1} ---")
        print(text)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
