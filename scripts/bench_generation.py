"""Generation speed with and without the KV cache (figures, not assertions).

    python scripts/bench_generation.py [--ckpt PATH] [--block-size 256] [--new-tokens 500]

Without --ckpt it uses a freshly initialised GPT of the shakespeare_gpt_cpu size (speed does
not depend on the weights).
"""

from __future__ import annotations

import argparse
import time

import torch

from lmlab.checkpoint import load_for_sampling
from lmlab.generation import generate
from lmlab.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", help="a checkpoint of a GPT run (default: a random GPT)")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    if args.ckpt:
        model, _ = load_for_sampling(args.ckpt)
    else:
        model = build_model(
            "gpt", vocab_size=65, block_size=args.block_size, n_layer=4, n_head=4, n_embd=128
        ).eval()
    prompt = torch.zeros((1, 1), dtype=torch.long)
    print(f"model block_size {model.block_size}, {args.new_tokens} new tokens, greedy, 1 sample")
    outputs = {}
    for use_cache in (True, False):
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            outputs[use_cache] = generate(
                model, prompt, args.new_tokens, temperature=0, use_cache=use_cache
            )
            best = min(best, time.perf_counter() - start)
        label = "with KV cache   " if use_cache else "without (recompute)"
        print(f"{label}: {best:.3f} s, {args.new_tokens / best:,.0f} tokens/s")
        outputs[f"t{use_cache}"] = best
    print(f"speed-up: {outputs['tFalse'] / outputs['tTrue']:.1f}x")
    print(f"identical tokens: {torch.equal(outputs[True], outputs[False])}")


if __name__ == "__main__":
    main()
