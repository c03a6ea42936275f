"""The errors a user can fix, as the library raises them; only the command lines (tmass/cli.py) turn them into
one line on rank 0 and an exit code.

    ConfigError  a flag, a config or DeepSpeed JSON, or a path a flag names is wrong: exit 2
    DataError    the contents of shards, checkpoints or a run directory are unusable: exit 1
"""

from __future__ import annotations


class TmassError(Exception):
    """An error with a message that names its fix; `exit_code` is what the command line returns."""

    exit_code = 1


class ConfigError(TmassError, ValueError):
    exit_code = 2


class DataError(TmassError):
    exit_code = 1
