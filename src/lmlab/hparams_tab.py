"""TensorBoard's HParams tab: the hyperparameters a run reports to its loggers, and the best
figures that go with them (one row per run of a sweep)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

from lmlab.runs.sweeps import is_multirun

# Data settings that change what is learned; paths, workers and seeds of the split do not.
DATA_KEYS = (
    "corpus",
    "path",
    "text_field",
    "tokenizer",
    "block_size",
    "batch_size",
    "examples",
    "stride",
    "train_fraction",
)
TRAINER_KEYS = ("max_steps", "precision", "accumulate_grad_batches", "gradient_clip_val")
# summary key -> the tag of its best value: the HParams tab shows the last value of each
# scalar, so the best ones need tags of their own, in a group that sorts after train/ and val/
# (TensorBoard opens on the first groups)
BEST_TAGS = {"val/loss": "val_best/loss", "val/bpc": "val_best/bpc", "val/bpb": "val_best/bpb"}


def run_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The model with its optimizer and schedule, the data and budget settings, the seed and
    the experiment, nested as in the config: the loggers flatten them (`model/n_embd`) and
    turn what TensorBoard cannot show into text. The whole config is in `.hydra/config.yaml`;
    the HParams tab needs the few keys worth comparing."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    params: dict[str, Any] = {
        "model": {k: v for k, v in model.items() if not k.startswith("_")},  # no _target_
        "data": {k: cfg.data.get(k) for k in DATA_KEYS if k in cfg.data},
        "trainer": {k: cfg.trainer.get(k) for k in TRAINER_KEYS if k in cfg.trainer},
        "seed": cfg.get("seed"),
    }
    # null means the default, random blocks (or what the deprecated data.sampling says)
    params["data"]["examples"] = cfg.data.get("examples") or cfg.data.get("sampling") or "random"
    if HydraConfig.initialized():
        params["experiment"] = HydraConfig.get().runtime.choices.get("experiment") or "none"
    return params


def flat_hparams(params: dict[str, Any], prefix: str = "") -> dict[str, bool | float | str]:
    """`{"model": {"n_embd": 64}}` -> `{"model/n_embd": 64}`, as TensorBoard's columns: None
    left out (no "null" column), a list as its items (`model/optimizer/betas/0`), numbers and
    booleans kept as such (a column TensorBoard can sort and plot)."""
    flat: dict[str, bool | float | str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{name}/"))
        elif isinstance(value, (list, tuple)):
            flat.update(flat_hparams(dict(enumerate(value)), f"{name}/"))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif value is not None:
            flat[name] = str(value)
    return flat


# Keys of a model config that are not its architecture.
NOT_ARCHITECTURE = ("name", "block_size", "compile", "optimizer", "scheduler")


def session_hparams(params: dict[str, Any]) -> dict[str, bool | float | str]:
    """The HParams tab's columns. TensorBoard shows the first five of them without ticking
    anything: those that differ between runs, by name. So the model's name is `model` (before
    any `model/...`) and `model/arch` sums up its own keys (`n_layer=4 n_head=4 n_embd=128`):
    a sweep over models shows each model's architecture in one column, next to its name."""
    flat = flat_hparams(params)
    model = params.get("model") or {}
    columns: dict[str, bool | float | str] = {}
    if "model/name" in flat:
        columns["model"] = flat.pop("model/name")
    own = [f"{k}={v}" for k, v in model.items() if k not in NOT_ARCHITECTURE and v is not None]
    if own:
        columns["model/arch"] = " ".join(own)
    return {**columns, **flat}


def best_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The run's best validation figures under their own tags (finite values only)."""
    best = summary.get("best") or {}
    values = {tag: best.get(key, summary.get(key)) for key, tag in BEST_TAGS.items()}
    return {
        t: float(v) for t, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)
    }


def trial_name(output_dir: str | Path) -> str:
    """A short, readable trial ID for the HParams table, unique across sweeps: the job number
    and the sweep's random suffix (`2 · 3fa9c1`) for a sweep job, the run's suffix otherwise.
    The full name is the run column; this one is what fits the table's first column."""
    path = Path(output_dir)
    if is_multirun():
        number = path.name.split("_", 1)[0]
        return f"{number} · {path.parent.name.rsplit('_', 1)[-1]}"
    return path.name.rsplit("_", 1)[-1]


def log_final_hparams(
    loggers: list[Logger],
    params: dict[str, Any],
    summary: dict[str, Any],
    step: int,
    output_dir: str | Path,
) -> None:
    """At the end of training: the best figures as scalars, and the run's hyperparameters as
    an HParams session (TensorBoard lists a run there only once it has both).

    Each run writes its session, never an experiment definition: TensorBoard then builds one
    for all the runs it is shown, with the union of their keys, the keys that differ between
    runs (what a sweep varies) first, and every scalar as a metric. A definition written by
    each run would be picked from one arbitrary run, and hide the others' keys."""
    metrics = best_metrics(summary)
    if not metrics:
        return
    start = plugin_data_pb2.SessionStartInfo(group_name=trial_name(output_dir))
    for name, value in session_hparams(params).items():
        field = {bool: "bool_value", str: "string_value"}.get(type(value), "number_value")
        setattr(start.hparams[name], field, value)
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS)
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            writer = logger.experiment  # fit closed it: writing reopens an event file
            for tag, value in metrics.items():
                writer.add_scalar(tag, value, global_step=step)
            writer.file_writer.add_summary(_summary(session_start_info=start), step)
            writer.file_writer.add_summary(_summary(session_end_info=end), step)
            writer.close()


def _summary(**info: Any) -> Summary:
    """A session's start or end as the event TensorBoard's HParams plugin reads (what
    tensorboard.plugins.hparams.summary builds, without the TensorFlow that module imports)."""
    (field,) = info
    tag = {"session_start_info": metadata.SESSION_START_INFO_TAG}.get(
        field, metadata.SESSION_END_INFO_TAG
    )
    content = plugin_data_pb2.HParamsPluginData(**info)
    return Summary(
        value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(content))]
    )
