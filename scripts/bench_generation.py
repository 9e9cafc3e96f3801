"""Generation speed with and without the KV cache (figures, not assertions).

    python scripts/bench_generation.py [--ckpt PATH] [--block-size 256] [--new-tokens 500]

Without --ckpt it uses a freshly initialised GPT of the shakespeare_gpt_cpu size (speed does
not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from torch import nn

from lmlab.checkpoint import load_for_sampling
from lmlab.generation import generate
from lmlab.models import build_model


def bench_generation(
    block_size: int = 256, new_tokens: int = 500, repeats: int = 5, model: nn.Module | None = None
) -> dict[str, Any]:
    """Greedy generation of one sample from a 1-token prompt; the best time of each path."""
    if model is None:
        model = build_model(
            "gpt", vocab_size=65, block_size=block_size, n_layer=4, n_head=4, n_embd=128
        ).eval()
    prompt = torch.zeros((1, 1), dtype=torch.long)
    generate(model, prompt, 20, temperature=0)  # warm up: first calls allocate and pick kernels
    seconds: dict[bool, list[float]] = {True: [], False: []}
    outputs = {}
    for _ in range(repeats):  # alternate, so that both see the machine's drift alike
        for use_cache in (True, False):
            start = time.perf_counter()
            outputs[use_cache] = generate(
                model, prompt, new_tokens, temperature=0, use_cache=use_cache
            )
            seconds[use_cache].append(time.perf_counter() - start)
    ratios = sorted(b / a for a, b in zip(seconds[True], seconds[False], strict=True))
    best = {k: min(v) for k, v in seconds.items()}
    figures = {
        "config": f"GPT 4 layers x 128, block {model.block_size}, {new_tokens} new tokens, "
        f"greedy, 1 sample, {repeats} alternating pairs",
        "kv_cache_sec": round(best[True], 3),
        "recompute_sec": round(best[False], 3),
        "kv_cache_tokens_per_sec": round(new_tokens / best[True]),
        "recompute_tokens_per_sec": round(new_tokens / best[False]),
        "speedup_of_best_times": round(best[False] / best[True], 2),
        "speedup_median_pair": round(ratios[len(ratios) // 2], 2),
        "identical_tokens": torch.equal(outputs[True], outputs[False]),
    }
    print(f"generation: {json.dumps(figures, indent=1)}", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", help="a checkpoint of a GPT run (default: a random GPT)")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model = load_for_sampling(args.ckpt)[0] if args.ckpt else None
    bench_generation(args.block_size, args.new_tokens, args.repeats, model)


if __name__ == "__main__":
    main()
