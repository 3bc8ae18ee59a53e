"""The exceptions llmsup raises, and the exit codes the CLI maps them to.

    LlmsupError
    ├── ManifestError        the manifest is invalid (carries every Problem found)
    ├── DaemonError          the daemon could not do what was asked
    │   └── NoDaemonError    no daemon answers on the control socket
    └── LaunchError          a model's process could not be started

The CLI catches LlmsupError in one place and prints it; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ExitCode(enum.IntEnum):
    OK = 0
    FAILURE = 1
    INVALID = 2
    NO_DAEMON = 3
    INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C


@dataclass(frozen=True)
class Problem:
    """One finding about a manifest, located in its file."""

    file: str
    line: int
    column: int
    path: str
    message: str
    severity: str = "error"  # "error" | "warning" | "note"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}"
        prefix = "" if self.severity == "error" else f"{self.severity}: "
        key = f"{self.path}: " if self.path else ""
        return f"{where}: {prefix}{key}{self.message}"


class LlmsupError(Exception):
    exit_code: ExitCode = ExitCode.FAILURE


class ManifestError(LlmsupError):
    exit_code = ExitCode.INVALID

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]


class DaemonError(LlmsupError):
    pass


class NoDaemonError(DaemonError):
    exit_code = ExitCode.NO_DAEMON


class LaunchError(LlmsupError):
    pass
