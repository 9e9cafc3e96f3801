"""The search space: `hydra.sweeper.params` and command-line overrides, written in Hydra's
sweep syntax (`choice(...)`, `range(...)`, `interval(...)`, `tag(log, ...)`), parsed with
Hydra's public override parser and turned into Optuna distributions; and the other way, a
trial's parameters written back as overrides for its job."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    OverrideType,
    RangeSweep,
)
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from lmlab.errors import LmlabError

# A string value that the override grammar reads back as the same string without quotes.
_PLAIN = re.compile(r"[A-Za-z_][\w./\-@:]*")
_KEYWORDS = {"true", "false", "null", "nan", "inf"}


@dataclass
class SearchSpace:
    """What each trial's job gets: the searched keys (Optuna parameter name -> distribution,
    and the key as the override writes it, `+` included) and the fixed overrides, as given."""

    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    override_keys: dict[str, str] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """A trial's job overrides: the fixed ones, then `key=value` for each searched key."""
        keys = self.override_keys
        return [*self.fixed, *(f"{keys[k]}={format_value(params[k])}" for k in keys)]


def parse_search_space(params: dict[str, Any] | None, arguments: Iterable[str]) -> SearchSpace:
    """`params` (key -> sweep expression, from the config) then the command line's overrides;
    a key given twice takes its last value, so `model.n_layer=4` on the command line fixes a
    key that `params` searches. The searched keys keep the order of `params`."""
    lines = [f"{key}={value}" for key, value in (params or {}).items()]
    parsed = OverridesParser.create().parse_overrides([*lines, *arguments])
    by_key: dict[str, Override] = {}
    for override in parsed:
        name = _param_name(override)
        by_key[name] = override  # the last one wins, in the place of the first
    space = SearchSpace()
    # fixed overrides in the order given; each key once, with its last value
    space.fixed = [
        _as_given(o) for o in parsed if by_key[_param_name(o)] is o and not o.is_sweep_override()
    ]
    for name, override in by_key.items():
        if not override.is_sweep_override():
            continue
        if override.type == OverrideType.DEL:
            raise LmlabError(f"{override.input_line}: a deleted key (~) cannot be searched")
        space.distributions[name] = distribution(override)
        space.override_keys[name] = override.get_key_element()
    return space


def distribution(override: Override) -> BaseDistribution:
    """The Optuna distribution of one sweep override:

    - `choice(a, b, ...)` and `shuffle(range(...))`: categorical over the values;
    - `range(start, stop, step)`: the integers (or floats) of that grid, `stop` excluded as
      in Python and Hydra's basic sweeper;
    - `interval(low, high)`: a float in [low, high]; `tag(log, interval(...))` on a log
      scale; `tag(int, interval(...))` an integer (both tags: an integer on a log scale).
    """
    value = override.value()
    where = override.input_line or override.get_key_element()
    if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
        choices = list(override.sweep_iterator())
        bad = [c for c in choices if not isinstance(c, (str, int, float, bool, type(None)))]
        if bad:
            raise LmlabError(
                f"{where}: a choice must be a string, number, bool or null, not {bad[0]!r}"
            )
        return CategoricalDistribution(choices)
    if isinstance(value, RangeSweep):
        return _range(value, where)
    if isinstance(value, IntervalSweep):
        low, high, tags = value.start, value.end, set(value.tags)
        if low is None or high is None or not low < high:
            raise LmlabError(f"{where}: an interval needs low < high")
        if "log" in tags and low <= 0:
            raise LmlabError(f"{where}: a log-scale interval needs low > 0")
        if "int" in tags:
            return IntDistribution(math.ceil(low), math.floor(high), log="log" in tags)
        return FloatDistribution(float(low), float(high), log="log" in tags)
    raise LmlabError(
        f"{where}: not a search space Optuna can sample; use choice(...), range(...) or "
        "interval(...), optionally tag(log, interval(...))"
    )


def _range(value: RangeSweep, where: str) -> BaseDistribution:
    start, stop, step = value.start, value.stop, value.step
    if start is None or stop is None or not step or (stop - start) / step <= 0:
        raise LmlabError(f"{where}: an empty range")
    last = start + (math.ceil((stop - start) / step) - 1) * step  # the last value before stop
    if step < 0:  # Optuna's grids go upwards
        start, last, step = last, start, -step
    if all(isinstance(v, int) for v in (start, stop, step)):
        return IntDistribution(int(start), int(last), step=int(step))
    return FloatDistribution(float(start), float(last), step=float(step))


def _param_name(override: Override) -> str:
    """The key without `+`/`++`/`~` (`model.lr`, `db@pkg` for a group with a package)."""
    return override.get_key_element().lstrip("+~")


def _as_given(override: Override) -> str:
    """A fixed override as the user wrote it (its `+`, quoting and interpolations kept)."""
    if override.input_line is not None:
        return override.input_line
    return f"{override.get_key_element()}={override.get_value_element_as_str()}"


def format_value(value: Any) -> str:
    """A parameter value as an override value that Hydra parses back to the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _KEYWORDS:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
