"""lmlab-sample: text from a checkpoint alone, and refusal of bad checkpoints."""

from __future__ import annotations

import pickle
from pathlib import Path

from helpers import RunsCode, run_lmlab

from lmlab.cli import parse_key_values
from lmlab.sample import KEYS, sample


def sample_cfg(*arguments: str) -> dict[str, str]:
    """What `lmlab-sample ARGUMENTS` passes to `sample()`, parsed as its command line does."""
    return parse_key_values("lmlab-sample", "", KEYS, arguments)


def test_samples_start_with_the_prompt_and_have_the_requested_length(gpt_checkpoint: Path):
    cfg = sample_cfg(
        f"ckpt_path={gpt_checkpoint}", "prompt=First", "max_new_tokens=25", "num_samples=3"
    )
    texts = sample(cfg)
    assert len(texts) == 3
    assert all(t.startswith("First") and len(t) == len("First") + 25 for t in texts)


def test_same_seed_same_text_and_top_k_1_is_greedy(gpt_checkpoint: Path):
    base = [f"ckpt_path={gpt_checkpoint}", "prompt=All", "max_new_tokens=30"]
    assert sample(sample_cfg(*base, "seed=1")) == sample(sample_cfg(*base, "seed=1"))
    greedy = sample(sample_cfg(*base, "temperature=0"))
    for seed in (1, 2):
        assert sample(sample_cfg(*base, "top_k=1", f"seed={seed}")) == greedy


def test_cli_prints_samples(gpt_checkpoint: Path):
    result = run_lmlab("sample", f"ckpt_path={gpt_checkpoint}", "prompt=Speak", "max_new_tokens=10")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Speak")


def test_prompt_outside_the_vocabulary_is_named(gpt_checkpoint: Path):
    result = run_lmlab("sample", f"ckpt_path={gpt_checkpoint}", "prompt=Zq")
    assert result.returncode == 1
    assert "2 character(s) that are not in the checkpoint's vocabulary" in result.stderr
    assert ": 'Z', 'q'; leave them out or replace them" in result.stderr


def test_missing_checkpoint_is_named(tmp_path: Path):
    result = run_lmlab("sample", f"ckpt_path={tmp_path}/nope.ckpt")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"lmlab-sample: error: checkpoint not found: {tmp_path}/nope.ckpt; "
        "give ckpt_path=<run dir>/checkpoints/last.ckpt, a file written by lmlab-train"
    )


def test_truncated_checkpoint_is_refused(gpt_checkpoint: Path, tmp_path: Path):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(gpt_checkpoint.read_bytes()[:1000])
    result = run_lmlab("sample", f"ckpt_path={truncated}")
    assert result.returncode == 1
    assert f"{truncated} is truncated (1000 bytes, the end of the archive is missing" in (
        result.stderr
    )


def test_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path: Path):
    marker = tmp_path / "pickle-ran-code"
    crafted = tmp_path / "evil.ckpt"
    with open(crafted, "wb") as f:
        pickle.dump({"state_dict": {}, "hyper_parameters": RunsCode(marker)}, f)
    result = run_lmlab("sample", f"ckpt_path={crafted}")
    assert result.returncode == 1
    assert "was refused" in result.stderr or "not a readable checkpoint" in result.stderr
    assert not marker.exists()
    # the check has teeth: a plain unpickling of the same file does run the code
    with open(crafted, "rb") as f:
        pickle.load(f)
    assert marker.exists()
