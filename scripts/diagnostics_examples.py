"""The healthy and unhealthy runs of docs/diagnostics.md, with `callbacks=diagnostics`:

    python scripts/diagnostics_examples.py runs/diagnostics [--mlp-steps 1200 --gpt-steps 300]

- `mlp_healthy`: makemore's MLP on names (experiment=names_mlp) with its initialisation (tanh
  gain 5/3 over sqrt(fan_in)), and `mlp_saturated`: the same with the hidden layer's weights
  scaled up GAIN times (default 3.3: about makemore part 3's unscaled randn), so that most
  tanh units start saturated. lmlab's MLP has no init-scale setting: the weights are scaled
  here, after the model is built and before training;
- `gpt_healthy`: the small CPU GPT (experiment=shakespeare_gpt_cpu), and `gpt_lr_too_high`:
  the same at a learning rate LR_FACTOR times higher, without warmup.

Each run is a directory under OUT with its TensorBoard events; screenshot them with
scripts/tensorboard_screenshots.py. A tool for the docs, not part of lmlab.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from omegaconf import open_dict

from lmlab.train import _validate_at_start, build_run

COMMON = ["callbacks=diagnostics", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]


def run(out: Path, name: str, overrides: list[str], gain: float = 1.0) -> None:
    with initialize_config_module(config_module="lmlab.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=COMMON + overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out / name)
    built = build_run(cfg)
    if gain != 1.0:
        with torch.no_grad():
            built.module.model.hidden.weight.mul_(gain)
    _validate_at_start(built.trainer, built.module, built.datamodule)  # the step-0 pictures
    built.trainer.fit(built.module, datamodule=built.datamodule)
    print(out / name)


def length(steps: int) -> list[str]:
    """A run of `steps` steps, validated (and pictured) six times, and at step 0."""
    return [f"trainer.max_steps={steps}", f"trainer.val_check_interval={max(1, steps // 6)}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--mlp-steps", type=int, default=1200, help="of each MLP run")
    parser.add_argument("--gpt-steps", type=int, default=300, help="of each GPT run")
    parser.add_argument("--gain", type=float, default=3.3, help="of the saturated MLP")
    parser.add_argument("--lr-factor", type=float, default=10.0, help="of the unstable GPT")
    parser.add_argument("--only", nargs="*", help="run only these (names as above)")
    args = parser.parse_args()
    mlp = ["experiment=names_mlp", *length(args.mlp_steps)]
    gpt = [
        "experiment=shakespeare_gpt_cpu",
        *length(args.gpt_steps),
        "trainer.limit_val_batches=20",
    ]
    runs = {
        "mlp_healthy": (mlp, 1.0),
        "mlp_saturated": (mlp, args.gain),
        "gpt_healthy": (gpt, 1.0),
        "gpt_lr_too_high": (
            [*gpt, f"model.optimizer.lr={2e-3 * args.lr_factor}", "model.scheduler.warmup_steps=0"],
            1.0,
        ),
    }
    for name, (overrides, gain) in runs.items():
        if not args.only or name in args.only:
            run(args.out, name, overrides, gain)
    return 0


if __name__ == "__main__":
    sys.exit(main())
