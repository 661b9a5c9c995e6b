"""Errors a user can cause and fix. The command lines (`loraland`, `python -m jobs train`, ...) turn these,
and only these, into one line per problem and exit status 2; any other exception is a bug and keeps its
traceback.

Raise the most specific class; each message names the field, value or resource and how to fix it.
"""

from __future__ import annotations

import sys
from typing import TextIO

USER_ERROR_EXIT = 2


class UserError(Exception):
    """Something the user can fix (a config, a name, a path, a server address); `lines()` is what is shown."""

    def lines(self) -> list[str]:
        """One line per problem, as the CLI prints them after `error: `."""
        return [str(self.args[0]) if self.args else type(self).__name__]


class ConfigError(UserError, ValueError):
    """A user's config is wrong; `problems` holds one line per problem, each naming the field.

    Also a ValueError, so pydantic validators and callers that expect one keep working."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))

    def lines(self) -> list[str]:
        return [f"{self.source}: {p}" for p in self.problems]


class NotFound(UserError, KeyError):
    """A named thing does not exist: a task, base model, experiment, model version, adapter or file."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else type(self).__name__


class Unreachable(UserError, ConnectionError):
    """A service the command needs does not answer (the tracking server, a Ray cluster, the storage path)."""


class Conflict(UserError, RuntimeError):
    """The request clashes with existing state: an output folder of another job, a sweep run by another driver."""


class DeviceUnavailable(UserError, RuntimeError):
    """The requested device (e.g. `device: cuda`) is not available on this machine."""


def print_user_error(error: UserError, stream: TextIO | None = None) -> int:
    """Print `error: <line>` per problem on stderr (or `stream`) and return the exit status for user errors."""
    for line in error.lines():
        print(f"error: {line}", file=stream or sys.stderr)
    return USER_ERROR_EXIT
