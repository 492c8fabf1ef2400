"""The error hierarchy.

Every error a user can cause is a `Kd2EdgeError`: the CLI prints its message as one
line and exits with its `exit_code`. Messages say what is wrong *and what to change*.
Anything else escaping to the CLI is a bug and shows a traceback.
"""

from __future__ import annotations


class Kd2EdgeError(Exception):
    """Base class of user-facing errors (one line, non-zero exit)."""

    exit_code = 1


class ConfigError(Kd2EdgeError):
    """A run config, flag or profile is invalid. Holds every problem found at once."""

    exit_code = 2

    def __init__(self, problems: list[str] | str, source: str = "config"):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        super().__init__(f"{source}: " + "; ".join(self.problems))


class ProfileError(ConfigError):
    """A device profile is unknown or malformed."""


class DataError(Kd2EdgeError):
    """A dataset is missing, empty or in the wrong format."""

    exit_code = 3


class ModelError(Kd2EdgeError):
    """A model path or id cannot be loaded, or two models don't fit together."""

    exit_code = 4


class OfflineError(ModelError):
    """A hub id was given but the hub cannot be reached."""


class ArtifactError(Kd2EdgeError):
    """An artifact folder is missing, incomplete or of the wrong kind."""

    exit_code = 5


class ResourceError(Kd2EdgeError):
    """Not enough disk or memory, or an output folder that cannot be written."""

    exit_code = 6


class BudgetError(Kd2EdgeError):
    """A measured figure misses the device profile's budget (the gate)."""

    exit_code = 7


class StageError(Kd2EdgeError):
    """A stage ran but its self-check failed (parity, reconstruction error, ...)."""

    exit_code = 8


class LaunchFailed(Kd2EdgeError):
    """A command started in several processes (`kd2edge.distributed.launch`) failed.

    The process that failed printed its own one-line error; the CLI exits with its code and prints
    nothing more.
    """

    def __init__(self, exit_code: int):
        self.exit_code = exit_code
        super().__init__(f"a launched process failed with exit code {exit_code}: its error is printed above")


class Interrupted(Kd2EdgeError):
    """The run was stopped by a signal; the message says how to resume."""

    exit_code = 130
