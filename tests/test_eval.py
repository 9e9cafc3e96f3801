"""The held-out test part (`test=true`) and `lmlab-eval`, which scores a checkpoint again."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from lmlab.errors import LmlabError
from lmlab.evaluate import evaluate, main, parse_args
from lmlab.train import train


@pytest.fixture
def tested_run(tiny_train_cfg):
    cfg = tiny_train_cfg("data.train_fraction=0.8", "data.test_fraction=0.1", "test=true")
    summary = train(cfg)
    return Path(cfg.paths.output_dir), summary


def test_test_true_scores_the_test_part_with_the_selected_checkpoint(tested_run):
    run, summary = tested_run
    assert json.loads((run / "metrics.json").read_text()) == summary
    test = summary["data"]["test"]
    bits_per_token = summary["test/loss"] / math.log(2)
    # independently: bits per token x tokens / characters (bytes) of the test text
    assert summary["test/bpc"] == pytest.approx(
        bits_per_token * test["tokens"] / test["characters"]
    )
    assert summary["test/bpb"] == pytest.approx(bits_per_token * test["tokens"] / test["bytes"])
    assert summary["test/ppl"] == pytest.approx(math.exp(summary["test/loss"]))
    # the checkpoint validation selected, never one chosen by the test figure
    assert Path(summary["test_checkpoint"]).name.startswith("best-step")
    assert summary["val/loss"] == summary["best"]["val/loss"]


def test_lmlab_eval_gives_the_test_figure_of_training(tested_run, capsys):
    run, summary = tested_run
    ckpt = summary["test_checkpoint"]
    result = evaluate({"ckpt_path": ckpt, "split": "test"})
    assert result["loss"] == pytest.approx(summary["test/loss"], abs=1e-6)
    assert result["bpb"] == pytest.approx(summary["test/bpb"], abs=1e-6)
    assert {k: result[k] for k in ("documents", "characters", "bytes", "tokens")} == (
        summary["data"]["test"]
    )
    assert evaluate({"ckpt_path": ckpt})["text"] == "test"  # the default when a run has one
    assert main([f"ckpt_path={ckpt}", "split=val"]) == 0
    written = json.loads((run / "eval_val.json").read_text())
    assert written["loss"] == pytest.approx(summary["best"]["val/loss"], abs=1e-6)
    assert "bpc" in capsys.readouterr().out


def test_lmlab_eval_on_another_text_leaves_out_unknown_characters(tested_run, tmp_path, caplog):
    _, summary = tested_run
    other = tmp_path / "other.txt"
    other.write_text("First Citizen:\nSpeak, speak.\n" * 20 + "{{}}\n")  # braces: unknown
    with caplog.at_level(logging.WARNING, logger="lmlab"):
        result = evaluate({"ckpt_path": summary["test_checkpoint"], "data.path": str(other)})
    assert "4 of" in caplog.text and "'{' x2" in caplog.text
    scored = "First Citizen:\nSpeak, speak.\n" * 20 + "\n"  # the braces' line, less the braces
    assert result["characters"] == len(scored)
    assert math.isfinite(result["loss"]) and result["text"] == "other"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give the checkpoint"),
        (["ckpt_path=x", "split=train"], "split must be val or test"),
        (["ckpt_path=x", "spilt=val"], "unknown argument 'spilt=val'"),
        (["ckpt_path=x", "split=val", "data.path=y"], "not both"),
    ],
)
def test_lmlab_eval_refuses_bad_arguments(argv, message):
    with pytest.raises(LmlabError, match=message):
        parse_args(argv)


def test_test_true_without_a_test_part_is_refused(tiny_train_cfg):
    with pytest.raises(LmlabError, match="test=true needs a test part"):
        train(tiny_train_cfg("test=true"))
