"""lmlab's Hydra sweeper for Optuna 4: `override /hydra/sweeper: optuna` in a search config.

Hydra finds it by scanning the namespace package `hydra_plugins` (config.py registers the
config, optuna_sweeper.py the class); the search itself is in `_impl.py`, imported only when a
search starts, so that plain `lmlab-train` runs do not pay for importing Optuna."""
