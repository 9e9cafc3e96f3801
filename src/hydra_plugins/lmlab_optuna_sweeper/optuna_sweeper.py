"""The Hydra `Sweeper` plugin class; the search lives in `_impl`, imported when it starts."""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class OptunaSweeper(Sweeper):
    """An Optuna study driven through Hydra's launcher: see `_impl.OptunaSearch`."""

    def __init__(self, **settings: Any) -> None:
        from ._impl import OptunaSearch  # Optuna is imported only when a search runs

        self._search = OptunaSearch(**settings)

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self._search.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        self._search.sweep(arguments)
