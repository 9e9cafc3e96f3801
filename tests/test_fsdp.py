"""trainer=fsdp: FSDP2 sharding of the GPT's blocks, callbacks that cannot work on a sharded model
refused, and (on CPU, two gloo processes) an exact resume and a one-file checkpoint that
lmlab-eval reads."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import TINY_GPT, compose_train, run_lmlab

from lmlab.checkpoint import MAX_PARAMETERS, _parameter_estimate, read_checkpoint
from lmlab.errors import LmlabError
from lmlab.models import build_model
from lmlab.models.gpt import Block
from lmlab.optim import build_adamw
from lmlab.runs.fsdp import FullyShardedStrategy, check_callbacks, shard_model


@pytest.fixture
def one_process_group():
    """A gloo process group of this process alone (world size 1), as FSDP2 needs one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def tiny_gpt(n_layer: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("gpt", vocab_size=11, block_size=8, n_layer=n_layer, n_head=2, n_embd=8)


def test_each_block_is_a_unit_and_weight_decay_still_finds_the_matrices(one_process_group):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    plain, sharded = tiny_gpt(), tiny_gpt()
    x = torch.randint(0, 11, (2, 8))
    expected = plain(x)
    assert shard_model(sharded, one_process_group, (Block,), True) == 3 + 1  # blocks + root
    assert [type(m).__name__ for m in sharded.modules() if isinstance(m, FSDPModule)] == [
        "FSDPGPT",
        *["FSDPBlock"] * 3,
    ]
    assert shard_model(sharded, one_process_group, (Block,), True) == 0  # a second setup
    assert all(isinstance(p, DTensor) for p in sharded.parameters())
    torch.testing.assert_close(sharded(x), expected)  # the same function, sharded
    # DTensors keep their full shape, so AdamW's groups are those of the plain model (FSDP1's
    # flattened parameters would all look 1-D and lose their weight decay)
    groups = [build_adamw(m, weight_decay=0.1).param_groups for m in (plain, sharded)]
    sizes = [[sum(p.numel() for p in g["params"]) for g in gs] for gs in groups]
    assert sizes[0] == sizes[1] and sizes[0][0] > 0 and sizes[0][1] > 0


def test_a_model_without_the_unit_class_is_refused(one_process_group):
    bigram = build_model("bigram", vocab_size=11)
    with pytest.raises(LmlabError, match="has none; use model=gpt"):
        shard_model(bigram, one_process_group, (Block,), True)


def test_callbacks_that_run_the_model_in_one_process_are_refused():
    from lmlab.callbacks import RunSummary, SampleTextCallback

    class EmbeddingProjector:  # named as lmlab.embeddings' (only the name is looked at)
        pass

    sample = object.__new__(SampleTextCallback)
    with pytest.raises(LmlabError) as refused:
        check_callbacks([object.__new__(RunSummary), sample, EmbeddingProjector()])
    assert "set callbacks.sample_text=null callbacks.embeddings=null," in str(refused.value)
    check_callbacks([object.__new__(RunSummary)])  # nothing to refuse


def test_trainer_fsdp_shards_gpt_blocks_and_the_large_experiment_needs_it(tmp_path: Path):
    cfg = compose_train(["trainer=fsdp"], tmp_path)
    strategy = cfg.trainer.strategy
    assert strategy._target_ == "lmlab.runs.fsdp.FullyShardedStrategy"
    settings = {k: v for k, v in strategy.items() if k != "_target_"}
    assert FullyShardedStrategy(**settings).shard_classes == (Block,)
    large = compose_train(["experiment=gpt_large_fsdp"], tmp_path)
    assert large.trainer.strategy._target_ == strategy._target_
    assert all(large.callbacks[k] is None for k in ("sample_text", "embeddings", "diagnostics"))
    hparams = {**large.model, "vocab_size": 50257}  # GPT-2's BPE (data=shakespeare_bpe)
    params = _parameter_estimate("gpt", hparams)
    assert 1e10 < params < MAX_PARAMETERS  # its checkpoints stay readable
    # fp32 weights, gradients and two AdamW moments: more than an H200's 141 GB
    assert 16 * params > 141e9


FSDP_CPU = [
    "trainer=fsdp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.precision=32-true",
    "callbacks.sample_text=null",
    "callbacks.embeddings=null",
    "callbacks.diagnostics=null",
    *TINY_GPT,
    "model.n_layer=2",
    "model.dropout=0.1",  # the resumed run must continue the dropout draws too
    "data.block_size=16",
    "+model.scheduler.decay_steps=10",  # the same schedule for a run stopped at step 5
    "model.scheduler.warmup_steps=2",
    "trainer.val_check_interval=5",
    "trainer.log_every_n_steps=3",
    "trainer.enable_progress_bar=false",
    "print_config=false",
]


@pytest.mark.slow
def test_fsdp_on_cpu_resumes_exactly_into_a_checkpoint_lmlab_eval_reads(
    tiny_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from lmlab.evaluate import evaluate

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two processes on two cores
    common = [f"data.path={tiny_corpus}", *FSDP_CPU]
    full, half = tmp_path / "full", tmp_path / "half"
    runs = [
        run_lmlab("train", *common, f"hydra.run.dir={full}", "trainer.max_steps=10"),
        run_lmlab("train", *common, f"hydra.run.dir={half}", "trainer.max_steps=5"),
    ]
    step5 = read_checkpoint(half / "checkpoints" / "last.ckpt")["state_dict"]
    # continues the run in its directory, with its overrides (lmlab.runs.resume)
    ckpt = half / "checkpoints" / "last.ckpt"
    runs.append(run_lmlab("train", f"ckpt_path={ckpt}", "trainer.max_steps=10"))
    for result in runs:
        assert result.returncode == 0, result.stderr[-3000:]
    # FSDP2 ran: the model summary names the class fully_shard gives the sharded GPT
    assert "FSDPGPT" in (full / "train.log").read_text()
    assert (full / "train_process_1.log").is_file()  # in two processes

    # one file, read with weights_only=True, as the checkpoint of any run
    weights = [read_checkpoint(d / "checkpoints" / "last.ckpt")["state_dict"] for d in (full, half)]
    assert weights[0].keys() == weights[1].keys() and "model.lm_head.weight" in weights[0]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(step5[k], weights[1][k]) for k in step5)  # it did train on
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (full, half)]
    assert metrics[0]["steps"] == metrics[1]["steps"] == 10
    assert metrics[0]["val/loss"] == metrics[1]["val/loss"]

    # lmlab-eval, in one process, scores the gathered weights as the two processes did
    scored = evaluate({"ckpt_path": str(full / "checkpoints" / "last.ckpt"), "split": "val"})
    assert scored["loss"] == pytest.approx(metrics[0]["val/loss"], abs=1e-5)
