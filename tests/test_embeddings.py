"""The token-embedding picture and Projector data: principal components, labels, token choice,
and a tiny real run that leaves embeddings.png and the Projector's files in its directory."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import TINY_GPT, TINY_TEXT
from matplotlib.image import imread
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lmlab.data.tokenizers import CharTokenizer, TiktokenTokenizer
from lmlab.embeddings import (
    IMAGE_TAG,
    PLOT_NAME,
    TAG,
    EmbeddingProjector,
    choose_token_ids,
    principal_components,
    token_labels,
    visible_text,
)
from lmlab.train import train


def hadamard(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    return h


def test_principal_components_find_known_axes():
    """Points built on known axes: columns 1..3 of an 8x8 Hadamard matrix are centred and
    orthogonal; scaled 5, 2 and 0.5 they are the coordinates on three orthonormal directions
    of a random rotation of R^4, shifted by an offset. PCA must return the first two columns,
    each with the sign that makes its axis' largest entry positive (not mirrored at SVD's
    whim), and variance fractions 25 : 4 : 0.25."""
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64))
    scores = torch.from_numpy(hadamard(8)[:, 1:4] * np.array([5.0, 2.0, 0.5]))  # (8, 3)
    x = scores @ q[:, :3].T + torch.tensor([3.0, -1.0, 7.0, 2.0], dtype=torch.float64)

    coords, fractions = principal_components(x)
    assert coords.shape == (8, 2)
    for j in range(2):
        # the axis is q[:, j] or -q[:, j]: the one whose largest entry is positive (with this
        # seed torch's SVD returns the second axis the other way: a sign left open fails here)
        sign = torch.sign(q[q[:, j].abs().argmax(), j])
        torch.testing.assert_close(coords[:, j], sign * scores[:, j])
    torch.testing.assert_close(fractions, torch.tensor([25, 4], dtype=torch.float64) / 29.25)
    # negative control: the raw first two dimensions are not the answer (the axes are rotated)
    assert not torch.allclose(coords.abs(), (x[:, :2] - x[:, :2].mean(0)).abs(), atol=0.1)


def test_principal_components_match_numpy_svd():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 10)) * np.linspace(3.0, 0.1, 10) + rng.normal(size=10)
    centred = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    expected = u[:, :2] * s[:2]

    coords, fractions = principal_components(torch.from_numpy(x).float())
    for j in range(2):  # an axis may come out mirrored, as a whole
        sign = np.sign(float(coords[0, j]) * expected[0, j])
        np.testing.assert_allclose(coords[:, j].numpy(), sign * expected[:, j], atol=1e-4)
    np.testing.assert_allclose(fractions.numpy(), s[:2] ** 2 / (s**2).sum(), rtol=1e-5)


def test_two_dimensions_are_drawn_as_they_are():
    x = torch.tensor([[1.0, 2.0], [3.0, -4.0], [0.5, 0.0]])
    coords, fractions = principal_components(x)
    assert fractions is None
    torch.testing.assert_close(coords, x.double())  # not centred, not rotated
    one_dim, _ = principal_components(x[:, :1])
    torch.testing.assert_close(one_dim, torch.tensor([[1.0, 0], [3, 0], [0.5, 0]]).double())


def test_char_labels_show_whitespace_and_control_characters():
    tokenizer = CharTokenizer.fit("hello world\n\tA$\x07")
    labels = token_labels(tokenizer, list(range(tokenizer.vocab_size)))
    assert labels == ["\\x07", "\\t", "\\n", "␣", "$", "A", "d", "e", "h", "l", "o", "r", "w"]
    # negative control: the raw characters would be blank, and one would break metadata.tsv
    raw = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
    assert len("\n".join(raw).split("\n")) != len(raw)
    assert len("\n".join(labels).split("\n")) == len(labels)


def test_labels_that_coincide_get_their_ids():
    tokenizer = CharTokenizer.fit("a \u2423")  # a space, and a literal open box
    labels = token_labels(tokenizer, list(range(tokenizer.vocab_size)))
    assert tokenizer.itos == ["\n", " ", "a", "\u2423"]
    assert labels == ["\\n", "␣#1", "a", "␣#3"]
    assert visible_text("\xa0x\u200b") == "\\xa0x\\u200b"  # odd spaces too


def test_bpe_labels():
    """A tiny BPE (the 256 bytes and one merge): a lone continuation byte decodes to U+FFFD,
    as many do, so those labels get their ids; the boundary token keeps its name."""
    ranks = {bytes([b]): b for b in range(256)} | {b" t": 256}
    tokenizer = TiktokenTokenizer("tiny.tiktoken", ranks)
    labels = token_labels(tokenizer, [32, 10, 256, 0x80, 0x81, 257, 0, 104])
    assert labels == ["␣", "\\n", "␣t", "\ufffd#128", "\ufffd#129", "<|endoftext|>", "\\x00", "h"]


def test_most_frequent_tokens_are_chosen_from_the_training_stream():
    stream = torch.from_numpy(np.array([3, 3, 3, 7, 7, 1, 1, 9, 0], dtype=np.uint16))
    assert choose_token_ids(10, 4, stream) == [3, 1, 7, 0]  # by count, then by id
    assert choose_token_ids(10, 4, None) == [0, 1, 2, 3]  # no stream: the first ids
    assert choose_token_ids(5, 10, stream) == [0, 1, 2, 3, 4]  # all of a small vocabulary
    # tokens never seen fill up the rest, by id
    assert choose_token_ids(10, 7, stream) == [3, 1, 7, 0, 9, 2, 4]


@pytest.mark.parametrize(
    ("model", "width"), [(["model=bigram"], None), ([*TINY_GPT, "data.block_size=16"], 16)]
)
def test_a_run_leaves_the_picture_and_projector_files(tiny_train_cfg, model, width):
    """10 steps of a real run with the callback added by override: embeddings.png, and the
    Projector's config, labels (every character, in id order, made visible) and matrix (the
    trained token embedding of the final checkpoint, row by row)."""
    cfg = tiny_train_cfg(*model, "trainer.max_steps=10", "trainer.val_check_interval=10")
    summary = train(cfg)
    assert summary["status"] == "completed"
    run = Path(cfg.paths.output_dir)

    image = imread(run / PLOT_NAME)
    assert image.shape[:2] == (960, 960)  # 8 x 8 inches at 120 dpi
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 10  # not blank

    config = (run / "projector_config.pbtxt").read_text()
    assert f'tensor_name: "{TAG}:00010"' in config
    embedding_dir = run / "00010" / TAG
    assert f'metadata_path: "00010/{TAG}/metadata.tsv"' in config

    tokenizer = CharTokenizer.fit(TINY_TEXT)
    vocab = tokenizer.vocab_size
    expected = [{"\n": "\\n", " ": "␣"}.get(c, c) for c in sorted(set(TINY_TEXT))]
    metadata = (embedding_dir / "metadata.tsv").read_text(encoding="utf-8")
    assert metadata.split("\n") == [*expected, ""]  # one label a line, then the last newline

    tensors = np.loadtxt(embedding_dir / "tensors.tsv", delimiter="\t", ndmin=2)
    assert tensors.shape == (vocab, width or vocab)  # the bigram's rows are V logits
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    key = "model.token_embedding_table.weight" if width is None else "model.transformer.wte.weight"
    trained = state[key].numpy()
    np.testing.assert_allclose(tensors, trained, rtol=1e-5, atol=1e-6)
    # negative control: rows in another order would not match, so the order was checked
    assert not np.allclose(tensors, trained[::-1], rtol=1e-5, atol=1e-6)

    events = EventAccumulator(str(run))
    events.Reload()
    assert IMAGE_TAG in events.Tags()["images"]


def test_a_model_without_token_embeddings_is_reported_not_fatal(tmp_path: Path, caplog):
    projector = EmbeddingProjector(str(tmp_path))
    module = SimpleNamespace(model=nn.Linear(3, 3))
    with caplog.at_level(logging.WARNING, logger="lmlab"):
        projector.on_train_end(SimpleNamespace(loggers=[]), module)
    assert "Linear has no known token embedding" in caplog.text
    assert not (tmp_path / PLOT_NAME).exists()
