"""The `remote` backend: a model served on other hosts, reached through this host's
gateway at one or more OpenAI-compatible base URLs (another llmsup gateway, a vLLM
server, any OpenAI-compatible server).

It owns no process, GPU or port here: the plan lists it apart from the launches
(`Plan.remotes`, each a `Remote`), and the gateway process probes its upstreams and
routes to them (llmsup.gateway.remote). Every field of a model entry that is about a
process here (gpus, env, restart, ...) is an error on a remote model.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, model_validator

from llmsup.backends.base import Backend, Context, Locator
from llmsup.backends.launch import Launch, SecretRef
from llmsup.errors import Problem
from llmsup.fields import ApiKey, Duration, ModelBase, ServedName

NAME = "remote"
DEFAULT_READ_TIMEOUT = 300.0  # s, as the gateway allows a local server between two chunks
# ModelBase's fields about a process on this host, and health's about starting one.
NOT_HERE = ("gpus", "host", "env", "restart", "stop_timeout", "start", "idle_timeout", "exclusive")
HEALTH_NOT_HERE = ("startup_timeout", "deep_probe", "deep_interval", "gpu_wait")


def parse_url(value: str) -> str:
    """An upstream's base URL, normalized (no trailing slash): http(s)://host[:port][/prefix].
    No credentials (the URL shows in status and metrics), query or fragment."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port  # ValueError when it is no number in 0-65535
    except ValueError as e:
        raise ValueError(f"{value!r} is not a well-formed URL: {e}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"must be an http:// or https:// base URL such as http://gpu-b:9000, got {value!r}"
        )
    if port == 0:
        raise ValueError(f"port 0 cannot be reached, got {value!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "must not hold credentials (the URL shows in status and metrics): "
            "give the key as api_key or api_key_file"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"must be a base URL without ?query or #fragment, got {value!r}")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        base = f"{parts.scheme}://{parts.netloc}{path[:-3]}"
        raise ValueError(f"give the base without /v1 ({base}): requests add /v1/... to it")
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{path}"


UpstreamUrl = Annotated[str, AfterValidator(parse_url)]


class RemoteModel(ModelBase):
    backend: Literal["remote"] = Field(description="served on other hosts, through the gateway")
    urls: list[UpstreamUrl] = Field(
        min_length=1,
        description="OpenAI-compatible base URLs of its upstreams (http://gpu-b:9000); "
        "requests go to the healthy ones",
    )
    served_name: ServedName = Field(
        None, description="the name(s) the upstreams serve it as, which clients ask for "
        "(default: the model's key)"
    )  # fmt: skip
    api_key: ApiKey = Field(None, description="sent to the upstreams as `Authorization: Bearer`")
    api_key_file: str | None = Field(None, description="file holding that key (instead of api_key)")
    read_timeout: Duration | None = Field(
        None,
        gt=0,
        description="an upstream's answer that sends nothing for this long is cut: 504 "
        "before its first byte reached the client, the SSE error event after (default 5m)",
    )

    # Set, these are errors (`Remote.check`); not offered by "unknown key" hints.
    inapplicable: ClassVar[frozenset[str]] = frozenset(NOT_HERE)

    @model_validator(mode="after")
    def _one_key_source(self) -> RemoteModel:
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("set api_key or api_key_file, not both")
        return self


@dataclass(frozen=True)
class Remote:
    """One remote model as the gateway routes to it (the plan's counterpart of a
    `Launch`): its upstreams, their key, how they are probed."""

    name: str  # the model's key in the manifest
    served_names: tuple[str, ...]  # what clients ask for, and the upstreams serve
    urls: tuple[str, ...]
    api_key: SecretRef | None
    interval: float  # s between probes of each upstream
    timeout: float  # of one probe, and of connecting to an upstream
    failures: int  # failed probes in a row that make an upstream down
    read_timeout: float

    def resolved(self) -> Remote:
        """With its key read now (a file's may change); OSError when it cannot be."""
        if self.api_key is None or self.api_key.file is None:
            return self
        return replace(self, api_key=SecretRef(value=self.api_key.read()))

    @property
    def key(self) -> str | None:
        return self.api_key.read() if self.api_key is not None else None


def served_names(name: str, m: RemoteModel) -> list[str]:
    if m.served_name is None:
        return [name]
    return [m.served_name] if isinstance(m.served_name, str) else list(m.served_name)


def build(name: str, m: RemoteModel, *, interval: float, timeout: float, failures: int) -> Remote:
    key = None
    if m.api_key is not None:
        key = SecretRef(value=m.api_key.get_secret_value())
    elif m.api_key_file is not None:
        key = SecretRef(file=m.api_key_file)
    return Remote(
        name=name,
        served_names=tuple(served_names(name, m)),
        urls=tuple(m.urls),
        api_key=key,
        interval=interval,
        timeout=timeout,
        failures=failures,
        read_timeout=m.read_timeout or DEFAULT_READ_TIMEOUT,
    )


def check(at: Locator, name: str, m: RemoteModel) -> list[Problem]:
    """Fields about a process here, and a URL listed twice."""
    out = []
    where = "its servers run on the hosts of its urls and are supervised there"
    for field in NOT_HERE:  # by value: a copy that set one to its default is fine
        if getattr(m, field) != RemoteModel.model_fields[field].get_default(
            call_default_factory=True
        ):
            msg = f"`{field}` does not apply to a remote model ({where}); remove it"
            out.append(at.problem(("models", name, field), msg, key=True))
    for field in HEALTH_NOT_HERE:
        if getattr(m.health, field) is not None:
            msg = (
                f"`health.{field}` does not apply to a remote model: its upstreams are "
                "probed with GET /v1/models (interval, timeout, failures)"
            )
            out.append(at.problem(("models", name, "health", field), msg, key=True))
    seen: dict[str, int] = {}
    for i, url in enumerate(m.urls):
        if url in seen:
            msg = f"{url} is listed twice (urls[{seen[url]}]): each upstream once"
            out.append(at.problem(("models", name, "urls", i), msg))
        seen.setdefault(url, i)
    return out


def points_at(url: str, host: str, port: int) -> bool:
    """`url` reaches host:port on this machine (a gateway's own address)."""
    parts = urlsplit(url)
    default = 443 if parts.scheme == "https" else 80
    if (parts.port or default) != port or parts.hostname is None:
        return False
    return parts.hostname == host or (_local(parts.hostname) and _local(host))


def _local(host: str) -> bool:
    if host in ("localhost", "0.0.0.0", "::", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RemoteBackend(Backend[RemoteModel]):
    """A remote model is planned apart (`llmsup.plan` builds its `Remote`): there is
    no `Launch` to build, no GPU to claim, no log to read."""

    name = NAME
    model = RemoteModel
    runs_here = False

    def build(
        self, names: Sequence[str], specs: Sequence[RemoteModel], host: str, *, first: bool
    ) -> Launch:
        raise TypeError(f"{', '.join(names)}: a remote model has no server to launch here")

    def served_names(self, spec: RemoteModel) -> list[str]:
        # Its key is the default name, which the spec alone does not know: the plan
        # checks clashes with `remote_names`.
        if spec.served_name is None:
            return []
        return [spec.served_name] if isinstance(spec.served_name, str) else list(spec.served_name)

    def served_key(self, spec: RemoteModel) -> str:
        return "served_name" if spec.served_name else "backend"

    def check(self, at: Locator, name: str, spec: RemoteModel, ctx: Context) -> list[Problem]:
        return check(at, name, spec)

    def check_files(self, at: Locator, name: str, spec: RemoteModel) -> list[Problem]:
        if spec.api_key_file and not Path(spec.api_key_file).is_file():
            msg = f"no such file: {spec.api_key_file} (create it with the key, mode 0600)"
            return [at.problem(("models", name, "api_key_file"), msg)]
        return []
