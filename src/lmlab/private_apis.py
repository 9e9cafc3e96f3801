"""Every private name of another package that lmlab uses, in one place.

Each is a hook that the package has no public way to set. They are looked up here when this
module is imported (only by code that already needs Lightning), so that a Lightning release
that moved one fails at once with the versions it was checked on, not halfway through a run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning
from lightning.pytorch.strategies.launchers import subprocess_script
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

from lmlab.errors import LmlabError

CHECKED_ON = "lightning 2.4, 2.5 and 2.6"

# Lightning's DDP launcher asks this function for the command line of each extra process
# when the script runs under Hydra; there is no argument or hook to pass one in.
_DDP_COMMAND_HOOK = "_hydra_subprocess_cmd"
# Where the Trainer notes a SIGTERM; Ctrl-C sets it too, to stop between steps the same way.
_SIGTERM_FLAG = "received_sigterm"

if not callable(getattr(subprocess_script, _DDP_COMMAND_HOOK, None)) or not hasattr(
    _SignalConnector(None),
    _SIGTERM_FLAG,  # type: ignore[arg-type]
):
    raise LmlabError(
        f"lightning {lightning.__version__} lacks a private name lmlab relies on "
        f"(lmlab/private_apis.py); lmlab supports {CHECKED_ON}: pip install 'lightning<2.7'"
    )


def set_ddp_process_command(command: Callable[[int], tuple[Sequence[str], str]]) -> None:
    """Make Lightning's DDP launcher start process `local_rank` with `command(local_rank)`,
    which returns (argv, working directory)."""
    setattr(subprocess_script, _DDP_COMMAND_HOOK, command)


def note_sigterm(trainer: Any) -> None:
    """Make the Trainer behave as if it had received SIGTERM: it stops after this step."""
    setattr(trainer._signal_connector, _SIGTERM_FLAG, True)
