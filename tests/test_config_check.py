"""lmlab.config_check: a composed lmlab-train config is checked before anything is built, and a
bad setting is refused with one line that names the key, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import lmlab.conf
import pytest
from helpers import TINY_GPT, compose_train, run_lmlab

from lmlab.config_check import check_config
from lmlab.errors import LmlabError

EXPERIMENTS = sorted(
    p.stem for d in lmlab.conf.__path__ for p in (Path(d) / "experiment").glob("*.yaml")
)
assert EXPERIMENTS, "no experiment configs found"


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# (overrides, a fragment of the message); each message says what was wrong and what to do
BAD = [
    (
        ["model.optimizer.lr=-0.01"],
        "model.optimizer.lr=-0.01 is not allowed; set model.optimizer.lr to a number > 0",
    ),
    (["model=gpt", "model.optimizer.lr=0"], "set model.optimizer.lr to a number > 0"),
    (
        ["model.optimizer.betas=[1.5,0.9]"],
        "model.optimizer.betas=[1.5, 0.9] is not allowed; set model.optimizer.betas to two "
        "numbers, each in [0, 1)",
    ),
    (["model.optimizer.betas=[0.9]"], "model.optimizer.betas=[0.9] is not allowed"),
    (
        ["model.optimizer.weight_decay=-0.1"],
        "model.optimizer.weight_decay=-0.1 is not allowed; set model.optimizer.weight_decay to "
        "a number >= 0",
    ),
    (
        ["data.val_batch_size=-1"],
        "data.val_batch_size=-1 is not allowed; set data.val_batch_size to a whole number >= 1 "
        "or null",
    ),
    (
        ["data.batch_size=1.5"],
        "data.batch_size=1.5 is not allowed; set data.batch_size to a whole number >= 1",
    ),
    (["data.block_size=abc"], "data.block_size='abc' is not allowed; set data.block_size to a"),
    (["data.stride=0"], "data.stride=0 is not allowed; set data.stride to a whole number >= 1 or"),
    (
        ["data.encoding_errors=bogus"],
        "data.encoding_errors='bogus' is not allowed; set data.encoding_errors to one of strict, "
        "replace, ignore, backslashreplace",
    ),
    (
        ["data.encoding_errors=surrogateescape"],
        "data.encoding_errors='surrogateescape' is not allowed: it decodes bad bytes to lone "
        "surrogates",
    ),
    (["data.encoding_errors=namereplace"], "for encoding only"),
    (
        ["data.quoting=bogus"],
        "data.quoting='bogus' is not allowed; set data.quoting to one of auto, csv, none",
    ),
    (
        ["data.normalize=bogus"],
        "data.normalize='bogus' is not allowed; set data.normalize to one of NFC, NFD, NFKC, "
        "NFKD, or null",
    ),
    (
        ["+data.blok_size=8"],
        "data.blok_size is not a data setting; did you mean data.block_size?",
    ),
    (["+data.zzzz=1"], "data.zzzz is not a data setting; remove it"),
    (
        ["trainer.val_check_interval=0"],
        "trainer.val_check_interval=0 is not allowed; set trainer.val_check_interval to a whole "
        "number of steps >= 1, a fraction of an epoch in (0, 1]",
    ),
    (["trainer.val_check_interval=1.5"], "trainer.val_check_interval=1.5 is not allowed"),
    (
        ["trainer.max_steps=0"],
        "trainer.max_steps=0 trains nothing; set trainer.max_steps to 1 or more (or -1 for no "
        "limit, with max_epochs)",
    ),
    (["trainer.max_steps=-2"], "trainer.max_steps=-2 is not allowed; set trainer.max_steps to 1"),
    (["trainer.max_steps=2.5"], "trainer.max_steps=2.5 is not allowed"),
    (
        ["trainer.log_every_n_steps=0"],
        "trainer.log_every_n_steps=0 is not allowed; set trainer.log_every_n_steps to a whole "
        "number >= 1",
    ),
    (
        ["data.path=${HOME}/x.txt"],
        "data.path: ${HOME} is not a config key; to use the shell's variable write "
        "data.path=$HOME/x.txt (the shell expands it) or data.path=${oc.env:HOME}/x.txt",
    ),
    (["data.path=${nope.key}/x.txt"], "${nope.key} is not a config key; correct the key"),
    (["data.path=${nosuchresolver:x}"], "data.path=${nosuchresolver:x} cannot be resolved"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_setting_is_refused(overrides: list[str], message: str, tmp_path: Path):
    cfg = compose_train(["trainer.accelerator=cpu", *overrides], tmp_path / "run")
    with pytest.raises(LmlabError) as err:
        check_config(cfg)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


CPU_FOR = {"gpt_large_fsdp": ["trainer.accelerator=cpu", "trainer.precision=32-true"]}


@pytest.mark.skipif("_has_cuda()", reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("trainer", ["gpu", "ddp"])
def test_gpu_trainer_without_cuda_is_refused(trainer: str, tmp_path: Path):
    cfg = compose_train([f"trainer={trainer}"], tmp_path / "run")
    with pytest.raises(LmlabError, match="trainer.accelerator=gpu but this machine has no CUDA"):
        check_config(cfg)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["trainer=cpu"],
        ["model=gpt", "data.stride=4", "data.val_batch_size=64", "data.normalize=null"],
        ["model=mlp", "data.encoding_errors=replace", "trainer.val_check_interval=0.5"],
        ["data.quoting=none", "data.encoding_errors=backslashreplace", "data.normalize=NFKC"],
        ["trainer.max_steps=-1", "trainer.max_epochs=2", "model.optimizer.betas=[0,0.5]"],
        # an experiment for GPUs is checked here on the CPU (its own refusal is tested above)
        *([f"experiment={name}", *CPU_FOR.get(name, [])] for name in EXPERIMENTS),
    ],
    ids=lambda o: " ".join(o) or "default",
)
def test_good_config_passes(overrides: list[str], tmp_path: Path):
    check_config(compose_train(overrides, tmp_path / "run"))


CLI_BAD = [
    (["model.optimizer.lr=-0.01"], "model.optimizer.lr=-0.01 is not allowed"),
    (["+data.blok_size=8"], "did you mean data.block_size?"),
    (["trainer.val_check_interval=0"], "trainer.val_check_interval=0 is not allowed"),
    (["trainer.max_steps=0"], "trainer.max_steps=0 trains nothing"),
    (["data.encoding_errors=surrogateescape"], "lone surrogates"),
]


@pytest.mark.parametrize(("overrides", "message"), CLI_BAD, ids=[o[0] for o, _ in CLI_BAD])
def test_cli_refuses_in_one_line(
    overrides: list[str], message: str, tiny_corpus: Path, tmp_path: Path
):
    run_dir = tmp_path / "run"
    result = run_lmlab(
        "train",
        f"data.path={tiny_corpus}",
        "trainer.accelerator=cpu",
        f"hydra.run.dir={run_dir}",
        *TINY_GPT,
        *overrides,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("lmlab-train: error:"), result.stderr
    assert message in last
    assert not (run_dir / "checkpoints").exists()


def test_cli_names_the_key_of_a_shell_variable(tiny_corpus: Path, tmp_path: Path):
    """${HOME} on the command line reaches Hydra unexpanded (single quotes): it is refused
    before Hydra's instantiate resolves data.path."""
    result = run_lmlab(
        "train",
        "data.path=${HOME}/x.txt",
        "trainer.accelerator=cpu",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("lmlab-train: error: data.path: ${HOME} is not a config key")


def test_quoting_choices_are_the_corpus_readers():
    from lmlab.config_check import CHECKS
    from lmlab.data.corpus import QUOTINGS

    assert CHECKS["data.quoting"].allowed == "one of " + ", ".join(QUOTINGS)
