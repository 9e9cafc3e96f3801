"""The console: config tree, the run-long progress bar, progress lines, noise filters."""

from __future__ import annotations

import io
import logging
import logging.config
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from helpers import compose_train
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import OmegaConf
from rich.console import Console
from torch.utils.data import DataLoader, TensorDataset

import lmlab.console as console
from lmlab.console import (
    PlainModelSummary,
    ProgressLines,
    RunProgressBar,
    format_parameters,
    print_config_tree,
    progress_callbacks,
    progress_line,
    quiet_third_party,
    start_banner,
    summary_line,
)

EPOCH_BATCHES = 10  # a pseudo-epoch of the test's data, as lmlab's 1,000-batch ones
MAX_STEPS = 25  # two and a half pseudo-epochs


class Linear(L.LightningModule):
    """A trivial model that logs what lit_module logs: train/loss, val/loss, val/bpc."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        loss = torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/bpc", loss * 1.4427)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return _loader(EPOCH_BATCHES)

    def val_dataloader(self):
        return _loader(2)


def _loader(batches: int) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batches * 2, 4, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=2)


def _trainer(root: Path, max_steps: int, callbacks: list) -> L.Trainer:
    return L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        max_steps=max_steps,
        max_epochs=-1,
        val_check_interval=10,  # counted across pseudo-epochs, as lmlab-train sets it
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=5,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
        callbacks=callbacks,
    )


class StartCount(L.Callback):
    """Where the bar stood when the first training step began."""

    def __init__(self, bar: RunProgressBar) -> None:
        self.bar = bar
        self.first: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first is None:
            self.first = self.bar.train_progress_bar.completed


@pytest.fixture
def lmlab_records() -> Iterator[list[logging.LogRecord]]:
    """Records of the `lmlab` logger (a handler of its own: Hydra may not be configured)."""
    records: list[logging.LogRecord] = []
    handler = _ListHandler(records)
    logger = logging.getLogger("lmlab")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


class _ListHandler(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _messages(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records]


# ---------------------------------------------------------------------------------------------
# the run-long progress bar and the progress lines, over real fits with pseudo-epochs


def test_bar_counts_the_steps_of_the_whole_run_and_starts_at_a_resumed_step(
    tmp_path: Path, lmlab_records
):
    bar = RunProgressBar()
    start = StartCount(bar)
    first = _trainer(tmp_path, 10, [bar, start, ProgressLines()])
    first.fit(Linear())
    assert bar.train_progress_bar.total == 10
    assert start.first == 0
    ckpt = tmp_path / "step10.ckpt"
    first.save_checkpoint(ckpt)

    bar = RunProgressBar()
    start = StartCount(bar)
    trainer = _trainer(tmp_path, MAX_STEPS, [bar, start, ProgressLines()])
    trainer.fit(Linear(), ckpt_path=ckpt, weights_only=True)

    task = bar.train_progress_bar
    assert trainer.global_step == MAX_STEPS and trainer.current_epoch > 1  # pseudo-epochs
    assert (task.total, task.completed) == (MAX_STEPS, MAX_STEPS)
    assert start.first == 10  # not 0, and not "990/?"
    assert task.description == "step"
    # one bar for the run: no task per pseudo-epoch, none for the two validations
    assert len(bar.progress.tasks) == 1
    assert set(bar.get_metrics(trainer, trainer.lightning_module)) == {"loss", "val"}


def test_bar_total_for_a_run_bounded_by_epochs(tmp_path: Path):
    bar = RunProgressBar()
    trainer = _trainer(tmp_path, -1, [bar])
    trainer.fit_loop.max_epochs = 2
    trainer.fit(Linear())
    assert (bar.train_progress_bar.total, bar.train_progress_bar.completed) == (20, 20)


class AtValidation(L.Callback):
    """callback_metrics as they are at each validation's end."""

    def __init__(self) -> None:
        self.seen: list[dict[str, float]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        self.seen.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def test_progress_lines_at_each_validation_and_a_summary(tmp_path: Path, lmlab_records):
    at_validation = AtValidation()
    trainer = _trainer(tmp_path, MAX_STEPS, [at_validation, ProgressLines()])
    trainer.fit(Linear())
    messages = _messages(lmlab_records)
    assert [m.split(":")[0] for m in messages] == [
        "step 10/25",
        "step 20/25",
        "trained 25 steps to step 25 in 0",
    ]
    for message, metrics in zip(messages[:2], at_validation.seen, strict=True):
        train, val, bpc = (metrics[k] for k in ("train/loss", "val/loss", "val/bpc"))
        assert f": train {train:.4f}, val {val:.4f}, val bpc {bpc:.4f}, " in message
    vals = [m["val/loss"] for m in at_validation.seen]
    best, best_step = min(zip(vals, (10, 20), strict=True))
    assert messages[2].endswith(f"; best val {best:.4f} at step {best_step}")
    assert messages[1].endswith(" ms/step")
    assert "ms/step); best val " in messages[2]
    assert all("\x1b" not in m for m in messages)


def test_progress_line_text():
    metrics = {"train/loss": 1.92341, "val/loss": 1.95123, "val/bpc": 2.81502, "val/ppl": 7.0}
    assert progress_line(500, 5000, metrics, 38.2) == (
        "step 500/5000: train 1.9234, val 1.9512, val bpc 2.8150, 38 ms/step"
    )
    assert progress_line(500, None, {"val/loss": 2.0}, None) == "step 500: val 2.0000"


def test_summary_line_text():
    assert summary_line(3000, 3000, 114.2, (1.48234, 2700)) == (
        "trained 3000 steps to step 3000 in 0:01:54 (38 ms/step); best val 1.4823 at step 2700"
    )
    assert summary_line(25, 15, 0.3, None) == "trained 15 steps to step 25 in 0:00:00 (20 ms/step)"


def test_progress_callbacks_use_the_bar_only_on_a_terminal():
    on_terminal = progress_callbacks(is_terminal=True)
    assert [type(c) for c in on_terminal] == [RunProgressBar, ProgressLines]
    redirected = progress_callbacks(is_terminal=False)
    assert [type(c) for c in redirected] == [ProgressLines]


def test_log_lines_print_above_a_live_bar_and_their_stream_comes_back(tmp_path: Path):
    """Rich replaces sys.stdout while the bar is live; a handler that holds the real stream
    (as Hydra's console handler does) would be drawn over, so it writes through Rich."""
    from rich import reconfigure
    from rich.file_proxy import FileProxy

    stream = sys.stdout
    handler = logging.StreamHandler(stream)
    logging.getLogger("lmlab").addHandler(handler)
    seen: list[object] = []

    class Look(L.Callback):
        def on_train_batch_end(self, *args) -> None:
            seen.append(handler.stream)

    try:
        bar = RunProgressBar(console_kwargs={"force_terminal": True, "file": io.StringIO()})
        _trainer(tmp_path, 3, [bar, Look()]).fit(Linear())
    finally:
        logging.getLogger("lmlab").removeHandler(handler)
        reconfigure()  # Lightning reconfigured Rich's global console for the bar
    assert seen and all(isinstance(s, FileProxy) and s.rich_proxied_file is stream for s in seen)
    assert handler.stream is stream


# ---------------------------------------------------------------------------------------------
# the model summary


def test_model_summary_has_no_flops_column(tmp_path: Path, lmlab_records):
    trainer = _trainer(tmp_path, 1, [PlainModelSummary(max_depth=1)])
    trainer.fit(Linear())
    (table,) = [m for m in _messages(lmlab_records) if "Trainable params" in m]
    assert "Params" in table and "Linear" in table and "Total params" in table
    assert "FLOP" not in table.upper()


# ---------------------------------------------------------------------------------------------
# no colour codes in files


def test_no_escape_codes_in_the_log_file_of_hydras_job_logging(tmp_path: Path, monkeypatch):
    """Hydra's own job_logging config (what train.log is written with) plus what lmlab and
    Lightning log into it during a fit with the progress lines and the model summary."""
    import hydra

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    source = Path(hydra.__file__).parent / "conf/hydra/job_logging/default.yaml"
    config = yaml.safe_load(source.read_text())
    config["handlers"]["file"]["filename"] = str(tmp_path / "train.log")
    config["handlers"]["console"]["stream"] = io.StringIO()  # stdout, redirected
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logging.config.dictConfig(config)
        callbacks = [*progress_callbacks(is_terminal=False), PlainModelSummary()]
        _trainer(tmp_path, 20, callbacks).fit(Linear())
        console_text = config["handlers"]["console"]["stream"].getvalue()
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], root.level = saved[0], saved[1]
    text = (tmp_path / "train.log").read_text()
    assert "step 20/20: train " in text and "Total params" in text
    assert "\x1b" not in text and "\x1b" not in console_text


def test_optuna_log_lines_have_no_escape_codes_when_stderr_is_not_a_terminal(quiet, monkeypatch):
    """Optuna formats its lines with colorlog: colour on a terminal, none in a file."""
    optuna_logging = pytest.importorskip("optuna.logging")
    record = logging.LogRecord("optuna", logging.INFO, __file__, 1, "Trial 0 finished", (), None)

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())  # the control: a terminal gets colours
    assert "\x1b" in optuna_logging.create_default_formatter().format(record)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # redirected
    quiet_third_party()
    assert "\x1b" not in optuna_logging.create_default_formatter().format(record)


# ---------------------------------------------------------------------------------------------
# the noise filters: each named message gone, an unrelated one kept


@pytest.fixture
def quiet(monkeypatch) -> Iterator[None]:
    """quiet_third_party(), undone afterwards: its warning filters and logging filters."""
    # unset, and restored afterwards to what it was, whatever quiet_third_party sets
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.delenv("NO_COLOR")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        yield
    for name in console._LOG_NOISE:
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, console._DropMessages)]:
            logger.removeFilter(f)
    lightning_logger = logging.getLogger("lightning")
    if L._console not in lightning_logger.handlers:
        lightning_logger.addHandler(L._console)


def _rank_zero_records() -> tuple[logging.Logger, list[logging.LogRecord]]:
    """The logger Lightning's rank_zero_info logs through, with a handler that records."""
    import lightning_utilities.core.rank_zero as rank_zero

    records: list[logging.LogRecord] = []
    rank_zero.log.addHandler(_ListHandler(records))
    return rank_zero.log, records


def _bare_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_litlogger_tip_is_filtered_and_other_lightning_info_kept(quiet):
    logger, records = _rank_zero_records()
    try:
        _bare_trainer()
        assert any("💡 Tip" in m and "litlogger" in m for m in _messages(records))  # control
        records.clear()
        quiet_third_party()
        _bare_trainer()
    finally:
        logger.handlers = [h for h in logger.handlers if not isinstance(h, _ListHandler)]
    messages = _messages(records)
    assert not any("💡 Tip" in m for m in messages)
    assert any(m.startswith("GPU available") for m in messages)


def test_limit_val_batches_info_is_gone_from_lmlabs_trainer_config(tmp_path: Path):
    cfg = compose_train(["trainer.accelerator=cpu"], tmp_path)
    assert cfg.trainer.limit_val_batches is None  # Lightning's default: all of them
    logger, records = _rank_zero_records()
    try:
        trainer = _bare_trainer(limit_val_batches=cfg.trainer.limit_val_batches)
        _bare_trainer(limit_val_batches=1.0)  # the control: the message it used to cause
    finally:
        logger.handlers = [h for h in logger.handlers if not isinstance(h, _ListHandler)]
    assert trainer.limit_val_batches == 1.0
    said = [m for m in _messages(records) if "limit_val_batches" in m]
    assert len(said) == 1  # the control's, and only it


def test_pytree_and_weights_only_warnings_are_filtered_and_others_kept(quiet):
    from lightning.pytorch.utilities._pytree import _tree_flatten

    weights_only = (
        "You are using `torch.load` with `weights_only=False` (the current default value), "
        "which uses the default pickle module implicitly."
    )

    def emit() -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            _tree_flatten(1)  # Lightning builds a LeafSpec for a leaf
            warnings.warn_explicit(
                weights_only, FutureWarning, "cloud_io.py", 1, "lightning.fabric.utilities.cloud_io"
            )
            warnings.warn_explicit(weights_only, FutureWarning, "mine.py", 1, "lmlab.mine")
            warnings.warn("an unrelated warning", UserWarning, stacklevel=1)
            warnings.warn("isinstance of something else is deprecated", FutureWarning, stacklevel=1)
        return [f"{w.category.__name__}: {w.message}" for w in caught]

    before = emit()
    assert any("LeafSpec" in m for m in before) and len(before) == 5  # the control
    quiet_third_party()
    quiet_third_party()  # once or twice: the same filters
    after = emit()
    assert not any("LeafSpec" in m for m in after)
    assert after == [
        f"FutureWarning: {weights_only}",  # from lmlab's own code: still shown
        "UserWarning: an unrelated warning",
        "FutureWarning: isinstance of something else is deprecated",
    ]


def test_weights_only_line_of_a_checkpoint_save_is_filtered(quiet, tmp_path: Path):
    """Lightning's save without weights_only (the LR finder's, CheckpointOnInterrupt's)."""
    trainer = _trainer(tmp_path, 1, [])
    trainer.fit(Linear())
    records: list[logging.LogRecord] = []
    logger = logging.getLogger("lightning.pytorch.trainer.connectors.checkpoint_connector")
    logger.addHandler(_ListHandler(records))
    try:
        trainer.save_checkpoint(tmp_path / "a.ckpt")
        assert any("`weights_only` was not set" in m for m in _messages(records))  # control
        records.clear()
        quiet_third_party()
        trainer.save_checkpoint(tmp_path / "b.ckpt")
        logger.info("another line of the checkpoint connector")
    finally:
        logger.handlers = [h for h in logger.handlers if not isinstance(h, _ListHandler)]
    assert _messages(records) == ["another line of the checkpoint connector"]


def test_alembic_plugin_lines_are_filtered_and_its_other_lines_kept(quiet):
    records: list[logging.LogRecord] = []
    logger = logging.getLogger("alembic.runtime.plugins")
    logger.addHandler(_ListHandler(records))
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        quiet_third_party()
        logger.info("setup plugin %s", "alembic.autogenerate.schemas")  # as alembic logs it
        logger.info("an unrelated line")
        logging.getLogger("alembic.runtime.migration").info("setup plugin elsewhere")
    finally:
        logger.handlers = [h for h in logger.handlers if not isinstance(h, _ListHandler)]
        logger.setLevel(level)
    assert _messages(records) == ["an unrelated line"]
    assert len(logger.filters) == 1  # one filter, however often it is called


def test_lightning_lines_show_once_under_hydras_handlers(quiet):
    """`import lightning` adds a stderr handler of its own to a logger that also propagates
    to Hydra's: without it each Lightning line would show twice."""
    lightning_logger = logging.getLogger("lightning")
    assert L._console in lightning_logger.handlers  # the control
    root = logging.getLogger()
    hydra_like = logging.StreamHandler(io.StringIO())
    root.addHandler(hydra_like)
    try:
        quiet_third_party()
    finally:
        root.removeHandler(hydra_like)
    assert L._console not in lightning_logger.handlers
    assert lightning_logger.propagate  # its lines still reach Hydra's handlers


def test_lightning_keeps_its_handler_when_nothing_else_would_show_its_lines(quiet, monkeypatch):
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    quiet_third_party()
    assert L._console in logging.getLogger("lightning").handlers


# ---------------------------------------------------------------------------------------------
# the config tree, numbers, the banner


def _tree_text(cfg, **kwargs) -> str:
    out = Console(file=io.StringIO(), width=120)  # not a terminal: plain text
    print_config_tree(cfg, console=out, **kwargs)
    return out.file.getvalue()


def test_config_tree_shows_keys_and_resolved_values(tmp_path: Path):
    cfg = compose_train(["model=gpt", "trainer.max_steps=123"], tmp_path / "run")
    text = _tree_text(cfg)
    assert "\x1b" not in text
    for line in ("name: gpt", "max_steps: 123", f"default_root_dir: {tmp_path / 'run'}"):
        assert line in text  # the last one resolved from ${paths.output_dir}
    assert "seed: 1337" in text and "${" not in text
    order = [text.index(f"── {key}") for key in ("data", "model", "trainer", "callbacks")]
    assert order == sorted(order)


def test_config_tree_shows_what_cannot_resolve_as_written():
    cfg = OmegaConf.create(
        {
            "a": {"broken": "${nowhere.at_all}", "ok": "${b}", "missing": "???"},
            "b": 7,
            "tag": "[bold]as written[/bold]",
        }
    )
    text = _tree_text(cfg, keys_first=("b",))
    assert "broken: ${nowhere.at_all}" in text and "ok: 7" in text and "missing: ???" in text
    assert "tag: [bold]as written[/bold]" in text  # not taken for Rich markup
    assert text.index("b: 7") < text.index("── a")


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0"),
        (4_225, "4,225"),
        (999_999, "999,999"),
        (1_234_567, "1.23M"),
        (9_996_000, "10.0M"),
        (85_012_345, "85.0M"),
        (123_654_000, "124M"),
        (999_999_999, "1.00B"),
        (1_500_000_000, "1.50B"),
    ],
)
def test_format_parameters(n: int, text: str):
    assert format_parameters(n) == text


def test_start_banner_names_the_run_directory_and_tensorboard(tmp_path: Path):
    run = tmp_path / "runs" / "my run"
    banner = start_banner(run)
    assert banner.splitlines()[0] == f"run directory: {run}"
    assert f"tensorboard --logdir '{run}'" in banner  # quoted: a path with a space


def test_a_run_in_a_file_is_calm_and_keeps_its_progress(tmp_path: Path, tiny_corpus: Path):
    """lmlab-train with its output going to files, as in a batch job: no escape codes, no
    adverts or FLOPs column, the run directory first, progress lines in train.log."""
    from helpers import TINY_GPT, run_lmlab

    run = tmp_path / "run"
    result = run_lmlab(
        "train",
        f"data.path={tiny_corpus}",
        *TINY_GPT,
        "trainer.max_steps=20",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout + result.stderr
    assert "\x1b" not in out and "\x1b" not in (run / "train.log").read_text()
    assert "Tip" not in out and "FLOPs" not in out and "LeafSpec" not in out
    assert out.index(f"run directory: {run}") < out.index("step 0: val/loss")
    log = (run / "train.log").read_text()
    assert [int(n) for n in re.findall(r"step (\d+)/20: ", log)] == list(range(2, 21, 2))
    assert "trained 20 steps" in log


def test_the_checkpoint_directory_warning_of_a_resume_in_place_is_filtered(quiet):
    text = "Checkpoint directory /runs/a/checkpoints exists and is not empty."

    def emit() -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            module = "lightning.pytorch.callbacks.model_checkpoint"
            warnings.warn_explicit(text, UserWarning, "model_checkpoint.py", 1, module)
            warnings.warn_explicit(text, UserWarning, "mine.py", 1, "lmlab.mine")
        return [str(w.message) for w in caught]

    assert emit() == [text, text]  # the control
    quiet_third_party()
    assert emit() == [text]  # only Lightning's is filtered
