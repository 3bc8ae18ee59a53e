"""The exceptions llmsup raises: one tree, each class carrying the exit code the
CLI ends with and the HTTP status the control API answers with.

    LlmsupError                     exit 1  HTTP 500
    ├── ManifestError               exit 2  HTTP 400  the manifest is invalid (every Problem)
    ├── BadRequest                  exit 2  HTTP 400  a request the control API cannot parse
    ├── DaemonError                 exit 1  HTTP 409  the daemon could not do what was asked
    │   ├── NoDaemonError           exit 3  HTTP 503  no daemon answers on the control socket
    │   ├── UnknownModel            exit 1  HTTP 404  no model or server by that name
    │   └── StateFormatError        exit 1  HTTP 409  a newer llmsup wrote the state directory
    ├── LaunchError                 exit 1  HTTP 500  a model's process could not be started
    ├── UnsafeRuntimeDir            exit 1  HTTP 500  the runtime dir is not ours alone
    ├── StepError                   exit 1  HTTP 502  a backend's post-start step failed
    ├── GpuUnavailable              exit 1  HTTP 503  no GPU information on this host
    ├── FitError                    exit 1  HTTP 500  a model directory tells too little
    └── GatewayError                exit 1  HTTP 502  what the gateway answers a client
        ├── ModelUnavailable        exit 1  HTTP 503  the model is FAILED, or stopped
        ├── ModelNotReady           exit 1  HTTP 503  the model is starting: retry later
        └── ApiError                exit 1  HTTP any  an answer in OpenAI's shape

The CLI catches LlmsupError in one place and prints it; the control API maps it to
`http_status` and `body()` in one middleware; anything else is a bug and keeps its
traceback (a 500 from the API).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


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
    http_status: int = 500

    def body(self) -> dict[str, Any]:
        """The control API's answer for it."""
        return {"error": str(self)}


class ManifestError(LlmsupError):
    exit_code = ExitCode.INVALID
    http_status = 400

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    def body(self) -> dict[str, Any]:
        return {"error": "manifest not valid", "problems": [str(p) for p in self.problems]}


class BadRequest(LlmsupError):
    exit_code = ExitCode.INVALID
    http_status = 400


class DaemonError(LlmsupError):
    http_status = 409


class NoDaemonError(DaemonError):
    exit_code = ExitCode.NO_DAEMON
    http_status = 503


class UnknownModel(DaemonError):
    http_status = 404


class StateFormatError(DaemonError):
    """The state directory, or a record in it, is of a format this llmsup cannot read
    (a newer llmsup's): nothing in it is signalled, removed or written."""


class LaunchError(LlmsupError):
    pass


class UnsafeRuntimeDir(LlmsupError):
    """The runtime directory is not ours alone: nothing is read from it or written to it."""


class StepError(LlmsupError):
    """A step after start (Ollama's pull or preload) failed."""

    http_status = 502


class GpuUnavailable(LlmsupError):
    """No GPU information at all on this host; the message is a one-line reason."""

    http_status = 503


class FitError(LlmsupError):
    """A model directory whose files cannot be read for an estimate."""


class GatewayError(LlmsupError):
    """What the gateway answers a client instead of a model's answer."""

    http_status = 502


class ModelUnavailable(GatewayError):
    """The model cannot serve (FAILED, or stopped and not on-demand): 503 with the reason,
    and no Retry-After (retrying cannot help until an operator acts), unless it may come
    back by itself (a remote model's upstreams, probed every `retry_after` seconds)."""

    http_status = 503

    def __init__(
        self, reason: str, *, stopped: bool = False, retry_after: int | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.stopped = stopped  # stopped on purpose, rather than broken
        self.retry_after = retry_after


class ModelNotReady(GatewayError):
    """The model is starting: the client gets 503 with Retry-After."""

    http_status = 503

    def __init__(self, reason: str, retry_after: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class ApiError(GatewayError):
    """An answer of the gateway in OpenAI's error shape, with any status."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = self.http_status = status
        self.message, self.type, self.code = message, type_, code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.type, "param": None, "code": self.code}
        return {"error": error}
