"""Bad input gets one clear message and exit status 1, no traceback, nothing run or written:
block_size beyond the model, n_embd not divisible by n_head, a prompt outside the vocabulary,
checkpoints that are missing, truncated, not checkpoints or crafted to run code, and the
plain data a checkpoint must hold so that it loads with `weights_only=True`."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import TINY_GPT, TINY_TEXT, RunsCode, run_lmlab

from lmlab import checkpoint as checkpoint_module
from lmlab.checkpoint import check_resumable, load_for_sampling, read_checkpoint
from lmlab.cli import parse_key_values
from lmlab.errors import LmlabError
from lmlab.lit_module import LitLanguageModel
from lmlab.models import build_model, check_block_size


@pytest.fixture(scope="module")
def ckpt(gpt_checkpoint: Path) -> Path:
    return gpt_checkpoint


def train_cli(corpus: Path, tmp_path: Path, *overrides: str):
    """`lmlab-train` on the tiny corpus for two steps, in a subprocess."""
    return run_lmlab(
        "train",
        f"data.path={corpus}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "trainer.accelerator=cpu",
        "trainer.max_steps=2",
        *overrides,
    )


def assert_one_message(result, command: str, *parts: str) -> str:
    """Exit 1, no traceback, and a last stderr line `<command>: error: ...` holding `parts`."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{command}: error: "), result.stderr
    for part in parts:
        assert part in last
    return last


# (a) block_size larger than the model can take


def test_check_block_size_names_both_settings_and_what_to_set() -> None:
    gpt = build_model("gpt", vocab_size=5, block_size=32, n_layer=1, n_head=2, n_embd=8)
    with pytest.raises(LmlabError) as err:
        check_block_size(gpt, 64)
    assert str(err.value).startswith(
        "data.block_size (64) is longer than model.block_size (32), the length of the GPT's "
        "position table; set data.block_size=32 or less, or model.block_size=64 or more"
    )
    check_block_size(gpt, 32)
    for name, hp in (("bigram", {}), ("mlp", {"context": 3})):  # any length: nothing to check
        check_block_size(build_model(name, vocab_size=5, block_size=8, **hp), 64)


def test_gpt_forward_says_which_settings_to_change() -> None:
    gpt = build_model("gpt", vocab_size=5, block_size=4, n_layer=1, n_head=2, n_embd=8)
    with pytest.raises(LmlabError, match=r"set data.block_size=4 or less, or model.block_size=6"):
        gpt(torch.zeros(1, 6, dtype=torch.long))


def test_train_with_a_position_table_shorter_than_the_windows(tiny_corpus: Path, tmp_path):
    result = train_cli(
        tiny_corpus,
        tmp_path,
        *TINY_GPT,
        "model.block_size=32",
        "data.block_size=64",
    )
    assert_one_message(
        result, "lmlab-train", "is longer than model.block_size (32)", "data.block_size=32"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_sampling_past_block_size_is_not_an_error(ckpt: Path) -> None:
    """lmlab-sample has no block_size to get wrong: a long prompt and a long continuation
    slide through the window (see lmlab.generation)."""
    from lmlab.generation import SamplingSettings, sample_text

    model, tokenizer = load_for_sampling(ckpt)
    prompt = TINY_TEXT[:40]  # longer than the 16-token window
    (text,) = sample_text(model, tokenizer, SamplingSettings(prompt, max_new_tokens=40, seed=0))
    assert text.startswith(prompt) and len(text) == 80


# (b) n_embd not divisible by n_head


def test_n_embd_not_divisible_by_n_head(tiny_corpus: Path, tmp_path: Path) -> None:
    result = run_lmlab(
        "train",
        f"data.path={tiny_corpus}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "model=gpt",
        "model.n_embd=100",
        "model.n_head=3",
    )
    last = assert_one_message(
        result, "lmlab-train", "model.n_embd (100) must be divisible by model.n_head (3)"
    )
    assert last.endswith("; set model.n_head=2 or change model.n_embd")


# (c) a prompt with characters outside the vocabulary


def test_prompt_outside_the_vocabulary(ckpt: Path) -> None:
    result = run_lmlab("sample", f"ckpt_path={ckpt}", "prompt=€λ", "max_new_tokens=5")
    assert_one_message(
        result,
        "lmlab-sample",
        "the prompt has 2 character(s) that are not in the checkpoint's vocabulary",
        "'λ', '€'",
        "leave them out or replace them",
    )
    assert result.stdout == ""


@pytest.mark.parametrize(
    "prompt",
    ['"Hello," she said, "goodbye"', "'tis true'", '"${oc.env:HOME}"', "a=b, c\\d", "안녕, €"],
)
def test_prompt_is_taken_literally(prompt: str) -> None:
    from lmlab.sample import KEYS

    values = parse_key_values("lmlab-sample", "", KEYS, ["ckpt_path=x", f"prompt={prompt}"])
    assert values == {"ckpt_path": "x", "prompt": prompt}


def test_sampling_settings_and_device_out_of_range(ckpt: Path) -> None:
    from lmlab.sample import resolve_device

    result = run_lmlab("sample", f"ckpt_path={ckpt}", "temperature=-1", "top_p=2")
    assert_one_message(
        result, "lmlab-sample", "temperature must be 0 (greedy) or more, got -1.0; top_p must"
    )
    with pytest.raises(LmlabError, match="device=foo is not a device; use auto, cpu or cuda"):
        resolve_device("foo")
    if not torch.cuda.is_available():
        with pytest.raises(LmlabError, match="no CUDA GPU; use device=cpu or auto"):
            resolve_device("cuda")


# (d) checkpoints that are missing, truncated, not checkpoints, or crafted to run code


def bad_checkpoints(real: Path, root: Path, marker: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, the start of what the message says about it). Loading the two crafted
    pickles as pickles would create `marker`."""
    truncated = root / "truncated.ckpt"
    truncated.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    text = root / "notes.ckpt"
    text.write_text("these are my notes, not a checkpoint\n")
    empty = root / "empty.ckpt"
    empty.write_bytes(b"")
    bare_pickle = root / "bare.ckpt"
    with open(bare_pickle, "wb") as f:
        pickle.dump({"state_dict": {}, "hyper_parameters": RunsCode(marker)}, f)
    crafted = root / "crafted.ckpt"  # a zip, as Lightning writes
    torch.save({"state_dict": {}, "hyper_parameters": RunsCode(marker)}, crafted)
    foreign = root / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    return {
        "missing": (root / "nope.ckpt", "checkpoint not found: "),
        "directory": (real.parents[1], f"ckpt_path {real.parents[1]} is a directory; give "),
        "truncated": (truncated, f"{truncated} is truncated ("),
        "text": (text, f"{text} is not a checkpoint (a checkpoint is a zip archive"),
        "empty": (empty, f"{empty} is empty (0 bytes)"),
        "bare pickle": (bare_pickle, f"{bare_pickle} was refused and not unpickled"),
        "crafted": (crafted, f"{crafted} was refused and not loaded: it calls posix.system"),
        "foreign": (foreign, f"{foreign} is not an lmlab checkpoint"),
    }


def test_every_bad_checkpoint_gets_its_own_message(ckpt: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pickle-ran-code"
    checkpoints = bad_checkpoints(ckpt, tmp_path, marker)
    for name, (path, message) in checkpoints.items():
        for check in (load_for_sampling, check_resumable):
            with pytest.raises(LmlabError) as err:
                check(path)
            assert str(err.value).startswith(message), name
            assert "ckpt_path=" in str(err.value), name  # and what to give instead
    assert not marker.exists()
    # the check has teeth: loading the crafted files as pickles does run their code
    with open(checkpoints["bare pickle"][0], "rb") as f:
        pickle.load(f)
    assert marker.exists()
    marker.unlink()
    torch.load(checkpoints["crafted"][0], weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", ["text", "crafted"])
def test_lmlab_sample_refuses_a_bad_checkpoint(ckpt: Path, tmp_path: Path, name: str) -> None:
    marker = tmp_path / "pickle-ran-code"
    path, message = bad_checkpoints(ckpt, tmp_path, marker)[name]
    result = run_lmlab("sample", f"ckpt_path={path}")
    assert_one_message(result, "lmlab-sample", message)
    assert not marker.exists()  # refused without running the code


def test_hydra_full_error_shows_the_traceback(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    result = run_lmlab("sample", f"ckpt_path={tmp_path}/nope.ckpt")
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("lmlab.errors.LmlabError: ")


def test_check_resumable_passes_a_good_checkpoint_and_lightning_keywords(ckpt: Path) -> None:
    saved = check_resumable(ckpt)
    assert saved["model_name"] == "gpt"
    assert check_resumable("last") is None and check_resumable("best") is None


def test_check_resumable_refuses_weights_of_another_model(ckpt: Path) -> None:
    saved = read_checkpoint(ckpt)["hyper_parameters"]
    assert check_resumable(ckpt, LitLanguageModel(**saved)) is not None
    wider = {**saved, "model_hparams": {**saved["model_hparams"], "n_embd": 32}}
    with pytest.raises(LmlabError, match=r"model.n_embd=32 \(the checkpoint has 16\)"):
        check_resumable(ckpt, LitLanguageModel(**wider))
    bigram = {**saved, "model_name": "bigram", "model_hparams": {"vocab_size": 5}}
    with pytest.raises(LmlabError, match="it holds a gpt model and this run builds a bigram"):
        check_resumable(ckpt, LitLanguageModel(**bigram))


@pytest.mark.parametrize("name", ["missing", "truncated"])
def test_lmlab_train_refuses_a_bad_ckpt_path(
    ckpt: Path, tmp_path: Path, tiny_corpus: Path, name: str
) -> None:
    path, message = bad_checkpoints(ckpt, tmp_path, tmp_path / "pickle-ran-code")[name]
    result = train_cli(tiny_corpus, tmp_path, f"ckpt_path={path}")
    assert_one_message(result, "lmlab-train", message)


# (e) the tokenizer state, and everything else in hyper_parameters, is plain data

PLAIN = (str, int, float, bool, type(None))


def plain_data_problems(value: Any, where: str = "hyper_parameters") -> list[str]:
    """Paths to every value that is not a str/number/bool/None, list, or dict with str keys."""
    if isinstance(value, PLAIN):
        return []
    if type(value) in (list, tuple):
        return [p for i, v in enumerate(value) for p in plain_data_problems(v, f"{where}[{i}]")]
    if type(value) is dict:
        bad_keys = [f"{where} key {k!r}" for k in value if not isinstance(k, str)]
        return bad_keys + [
            p for k, v in value.items() for p in plain_data_problems(v, f"{where}[{k!r}]")
        ]
    return [f"{where}: {type(value).__name__}"]


def test_checkpoint_hyperparameters_are_plain_data(ckpt: Path) -> None:
    hparams = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert plain_data_problems(dict(hparams)) == []
    assert hparams["tokenizer_state"]["kind"] == "char"
    assert all(isinstance(c, str) for c in hparams["tokenizer_state"]["chars"])


def test_plain_data_check_finds_objects() -> None:
    problems = plain_data_problems({"a": [1, {"b": Path("x")}], 2: "c"})
    assert problems == ["hyper_parameters key 2", "hyper_parameters['a'][1]['b']: PosixPath"]


def test_lmlab_sample_loads_with_weights_only(ckpt: Path, monkeypatch) -> None:
    calls: list[dict[str, Any]] = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "load", spy)
    model, tokenizer = load_for_sampling(ckpt)
    assert calls and all(kw.get("weights_only") is True for kw in calls)
    assert tokenizer.decode(tokenizer.encode("First")) == "First"
