"""The contract every backend implements (`Backend`), and what backends share.

A backend owns one kind of server: its manifest fields (a pydantic class on
`fields.ModelBase`), how its models become a `Launch` (argv, env, the path
probed for readiness and liveness), its checks of one model and of one server,
what it claims of the GPUs, its steps after the start (and what liveness means
beyond the probe path), and what its log lines say. `llmsup.backends.REGISTRY`
names them; the manifest, the plan and the supervisor ask the registry, never a
backend by name. Pure, except where noted.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from llmsup.backends.launch import Launch
from llmsup.backends.vllm_flags import FlagTable, for_path
from llmsup.errors import Problem
from llmsup.fields import ModelBase
from llmsup.yamlsrc import KeyPath

if TYPE_CHECKING:  # aiohttp is for the daemon: checking a manifest does without it
    import aiohttp

    from llmsup.probe import ProbeResult

# Environment variables that load code into any process (the dynamic linker,
# Python's startup): a confined backend must run its own engine only.
CODE_ENV = frozenset(
    {"LD_PRELOAD", "LD_AUDIT", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME", "PYTHONUSERBASE",
     "BASH_ENV", "ENV", "PATH", "VLLM_PLUGINS"}
)  # fmt: skip
# uvicorn's last line before the port accepts (about 10 ms later in vLLM 0.32).
LISTENING_SOON = "Application startup complete."


class Locator(Protocol):
    """Where a key path is in the manifest file (`manifest.LoadedManifest` is one)."""

    def problem(
        self, path: KeyPath, message: str, severity: str = "error", *, key: bool = False
    ) -> Problem: ...


@dataclass(frozen=True)
class GpuClaim:
    """What one model asks of the GPUs."""

    gpus: tuple[int | str, ...]  # the GPUs it runs on, as the manifest names them
    share: float | None = None  # the share of each one's memory it takes (vLLM)
    free: int = 0  # bytes it needs free on the first one before a start (Ollama)


@dataclass(frozen=True)
class GpuLoad:
    """The most the models that claim shares of one GPU ask of it at once."""

    peak: float  # the always-on models' shares plus the largest on-demand one
    users: tuple[str, ...]  # those models


@dataclass(frozen=True)
class Http:
    """How a backend's steps reach its running server."""

    session: aiohttp.ClientSession  # the daemon's
    base: str  # http://host:port


class Context:
    """What checks know beyond the manifest: the flags of the vLLM on `path` (the
    daemon's PATH), looked up on first use (see `vllm_flags.for_path`); `one_host`:
    the servers run on this host (False: exported to a cluster, where a model may
    span nodes)."""

    def __init__(
        self,
        vllm_flags: FlagTable | None = None,
        path: str | None = None,
        *,
        one_host: bool = True,
    ) -> None:
        self._vllm_flags = vllm_flags
        self._path = path
        self.one_host = one_host

    @property
    def vllm_flags(self) -> FlagTable:
        if self._vllm_flags is None:
            self._vllm_flags = for_path(self._path)
        return self._vllm_flags

    @property
    def vllm_flags_used(self) -> FlagTable | None:
        """The table checks were given or looked up; None when none was needed."""
        return self._vllm_flags


S = TypeVar("S", bound=ModelBase)


class Backend(ABC, Generic[S]):
    """One kind of server. Subclasses set `name` (the manifest's `backend:` tag)
    and `model` (its pydantic class, whose `backend` field is that tag)."""

    name: str
    model: type[S]
    confined = True  # runs its own engine only (`command` runs any program)
    runs_here = True  # False: served on other hosts, planned apart (`remote`)

    # ---------------------------------------------------------------- launches

    def server_key(self, name: str, spec: S, host: str) -> Hashable:
        """Models with equal keys share one server (Ollama); by default, none do."""
        return name

    @abstractmethod
    def build(self, names: Sequence[str], specs: Sequence[S], host: str, *, first: bool) -> Launch:
        """The server of `names` (one model, or those of one `server_key`); `first`:
        the first server of this backend in the manifest."""

    @abstractmethod
    def served_names(self, spec: S) -> list[str]:
        """The names clients ask for to reach this model."""

    def served_key(self, spec: S) -> str:
        """The key a duplicate served name is reported at."""
        return "model"

    def executable_key(self) -> KeyPath:
        """Where a model's entry names the executable (below `models.NAME`)."""
        return ("backend",)

    # ------------------------------------------------------------------ checks

    def check(self, at: Locator, name: str, spec: S, ctx: Context) -> list[Problem]:
        """The problems of one model on its own, located by `at`."""
        return self.check_env(at, name, spec)

    def owned_env(self, spec: S) -> dict[str, str]:
        """Variables llmsup sets from a field (variable -> the field to set instead)."""
        return {}

    def check_env(self, at: Locator, name: str, spec: S) -> list[Problem]:
        out = []
        owned = {"CUDA_VISIBLE_DEVICES": "gpus", "CUDA_DEVICE_ORDER": "gpus"} if spec.gpus else {}
        owned.update(self.owned_env(spec))
        for var in spec.env:
            path = ("models", name, "env", var)
            if var in CODE_ENV and self.confined:
                msg = (
                    f"{var} would change which code the server loads or runs; a "
                    f"{self.name} entry runs {self.name} only (use `backend: command`)"
                )
                out.append(at.problem(path, msg, key=True))
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var):
                msg = f"{var!r} is not a valid environment variable name"
                out.append(at.problem(path, msg, key=True))
        for var, fld in owned.items():
            if var in spec.env:
                msg = f"{var} is set by llmsup from {fld}; set that"
                out.append(at.problem(("models", name, "env", var), msg))
        return out

    def check_group(self, at: Locator, names: Sequence[str], specs: Sequence[S]) -> list[Problem]:
        """The problems of the models that share one server."""
        return []

    def check_beside(
        self, at: Locator, name: str, spec: S, loads: Mapping[str, GpuLoad]
    ) -> list[Problem]:
        """The problems of a model beside what others claim of the GPUs (GPU id -> load)."""
        return []

    def check_files(self, at: Locator, name: str, spec: S) -> list[Problem]:
        """The files a model names, checked when the manifest loads (effect: reads)."""
        return []

    def untrusted(self, at: Locator, name: str, spec: S) -> list[Problem]:
        """What a manifest from an untrusted place may not ask for."""
        if self.confined:
            return []
        msg = f"a {self.name} backend runs any program: refused for an untrusted manifest"
        return [at.problem(("models", name, "backend"), msg)]

    def checked_against(self, ctx: Context) -> dict[str, Any]:
        """What the checks of its models were made against, for `plan --json`."""
        return {}

    # -------------------------------------------------------------------- GPUs

    def gpu_claim(self, spec: S) -> GpuClaim:
        return GpuClaim(tuple(spec.gpus))

    # ----------------------------------------------------- after the start

    def steps(self, launch: Launch) -> list[str]:
        """What happens once the port answers, before the server counts as ready."""
        return []

    async def post_start(
        self, launch: Launch, http: Http, report: Callable[[str], None], timeout: float
    ) -> str | None:
        """Carry out `steps` (effect: HTTP; `timeout` for a step that loads a model),
        telling `report` how far they have come; None when done, else why not."""
        return None

    async def liveness(self, launch: Launch, http: Http, timeout: float) -> ProbeResult | None:
        """Once the probe path answered 200, what else a live server must pass (effect:
        HTTP); the result stands for the probe's. None: nothing else."""
        return None

    # ---------------------------------------------------------------- its log

    def phase(self, line: str) -> str | None:
        """How far a start has come, by a line of the server's log."""
        return None

    def exit_hint(self, line: str) -> str | None:
        """What a log line says about the server's coming exit, if anything."""
        return None

    def listening_soon(self, line: str) -> bool:
        """The server printed its last line before it accepts connections: probe now."""
        return LISTENING_SOON in line
