"""lmlab's benchmark: the six figures of docs/benchmarks.md, side by side, in one run.

    python scripts/bench.py                      # everything, full size (about 10 minutes here)
    python scripts/bench.py --quick              # small sizes: checks that it all runs
    python scripts/bench.py --only train,generate --markdown docs/benchmarks.md

1. training tokens/s of the `shakespeare_gpt_cpu` GPT through lmlab-train's LightningModule and
   Trainer (its callbacks and TensorBoard logger; validation off) against a plain PyTorch loop
   on the same module, batches, optimizer, schedule and gradient clipping;
2. the training FLOP/s this is (nanoGPT's count: 6 x non-embedding parameters + 12 x layers x
   block x n_embd per token) against a 2048 x 2048 fp32 matrix product measured in this run;
3. batch sampling (one gather) against the tutorials' `torch.stack` of slices;
4. generation with and without the KV cache;
5. char tokenization against `[stoi[c] for c in text]`, BPE throughput, cache hit start-up;
6. peak memory while tokenizing and training on a 1 GB corpus.
3, 5 and 6 come from bench_data.py. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_module
from omegaconf import open_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import (  # noqa: E402  (a sibling script, not a package)
    bench_batch_sampling,
    bench_large_corpus,
    bench_tokenization,
    report,
)
from bench_generation import bench_generation  # noqa: E402

from lmlab.lit_module import lm_loss  # noqa: E402
from lmlab.train import build_run  # noqa: E402

EXPERIMENT = "shakespeare_gpt_cpu"


class StepTimer(L.Callback):
    """Wall time of the steps after the first `warmup` (allocator and caches settle)."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.start: float | None = None
        self.seconds = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.start is None:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds = time.perf_counter() - self.start


def compose_experiment(output_dir: Path, steps: int, overrides: list[str]):
    with initialize_config_module(config_module="lmlab.conf", version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                f"experiment={EXPERIMENT}",
                f"trainer.max_steps={steps}",
                "trainer.limit_val_batches=0",  # training speed only
                "trainer.enable_progress_bar=false",  # keeps the output readable
                "trainer.enable_model_summary=false",
                *overrides,
            ],
        )
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def lightning_tokens_per_sec(cfg, warmup: int) -> float:
    timer = StepTimer(warmup)
    run = build_run(cfg, extra_callbacks=(timer,))
    run.trainer.fit(run.module, datamodule=run.datamodule)
    tokens = (cfg.trainer.max_steps - warmup) * cfg.data.batch_size * cfg.data.block_size
    return tokens / timer.seconds


def plain_loop_tokens_per_sec(cfg, warmup: int) -> tuple[float, torch.nn.Module]:
    """The same module, batches, AdamW, schedule and clipping, in a hand-written loop."""
    run = build_run(cfg)
    datamodule, module = run.datamodule, run.module
    model = module.model.train()
    optimizer, scheduler = module.build_optimizer(cfg.trainer.max_steps)  # as the Trainer's
    clip = cfg.trainer.gradient_clip_val
    batches = iter(datamodule.train_dataloader())
    start = None
    for step in range(cfg.trainer.max_steps):
        if step == warmup:
            start = time.perf_counter()
        x, y = next(batches)
        loss = lm_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
    seconds = time.perf_counter() - start
    tokens = (cfg.trainer.max_steps - warmup) * cfg.data.batch_size * cfg.data.block_size
    return tokens / seconds, model


def matmul_flops(n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of an n x n fp32 matrix product (best of `repeats`)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best


def flops_per_token(model: torch.nn.Module, block_size: int) -> float:
    """nanoGPT's estimate_mfu count: 6N + 12 L T C, N without the position table."""
    cfg = model.config
    params = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    return 6 * params + 12 * cfg.n_layer * block_size * cfg.n_embd


def bench_training(steps: int = 300, warmup: int = 30, rounds: int = 6) -> dict[str, Any]:
    """Measure the plain loop and Lightning back to back `rounds` times, in alternating order,
    with the matrix product in between: this machine's speed drifts by 10-20% from minute to
    minute, so the overhead is the median of the paired ratios."""
    lightning, plain, matmuls = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            cfg = compose_experiment(Path(tmp) / f"run{i}", steps, [])
            if i % 2:
                lightning.append(lightning_tokens_per_sec(cfg, warmup))
            plain_tps, model = plain_loop_tokens_per_sec(cfg, warmup)
            plain.append(plain_tps)
            if not i % 2:
                lightning.append(lightning_tokens_per_sec(cfg, warmup))
            matmuls.append(matmul_flops())
    paired = [1 - lit / pl for lit, pl in zip(lightning, plain, strict=True)]
    matmul = statistics.median(matmuls)
    per_token = flops_per_token(model, cfg.data.block_size)
    median_lightning, median_plain = statistics.median(lightning), statistics.median(plain)
    return report(
        "training",
        {
            "config": f"experiment={EXPERIMENT} (batch {cfg.data.batch_size} x block "
            f"{cfg.data.block_size}), {steps} steps, timing after {warmup}, median of {rounds}",
            "threads": torch.get_num_threads(),
            "plain_loop_tokens_per_sec": round(median_plain),
            "lightning_tokens_per_sec": round(median_lightning),
            "all_plain": [round(t) for t in plain],
            "all_lightning": [round(t) for t in lightning],
            "lightning_overhead_pct": round(100 * statistics.median(paired), 2),
            "overhead_pct_each_round": [round(100 * r, 1) for r in paired],
            "overhead_of_medians_pct": round(100 * (1 - median_lightning / median_plain), 2),
            "flops_per_token": round(per_token),
            "training_gflops": round(median_lightning * per_token / 1e9, 1),
            "matmul_2048_fp32_gflops": round(matmul / 1e9, 1),
            "all_matmul_gflops": [round(m / 1e9, 1) for m in matmuls],
            "training_fraction_of_matmul": round(median_lightning * per_token / matmul, 3),
        },
    )


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}"
    )


SECTIONS = {
    "training": "1-2. Training: Lightning against a plain loop; FLOP/s against a matrix product",
    "batch_sampling": "3a. Batch sampling",
    "generation": "4. Generation with and without the KV cache",
    "tokenization": "5. Tokenization and the token cache",
    "large_corpus": "6. Peak memory on a 1 GB corpus",
}


def to_markdown(figures: dict[str, Any]) -> str:
    """The figures as they were printed, one table per section (nothing typed by hand)."""
    lines = [
        "# Benchmarks",
        "",
        f"Produced by `{figures['command']}` on {figures['date']}.",
        "",
        f"Machine: {figures['machine']}.",
        "",
    ]
    for key, title in SECTIONS.items():
        if key not in figures:
            continue
        lines += [f"## {title}", "", "| figure | value |", "| --- | --- |"]
        for name, value in figures[key].items():
            if isinstance(value, list):
                value = ", ".join(str(v) for v in value)
            lines.append(f"| {name} | {value} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, to check it runs")
    parser.add_argument("--only", default="train,sample,generate,tokenize,large")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--markdown", help="also write them as markdown (docs/benchmarks.md)")
    args = parser.parse_args()
    only = set(args.only.split(","))
    figures: dict[str, Any] = {
        "machine": machine(),
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(f"machine: {figures['machine']}", flush=True)
    if "train" in only:
        figures["training"] = (
            bench_training(steps=40, warmup=10, rounds=1) if args.quick else bench_training()
        )
    if "sample" in only:
        figures["batch_sampling"] = bench_batch_sampling(repeats=20 if args.quick else 200)
    if "generate" in only:
        figures["generation"] = bench_generation(new_tokens=100 if args.quick else 500)
    if "tokenize" in only:
        figures["tokenization"] = bench_tokenization(size_mb=5 if args.quick else 100)
    if "large" in only:
        figures["large_corpus"] = bench_large_corpus(size_gb=0.02 if args.quick else 1.0)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n", encoding="utf-8")
    if args.markdown:
        Path(args.markdown).write_text(to_markdown(figures) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
