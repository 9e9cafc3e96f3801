"""A calm console: the config at the start, one progress bar for the whole run on a terminal,
plain progress lines that survive in train.log, and third-party noise filtered at its source.

Everything here writes either through `logging.getLogger("lmlab")` (Hydra's job logging sends
it to the console and to train.log, without colour codes) or through Rich, which writes colour
only to a terminal.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from lightning.pytorch.callbacks import Callback, ModelSummary, RichProgressBar
from omegaconf import DictConfig, ListConfig, OmegaConf

if TYPE_CHECKING:
    import lightning as L
    from rich.console import Console

log = logging.getLogger("lmlab")

# The config groups that say most about a run, shown first in the tree.
KEYS_FIRST = ("data", "model", "trainer", "callbacks", "logger", "paths")


# ---------------------------------------------------------------------------------------------
# Numbers and the start banner


def format_parameters(n: int) -> str:
    """A parameter count a person can read: `4,225`, `1.23M`, `85.0M`, `124M`, `1.50B`.

    Below a million every digit is shown (a bigram's 4,225 is not "0.00M"); above, three
    significant figures, rounded before the unit is chosen so 999,999,999 reads `1.00B`."""
    if n < 1_000_000:
        return f"{n:,}"
    rounded = float(f"{n:.3g}")
    scale, unit = (1e9, "B") if rounded >= 1e9 else (1e6, "M")
    value = rounded / scale
    decimals = 2 if value < 10 else 1 if value < 100 else 0
    return f"{value:.{decimals}f}{unit}"


def start_banner(output_dir: Path | str) -> str:
    """Where this run writes, and the command that shows its curves."""
    output_dir = Path(output_dir)
    return (
        f"run directory: {output_dir}\ncurves: tensorboard --logdir {shlex.quote(str(output_dir))}"
    )


def is_terminal() -> bool:
    """Whether stdout, where Rich draws the progress bar, is a terminal (not a file or pipe)."""
    return sys.stdout.isatty()


# ---------------------------------------------------------------------------------------------
# The config tree


def print_config_tree(
    cfg: DictConfig,
    keys_first: Sequence[str] = KEYS_FIRST,
    console: Console | None = None,
) -> None:
    """Print the composed config as a Rich tree, one branch per top-level key (`keys_first`
    first, then the rest in config order), with interpolations resolved. A value that cannot
    be resolved (a missing `???`, a resolver that needs Hydra's runtime) is shown as written
    rather than failing the run before it starts."""
    from rich.console import Console
    from rich.syntax import Syntax
    from rich.text import Text
    from rich.tree import Tree

    console = console or Console()
    tree = Tree("config", guide_style="dim")
    present = [k for k in keys_first if k in cfg]
    for key in [*present, *(k for k in cfg if k not in present)]:
        value = _plain_value(cfg, key)
        if isinstance(value, (dict, list)) and value:
            branch = tree.add(Text(str(key)))  # Text: a `[` in a value is not Rich markup
            text = yaml.safe_dump(value, sort_keys=False, allow_unicode=True).rstrip()
            branch.add(Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
        else:
            tree.add(Text(f"{key}: {_scalar(value)}"))
    console.print(tree)


def resolved_container(cfg: DictConfig | ListConfig) -> dict | list:
    """`cfg` as plain dicts and lists, each value resolved where it can be and left as
    written (e.g. `${oops.missing}`, `???`) where it cannot."""
    if isinstance(cfg, ListConfig):
        return [_plain_value(cfg, i) for i in range(len(cfg))]
    return {str(key): _plain_value(cfg, key) for key in cfg}


def _plain_value(cfg: DictConfig | ListConfig, key: Any) -> Any:
    try:
        value = cfg[key]
    except Exception:  # an interpolation or resolver that fails here fails the run later
        return _raw_value(cfg, key)
    if isinstance(value, (DictConfig, ListConfig)):
        return resolved_container(value)
    return value


def _raw_value(cfg: DictConfig | ListConfig, key: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=False)[key]


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if value != "" else '""'


# ---------------------------------------------------------------------------------------------
# Progress on a terminal: one bar, steps of the whole run


class RunProgressBar(RichProgressBar):
    """Lightning's Rich bar, counting optimizer steps of the whole run (`step N/max_steps`),
    with the loss and an ETA for the run, not for one pseudo-epoch of the datamodule.

    - One task for the whole fit, created at the step the run starts from (a resumed run
      starts at its step, and Rich's speed, hence the ETA, counts only steps done here).
    - No validation bars: a validation is a pause in the step count, and its result shows in
      the bar's metrics and in a ProgressLines line.
    - The loss is read (a device sync) only on logging steps, where lit_module updates it.
    """

    def __init__(self, refresh_rate: int = 10, **kwargs: Any) -> None:
        super().__init__(refresh_rate=refresh_rate, **kwargs)  # redraws per second, at most
        self._rerouted: list[tuple[logging.StreamHandler, Any]] = []

    # the one bar

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.is_disabled or self.progress is None or self.train_progress_bar_id is not None:
            return  # a new pseudo-epoch goes on counting on the same bar
        self.train_progress_bar_id = self.progress.add_task(
            "step", total=self.run_total(trainer), completed=trainer.global_step
        )
        self.refresh()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if self.is_disabled:
            return
        if self.train_progress_bar_id is None:
            self.on_train_epoch_start(trainer, pl_module)
        self._update(self.train_progress_bar_id, trainer.global_step)
        if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            self._update_metrics(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # nothing ends for the run's bar at a pseudo-epoch's end

    @staticmethod
    def run_total(trainer: L.Trainer) -> int | float:
        """The run's optimizer steps: max_steps, or what max_epochs comes to without it
        (an int, which the bar shows as `25/3000`, not `25/3000.0`; inf when unbounded)."""
        total = trainer.estimated_stepping_batches
        return int(total) if math.isfinite(total) else total

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        shown = {"train/loss": "loss", "val/loss": "val"}  # not v_num, not the rest
        return {label: metrics[name] for name, label in shown.items() if name in metrics}

    # no validation or sanity-check bars, in fit or in trainer.validate()

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass

    def on_validation_batch_start(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass

    # log lines above the bar, not through it

    def _init_progress(self, trainer: L.Trainer) -> None:
        super()._init_progress(trainer)
        if self.progress is not None and not self._rerouted:
            self._rerouted = _reroute_log_handlers()

    def _stop_progress(self) -> None:
        _restore_log_handlers(self._rerouted)
        self._rerouted = []
        super()._stop_progress()


def _reroute_log_handlers() -> list[tuple[logging.StreamHandler, Any]]:
    """While Rich's live display runs it replaces sys.stdout/stderr with proxies that print
    above the bar; Hydra's console handler still holds the real stream, and its lines would
    be drawn over by the bar. Point such handlers at the proxies; return what to restore."""
    from rich.file_proxy import FileProxy

    proxies = {
        id(p.rich_proxied_file): p for p in (sys.stdout, sys.stderr) if isinstance(p, FileProxy)
    }
    rerouted = []
    for handler in _stream_handlers():
        proxy = proxies.get(id(handler.stream))
        if proxy is not None:
            rerouted.append((handler, handler.setStream(proxy)))
    return rerouted


def _restore_log_handlers(rerouted: list[tuple[logging.StreamHandler, Any]]) -> None:
    for handler, stream in rerouted:
        handler.setStream(stream)


def _stream_handlers() -> Iterator[logging.StreamHandler]:
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            if type(handler) is logging.StreamHandler:  # not FileHandler (a subclass)
                yield handler


# ---------------------------------------------------------------------------------------------
# Progress lines for log files


class ProgressLines(Callback):
    """nanoGPT-style lines through the `lmlab` logger, which Hydra sends to train.log too:

        step 500/5000: train 1.9234, val 1.9512, val bpc 2.8150, 38 ms/step

    at every validation in fit, and a summary when training ends. ms/step is the time of
    the training steps since the previous line, without the validation's own time."""

    def __init__(self) -> None:
        self.best: tuple[float, int] | None = None  # (val/loss, step)
        self._start_step = 0
        self._train_seconds = 0.0
        self._line_step = 0
        self._line_seconds = 0.0
        self._since: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.best = None
        self._start_step = self._line_step = trainer.global_step
        self._train_seconds = self._line_seconds = 0.0
        self._since = time.perf_counter()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return  # lmlab-train reports the step-0 and final validations itself
        self._since = time.perf_counter()
        metrics = _floats(trainer.callback_metrics)
        step = trainer.global_step
        if (val := metrics.get("val/loss")) is not None and (
            self.best is None or val < self.best[0]
        ):
            self.best = (val, step)
        steps = step - self._line_step
        ms = 1000 * self._line_seconds / steps if steps > 0 else None
        self._line_step, self._line_seconds = step, 0.0
        if trainer.is_global_zero:
            log.info(progress_line(step, _max_steps(trainer), metrics, ms))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause()
        if trainer.is_global_zero:
            steps = trainer.global_step - self._start_step
            log.info(summary_line(trainer.global_step, steps, self._train_seconds, self.best))

    def _pause(self) -> None:
        """Add the training time since the last resume point to both clocks."""
        if self._since is not None:
            elapsed = time.perf_counter() - self._since
            self._train_seconds += elapsed
            self._line_seconds += elapsed
            self._since = None


def progress_line(
    step: int, max_steps: int | None, metrics: dict[str, float], ms_per_step: float | None
) -> str:
    """`step 500/5000: train 1.9234, val 1.9512, val bpc 2.8150, 38 ms/step`, with the
    figures that are there."""
    parts = [
        f"{label} {metrics[name]:.4f}"
        for name, label in (("train/loss", "train"), ("val/loss", "val"), ("val/bpc", "val bpc"))
        if name in metrics
    ]
    if ms_per_step is not None:
        parts.append(f"{ms_per_step:.0f} ms/step")
    of = f"/{max_steps}" if max_steps else ""
    return f"step {step}{of}: " + ", ".join(parts)


def summary_line(
    step: int, steps: int, train_seconds: float, best: tuple[float, int] | None
) -> str:
    """`trained 3000 steps to step 3000 in 0:01:54 (38 ms/step); best val 1.4823 at step
    2700`: the time is training time, without validations."""
    clock = time.strftime("%H:%M:%S", time.gmtime(train_seconds)).removeprefix("0")
    text = f"trained {steps} steps to step {step} in {clock}"
    if steps > 0:
        text += f" ({1000 * train_seconds / steps:.0f} ms/step)"
    if best is not None:
        text += f"; best val {best[0]:.4f} at step {best[1]}"
    return text


def _max_steps(trainer: L.Trainer) -> int | None:
    return trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {name: float(value) for name, value in metrics.items()}


def progress_callbacks(is_terminal: bool) -> list[Callback]:
    """The progress callbacks for a run: the lines always (they are what train.log keeps),
    the bar only on a terminal. Build the Trainer with `enable_progress_bar=is_terminal`, or
    Lightning adds a bar of its own."""
    lines: list[Callback] = [ProgressLines()]
    return [RunProgressBar(), *lines] if is_terminal else lines


# ---------------------------------------------------------------------------------------------
# The model summary without its FLOPs column


class PlainModelSummary(ModelSummary):
    """Lightning's model summary, logged as plain text, without the FLOPs column and total:
    Lightning counts FLOPs only through `example_input_array`, which lmlab's modules do not
    set, so the column is all zeros. (Neither ModelSummary nor RichModelSummary has an option
    to hide it in Lightning 2.6.)"""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        from lightning.pytorch.utilities.model_summary.model_summary import (
            _format_summary_table,
        )

        columns = [column for column in summary_data if column[0] != "FLOPs"]
        table = _format_summary_table(
            total_parameters,
            trainable_parameters,
            model_size,
            total_training_modes,
            total_flops,
            *columns,
        )
        lines = [line for line in table.splitlines() if not line.endswith("Total Flops")]
        log.info("\n" + "\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Third-party noise


class _DropMessages(logging.Filter):
    """Drops the records of one logger whose message starts with one of `prefixes`."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


# logger name -> the messages of its that say nothing about this run
_LOG_NOISE = {
    # Lightning's adverts for its cloud products, logged at INFO on every Trainer (Lightning
    # 2.6 has no setting for them). rank_zero_info logs through whichever of these modules'
    # loggers was imported last.
    **dict.fromkeys(
        (
            "lightning.pytorch.utilities.rank_zero",
            "lightning.fabric.utilities.rank_zero",
            "pytorch_lightning.utilities.rank_zero",
            "lightning_utilities.core.rank_zero",
        ),
        ("💡 Tip: For seamless cloud",),
    ),
    # Each trainer.save_checkpoint() without weights_only (the LR finder's own save, and the
    # save after a SIGTERM or Ctrl-C) says so; False is right there: a full checkpoint
    "lightning.pytorch.trainer.connectors.checkpoint_connector": (
        "`weights_only` was not set, defaulting to `False`.",
    ),
    # an Optuna study in a database migrates it through alembic, which logs `setup plugin ...`
    "alembic.runtime.plugins": ("setup plugin",),
}

# (message regex, category, module regex) of warnings that say nothing a user can act on
_WARNING_NOISE: tuple[tuple[str, type[Warning], str], ...] = (
    # torch >= 2.10 deprecates LeafSpec, which Lightning 2.6's _pytree still constructs
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        FutureWarning,
        r"lightning\.pytorch\.utilities\._pytree",
    ),
    # torch 2.4-2.5 warn on each torch.load without weights_only: Lightning's LR finder and
    # its restore after a SIGTERM reload checkpoints that this run itself has just written
    # (torch attributes the warning to its caller, Lightning's cloud_io)
    (
        r"You are using `torch\.load` with `weights_only=False`",
        FutureWarning,
        r"lightning\.fabric\.utilities\.cloud_io",
    ),
    # on a machine with SLURM installed (a cluster's login node), every run outside a job: lmlab
    # submits jobs through hydra/launcher=slurm, where srun starts the ranks itself
    (
        r"The `srun` command is available on your system but is not used",
        Warning,
        r"lightning\.fabric\.plugins\.environments\.slurm",
    ),
    # a run resumed in its own directory (lmlab.runs.resume) finds its checkpoints there
    (
        r"Checkpoint directory .* exists and is not empty",
        Warning,
        r"lightning\.pytorch\.callbacks\.model_checkpoint",
    ),
)


def quiet_third_party() -> None:
    """Filter the third-party messages above, each by its logger (or warning module) and its
    text, so that nothing else is hidden. Call it once at the start, after Hydra has set up
    logging; calling it again adds nothing.

    Also: Lightning's lines once, not twice (see `_drop_lightning_stderr_copy`); and no colour
    codes in a log file: NO_COLOR (honoured by colorlog, through which Optuna logs, and Rich)
    turns them off when stderr is no terminal."""
    for name, prefixes in _LOG_NOISE.items():
        logger = logging.getLogger(name)  # the same object the library logs through later
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(*prefixes))
    for message, category, module in _WARNING_NOISE:
        # filterwarnings drops an identical earlier filter, so this never piles up
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    if not sys.stderr.isatty():
        os.environ.setdefault("NO_COLOR", "1")
    _drop_lightning_stderr_copy()


def _drop_lightning_stderr_copy() -> None:
    """`import lightning` gives the `lightning` logger a stderr handler of its own (`INFO: ...`)
    and leaves it propagating: under Hydra each Lightning line then shows twice, once through
    Hydra's handlers (console and train.log) and once on stderr. When the root logger has
    handlers (Hydra's), Lightning's own copy goes; without them it stays, the only one."""
    import lightning

    own = getattr(lightning, "_console", None)
    lightning_logger = logging.getLogger("lightning")
    if own in lightning_logger.handlers and logging.getLogger().handlers:
        lightning_logger.removeHandler(own)
