"""Samples that end at the boundary, labelled "in train", "in val" or "new" against the corpus:
generate(stop_id=...), sample_text(stop_at_boundary=...), lmlab.sample_labels, the sample-text
callback's samples/new_fraction and lmlab-sample's labelled lines."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch
from helpers import compose_train, run_lmlab
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lmlab.cli import parse_key_values
from lmlab.data.datamodule import TextDataModule
from lmlab.data.tokenizers import CharTokenizer
from lmlab.errors import LmlabError
from lmlab.generation import SamplingSettings, generate, sample_text
from lmlab.models import build_model
from lmlab.sample import KEYS, sample_labelled
from lmlab.sample_labels import (
    IN_TRAIN,
    IN_VAL,
    NEW,
    KnownDocuments,
    checkpoint_datamodule,
    is_line_corpus,
    new_summary,
    part_documents,
)


class Chain(torch.nn.Module):
    """A model whose greedy choice is fixed: the token after `t` is `following[t]`, whatever came
    before. It has a (dummy) KV cache, so generate() takes its cached path unless told not to."""

    block_size = 8

    def __init__(self, following: dict[int, int], vocab_size: int) -> None:
        super().__init__()
        table = torch.full((vocab_size, vocab_size), -1e4)
        for token, after in following.items():
            table[token, after] = 0.0
        self.table = torch.nn.Parameter(table, requires_grad=False)  # sample_text finds its device
        self.calls = 0

    def init_cache(self):
        return type("Cache", (), {"reset": lambda self: None})()

    def forward(self, idx: torch.Tensor, kv_cache=None) -> torch.Tensor:
        self.calls += 1
        return self.table[idx]  # (B, T, V)


# 0 is the boundary; 1 -> 2 -> 0 and 3 -> 4 -> 5 -> 0, and after the boundary 0 -> 1
FOLLOWING = {0: 1, 1: 2, 2: 0, 3: 4, 4: 5, 5: 0}


@pytest.mark.parametrize("use_cache", [True, False])
def test_each_row_stops_at_its_first_boundary_and_generation_stops_when_all_have(
    use_cache: bool,
) -> None:
    model = Chain(FOLLOWING, 6)
    prompt = torch.tensor([[1], [3]])
    out = generate(model, prompt, 10, temperature=0.0, use_cache=use_cache, stop_id=0)
    # row 0 ends after 2 tokens and is padded with the boundary; row 1 ends after 3
    assert out.tolist() == [[1, 2, 0, 0], [3, 4, 5, 0]]
    assert model.calls == 3  # no step after every row has ended
    # the negative control: without stop_id, the chain runs on through the boundary
    free = generate(Chain(FOLLOWING, 6), prompt, 10, temperature=0.0, use_cache=use_cache)
    assert free.tolist() == [
        [1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2],
        [3, 4, 5, 0, 1, 2, 0, 1, 2, 0, 1],
    ]


def test_a_boundary_in_the_prompt_does_not_stop_generation() -> None:
    out = generate(Chain(FOLLOWING, 6), torch.tensor([[0, 3]]), 10, temperature=0.0, stop_id=0)
    assert out.tolist() == [[0, 3, 4, 5, 0]]


def test_stopped_sampling_is_the_free_sampling_cut_at_the_boundary() -> None:
    """Sampled (not greedy) rows of a real GPT, with and without its cache: each stopped row is
    the unstopped row with the same seed, cut after its first boundary."""
    torch.manual_seed(0)
    model = build_model("gpt", vocab_size=5, block_size=8, n_layer=1, n_head=2, n_embd=16)
    prompt = torch.full((16, 1), 4)
    kwargs = {"temperature": 1.0, "generator": torch.Generator().manual_seed(3)}
    free = generate(model, prompt, 30, **kwargs)
    ends = []
    for use_cache in (True, False):
        kwargs["generator"] = torch.Generator().manual_seed(3)
        stopped = generate(model, prompt, 30, use_cache=use_cache, stop_id=0, **kwargs)
        for row, free_row in zip(stopped.tolist(), free.tolist(), strict=True):
            generated = free_row[1:]
            end = 1 + (generated.index(0) + 1 if 0 in generated else len(generated))
            assert row[:end] == free_row[:end]
            assert set(row[end:]) <= {0}  # padding, never a sampled token
            ends.append(end)
    assert len(set(ends)) > 1  # rows of different lengths: the check has teeth
    assert max(ends) < 31  # some row ended before max_new_tokens ran out


def sample_cfg(*arguments: str) -> dict[str, str]:
    return parse_key_values("lmlab-sample", "", KEYS, arguments)


CORPUS = "kay\nzed\n"  # '\n' -> 'k' -> 'a' -> 'y' -> '\n': the chain below spells "kay"


def kay_model(tok: CharTokenizer) -> Chain:
    ids = {c: tok.encode(c)[0] for c in "\nkay"}
    chain = {ids["\n"]: ids["k"], ids["k"]: ids["a"], ids["a"]: ids["y"], ids["y"]: ids["\n"]}
    return Chain(chain, tok.vocab_size)


def test_sample_text_ends_at_the_boundary_only_when_asked() -> None:
    tok = CharTokenizer.fit(CORPUS)
    stop = SamplingSettings("", max_new_tokens=9, num_samples=3, stop_at_boundary=True)
    assert sample_text(kay_model(tok), tok, stop) == ["kay"] * 3
    prompted = SamplingSettings("a", max_new_tokens=9, stop_at_boundary=True)
    assert sample_text(kay_model(tok), tok, prompted) == ["ay"]
    free = SamplingSettings("", max_new_tokens=9, num_samples=2)
    assert sample_text(kay_model(tok), tok, free) == ["kay\nkay\nk"] * 2


KNOWN = KnownDocuments(train=frozenset({"anna", "bob"}), val=frozenset({"bob", "clara"}))


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("anna", IN_TRAIN),
        ("bob", IN_TRAIN),  # in both: train wins
        ("clara", IN_VAL),
        ("zed", NEW),
        ("ann", NEW),  # a prefix of a training name is not that name
        ("Anna", NEW),
        ("anna ", NEW),
    ],
)
def test_label_is_exact_membership(text: str, label: str) -> None:
    assert KNOWN.label(text) == label


def test_new_fraction_and_summary() -> None:
    texts = ["anna", "zed", "clara", "ann", "bob", "zoe", "zed"]
    assert KNOWN.new_fraction(texts) == pytest.approx(4 / 7)  # zed, ann, zoe, zed
    labels = [KNOWN.label(t) for t in texts]
    assert new_summary(labels) == "new: 4 of 7 (57%)"


# every string of 1 to 4 letters over {a, b}: 30 names, so that a bigram trained on them for a
# few steps writes some of them (in train, in val) and some others (new)
NAMES = ["".join(p) for n in range(1, 5) for p in itertools.product("ab", repeat=n)]
FRACTIONS = {"train_fraction": 0.8, "test_fraction": 0.1}  # the names experiments' 80/10/10


@pytest.fixture
def names_file(tmp_path: Path) -> Path:
    path = tmp_path / "names.txt"
    path.write_text("\n".join(NAMES) + "\n", encoding="utf-8")
    return path


def test_part_documents_are_the_documents_training_used(names_file: Path) -> None:
    settings = {"split_lines": True, **FRACTIONS}
    datamodule = TextDataModule(path=str(names_file), examples="documents", **settings)
    datamodule.setup("fit")
    tok = datamodule.tokenizer
    parts = part_documents(names_file, datamodule.settings)
    assert set(parts) == {"train", "val", "test"}
    for name, documents in parts.items():
        assert documents == [tok.decode(d.tolist()) for d in datamodule.documents[name]]
    assert sorted(itertools.chain(*parts.values())) == sorted(NAMES)
    known = KnownDocuments.of(datamodule)
    assert known.train == frozenset(parts["train"]) and known.val == frozenset(parts["val"])
    # the negative control: another split seed puts other names in training
    other = TextDataModule(path=str(names_file), split_seed=7, **settings)
    assert part_documents(names_file, other.settings)["train"] != parts["train"]


def test_line_corpora_are_lines_or_fields(names_file: Path, tmp_path: Path) -> None:
    table = tmp_path / "reviews.tsv"
    table.write_text("id\tdocument\n1\tgood\n2\tbad\n", encoding="utf-8")
    assert is_line_corpus(TextDataModule(path=str(names_file), split_lines=True))
    assert is_line_corpus(TextDataModule(path=str(table), text_field="document"))
    assert not is_line_corpus(TextDataModule(path=str(names_file)))  # running text
    assert not is_line_corpus(None)


def test_running_text_checkpoint_samples_run_on_unless_told(gpt_checkpoint: Path) -> None:
    assert not is_line_corpus(checkpoint_datamodule(gpt_checkpoint))
    base = [f"ckpt_path={gpt_checkpoint}", "prompt=Speak", "max_new_tokens=60", "num_samples=4"]
    free = sample_labelled(sample_cfg(*base))
    assert free.labels is None and not free.one_per_line
    assert all(len(t) == len("Speak") + 60 for t in free.texts)  # auto: no stop on running text
    assert any("\n" in t for t in free.texts)  # there was a boundary to stop at
    stopped = sample_labelled(sample_cfg(*base, "stop_at_boundary=true"))
    assert stopped.one_per_line and stopped.labels is None
    # the same seed: each stopped text is the free one cut at its first line break
    assert stopped.texts == ["Speak" + t[5:].split("\n")[0] for t in free.texts]
    with pytest.raises(LmlabError, match="labels=true needs samples that end at the boundary"):
        sample_labelled(sample_cfg(*base, "labels=true"))
    with pytest.raises(LmlabError, match="labels must be true, false or auto, got 'yes'"):
        sample_labelled(sample_cfg(*base, "labels=yes"))


@pytest.mark.slow
def test_names_run_logs_new_fraction_and_lmlab_sample_prints_labelled_lines(
    names_file: Path, tmp_path: Path
) -> None:
    from lmlab.train import train

    run = tmp_path / "run"
    overrides = [
        f"data.path={names_file}",
        "data=names",
        "data.train_fraction=0.8",
        "data.test_fraction=0.1",
        "model=bigram",
        "model.optimizer.lr=0.1",
        "trainer.accelerator=cpu",
        "trainer.max_steps=40",
        "trainer.val_check_interval=20",
        "trainer.enable_progress_bar=false",
    ]
    train(compose_train(overrides, run))
    datamodule = TextDataModule(path=str(names_file), split_lines=True, **FRACTIONS)
    parts = part_documents(names_file, datamodule.settings)
    train_names, val_names = set(parts["train"]), set(parts["val"])

    def expected(name: str) -> str:  # the rule, written out again
        return "in train" if name in train_names else "in val" if name in val_names else "new"

    # samples.txt: per validation, a header with the count and 20 labelled names
    blocks = re.findall(
        r"=== step (\d+): new: (\d+) of 20 \(\d+%\) ===\n((?:.*\n){20})",
        (run / "samples.txt").read_text(),
    )
    assert [int(step) for step, _, _ in blocks] == [20, 40]
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("samples/new_fraction")}
    for step, new, lines in blocks:
        pairs = [line.rsplit("  ", 1) for line in lines.splitlines()]
        assert all(label == expected(name.rstrip()) for name, label in pairs)
        assert sum(label == "new" for _, label in pairs) == int(new)
        assert logged[int(step)] == pytest.approx(int(new) / 20)

    ckpt = run / "checkpoints" / "last.ckpt"
    result = run_lmlab("sample", f"ckpt_path={ckpt}", "num_samples=20", "seed=3")
    assert result.returncode == 0, result.stderr
    *lines, summary = result.stdout.splitlines()
    assert len(lines) == 20
    pairs = [line.rsplit("  ", 1) for line in lines]
    labels = [label for _, label in pairs]
    assert [expected(name.rstrip()) for name, _ in pairs] == labels
    assert {"in train", "new"} <= set(labels)  # both kinds occur: the check has teeth
    new = labels.count("new")
    assert summary == f"new: {new} of 20 ({new / 20:.0%})"
    # labels=false: the same names (the same seed), bare, one per line
    bare = run_lmlab("sample", f"ckpt_path={ckpt}", "num_samples=20", "seed=3", "labels=false")
    assert bare.stdout.splitlines() == [name.rstrip() for name, _ in pairs]
    assert all(set(name) <= set("ab") for name in bare.stdout.splitlines())
