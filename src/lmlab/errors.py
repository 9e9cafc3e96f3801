"""User-facing errors: one message that says what was wrong and what to do."""

from __future__ import annotations

import operator
from typing import Any


class LmlabError(ValueError):
    """A problem with the user's input or configuration, reported without a traceback."""


def require_positive(config: Any, *names: str, prefix: str = "model") -> None:
    """Refuse a config whose fields `names` are not positive whole numbers."""
    for name in names:
        value = getattr(config, name)
        try:
            whole = not isinstance(value, bool) and operator.index(value) >= 1
        except TypeError:
            whole = False
        if not whole:
            raise LmlabError(f"{prefix}.{name} must be a positive integer, got {value!r}")
