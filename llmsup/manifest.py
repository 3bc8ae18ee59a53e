"""The manifest (`models.yaml`): schema, loading, and located errors.

`load_manifest(path)` returns a validated `Manifest` or raises `ManifestError`
carrying every problem of the file at once, each with `file:line:column` and
the key path. No effects beyond reading the file (and the files it names).
The top level lives here; each model entry's fields belong to its backend
(`llmsup.backends.REGISTRY`), the fields they share to `llmsup.fields`.
"""

from __future__ import annotations

import difflib
import os
import types
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, Field, SecretStr, ValidationError

from llmsup.backends import REGISTRY
from llmsup.errors import ManifestError, Problem
from llmsup.fields import (
    Duration,
    HealthOverride,
    ModelBase,
    ModelName,
    Port,
    RestartOverride,
    RestartPolicyName,
    Size,
    Strict,
)
from llmsup.fields import parse_duration as parse_duration  # re-exported
from llmsup.fields import parse_model_len as parse_model_len  # re-exported
from llmsup.fields import parse_size as parse_size  # re-exported
from llmsup.paths import default_manifest_path as default_manifest_path  # re-exported
from llmsup.yamlsrc import KeyPath, Source, dotted, read_yaml

# ------------------------------------------------------------------- policies


class Health(Strict):
    """A model's health settings, resolved: its own, else `defaults.health`, else these."""

    interval: float = Field(10.0, description="seconds between liveness probes")
    timeout: float = Field(5.0, description="timeout of one probe, seconds")
    failures: int = Field(3, description="failed probes in a row = unhealthy")
    startup_timeout: float = Field(1200.0, description="deadline to become ready, seconds")
    deep_probe: bool = Field(False, description="also send a 1-token completion")
    deep_interval: float = Field(60.0, description="seconds between deep probes")
    gpu_wait: float = Field(300.0, description="seconds a start waits for free GPU memory")


class Restart(Strict):
    """A model's restart settings, resolved: its own, else `defaults.restart`, else these."""

    policy: RestartPolicyName = Field("on-failure", description="always, on-failure or never")
    backoff_initial: float = Field(5.0, description="delay before the first restart, seconds")
    backoff_max: float = Field(300.0, description="cap of the doubling restart delay, seconds")
    max_restarts: int = Field(5, description="restarts within `window` before FAILED")
    window: float = Field(600.0, description="the period max_restarts counts over, seconds")


class LogSettings(Strict):
    max_size: Size = Field(50 * 2**20, description="rotate a server's log at this size (50M)")
    backups: int = Field(3, ge=0, description="rotated log files kept per server")


class Defaults(Strict):
    """Settings every model gets unless it sets its own."""

    host: str = Field("127.0.0.1", description="address servers listen on (0.0.0.0: all)")
    health: HealthOverride = Field(HealthOverride(), description="readiness and liveness probes")
    restart: RestartOverride = Field(RestartOverride(), description="restart policy and backoff")
    stop_timeout: Duration = Field(30.0, description="grace between SIGTERM and SIGKILL")
    log: LogSettings = Field(LogSettings(), description="servers' log files under state_dir/logs")


# --------------------------------------------------------------------- models

# A model entry is the class of the backend its `backend:` names.
BACKENDS: dict[str, type[ModelBase]] = {name: b.model for name, b in REGISTRY.items()}
if TYPE_CHECKING:
    AnyModel = ModelBase
else:
    AnyModel = Annotated[Union[tuple(BACKENDS.values())], Field(discriminator="backend")]  # noqa: UP007
_NAMES = list(BACKENDS)
ONE_OF = ", ".join(_NAMES)  # "vllm, ollama, command, remote"
_EITHER = f"{', '.join(_NAMES[:-1])} or {_NAMES[-1]}"  # "vllm, ollama, command or remote"


def _key_not_empty(v: SecretStr) -> SecretStr:
    if not v.get_secret_value().strip():
        raise ValueError(
            "the key is empty (after ${VAR} expansion), which would let every client "
            "in: set the variable to a key of your own, or remove the entry"
        )
    return v


GatewayKey = Annotated[SecretStr, AfterValidator(_key_not_empty)]


class Gateway(Strict):
    """One OpenAI-compatible endpoint for every model."""

    host: str = Field("127.0.0.1", description="address the gateway listens on")
    port: Port = Field(description="port the gateway listens on")
    api_keys: list[GatewayKey] = Field(
        default_factory=list, description="keys clients send as `Authorization: Bearer`"
    )
    api_key_file: str | None = Field(None, description="file with one key per line")
    aliases: dict[str, str] = Field(
        default_factory=dict, description="extra model names -> a served name"
    )
    max_body: Size = Field(8 * 2**20, description="larger request bodies get 413")
    start_wait: Duration = Field(
        120.0, description="how long a request waits for an on_demand model to start"
    )
    max_connections: int | None = Field(
        None,
        ge=1,
        description="client connections at once (more get 503); default: what the "
        "daemon's open-files limit allows after a reserve for supervision",
    )
    header_timeout: Duration = Field(
        60.0, gt=0, description="a request's headers must arrive within this, or it is closed"
    )
    body_timeout: Duration = Field(
        60.0, gt=0, description="a request's body must arrive within this, or it gets 408"
    )
    keepalive_timeout: Duration = Field(
        75.0, gt=0, description="an idle keep-alive connection is closed after this"
    )


class Control(Strict):
    """The control socket: 0600 for the daemon's user, 0660 with a group."""

    group: str | None = Field(None, description="group allowed to use the llmsup CLI")


class Manifest(Strict):
    """A validated manifest. `source` keeps positions for cross-model checks."""

    version: Literal[1] = Field(1, description="manifest format version")
    state_dir: str | None = Field(
        None, description="control socket, logs, process records (default /var/lib/llmsup)"
    )
    control: Control = Field(Control(), description="who may use the control socket")
    defaults: Defaults = Field(Defaults(), description="settings every model inherits")
    gateway: Gateway | None = Field(None, description="an OpenAI-compatible router")
    models: dict[ModelName, AnyModel] = Field(
        description=f"model name -> its server (backend: {_EITHER})"
    )

    def health(self, name: str) -> Health:
        return _resolve(Health, self.defaults.health, self.models[name].health)

    def restart(self, name: str) -> Restart:
        return _resolve(Restart, self.defaults.restart, self.models[name].restart)

    def stop_timeout(self, name: str) -> float:
        """A model's grace between SIGTERM and SIGKILL; the default for a name this
        manifest no longer has (a leftover of an earlier one)."""
        own = self.models[name].stop_timeout if name in self.models else None
        return self.defaults.stop_timeout if own is None else own

    def host(self, name: str) -> str:
        return self.models[name].host or self.defaults.host


_T = TypeVar("_T", bound=BaseModel)


def _resolve(cls: type[_T], *layers: BaseModel) -> _T:
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update({k: v for k, v in layer.model_dump().items() if v is not None})
    return cls(**merged)


# -------------------------------------------------------------------- loading


class LoadedManifest:
    """A manifest with where it came from (for located cross-model problems)."""

    def __init__(self, manifest: Manifest, source: Source, path: Path) -> None:
        self.manifest = manifest
        self.source = source
        self.path = path

    def problem(
        self, path: KeyPath, message: str, severity: str = "error", *, key: bool = False
    ) -> Problem:
        pos = self.source.pos(path, key=key)
        return Problem(self.source.file, pos.line, pos.column, dotted(path), message, severity)


SECRET_KEYS = frozenset({"api_key", "api_keys"})


def load_manifest(path: str | Path, env: Mapping[str, str] | None = None) -> LoadedManifest:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(
            [Problem(str(path), 1, 1, "", "no such file (pass -f FILE or set LLMSUP_MANIFEST)")]
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError([Problem(str(path), 1, 1, "", f"cannot read: {e}")]) from None
    return parse_manifest(text, str(path), env)


def parse_manifest(
    text: str, file: str = "models.yaml", env: Mapping[str, str] | None = None
) -> LoadedManifest:
    env = os.environ if env is None else env
    src = read_yaml(text, file, env)
    problems = [_located(src, p, m, pos.line, pos.column) for p, m, pos in src.problems]
    if problems and src.data is None:
        raise ManifestError(problems)
    if src.data is None:
        raise ManifestError(
            [Problem(file, 1, 1, "", "the manifest is empty: it needs at least `models:`")]
        )
    if not isinstance(src.data, dict):
        raise ManifestError(
            [Problem(file, 1, 1, "", "the manifest must be a mapping with a `models:` key")]
        )
    if problems:  # a bad ${VAR} or a duplicate key: do not validate half-read data
        raise ManifestError(problems)
    try:
        manifest = Manifest.model_validate(src.data)
    except ValidationError as e:
        problems = _translate(src, e)
        raise ManifestError(sorted(problems, key=lambda p: (p.line, p.column))) from None
    loaded = LoadedManifest(manifest, src, Path(file))
    file_problems = _check_files(loaded)
    if any(p.severity == "error" for p in file_problems):
        raise ManifestError(file_problems)
    return loaded


def _located(src: Source, path: KeyPath, msg: str, line: int, col: int) -> Problem:
    if "api_keys" in path and msg.startswith("environment variable ") and "not set" in msg:
        # The generic hint (give a default) would ship a key anyone can read.
        name = msg.split()[2]
        msg = (
            f"environment variable {name} is not set: export it with the key clients "
            "must send (under systemd, in the unit's EnvironmentFile); a default here "
            "would be a key anyone can read"
        )
    return Problem(src.file, line, col, dotted(path), msg)


def _check_files(loaded: LoadedManifest) -> list[Problem]:
    out = []
    for name, m in loaded.manifest.models.items():
        out += REGISTRY[m.backend].check_files(loaded, name, m)
    group = loaded.manifest.control.group
    if group is not None:
        import grp

        try:
            grp.getgrnam(group)
        except KeyError:
            out.append(
                loaded.problem(("control", "group"), f"no such group {group!r} (create it first)")
            )
    gw = loaded.manifest.gateway
    if gw and gw.api_key_file:
        where = ("gateway", "api_key_file")
        try:
            if not gateway_file_keys(gw.api_key_file):
                out.append(
                    loaded.problem(
                        where,
                        f"{gw.api_key_file} holds no key (an empty key list would let every "
                        "client in): write one key per line, or remove api_key_file",
                    )
                )
        except FileNotFoundError:
            out.append(loaded.problem(where, f"no such file: {gw.api_key_file}"))
        except (OSError, UnicodeDecodeError) as e:
            out.append(loaded.problem(where, f"cannot read {gw.api_key_file}: {e}"))
    return out


def gateway_file_keys(path: str) -> list[str]:
    """The keys of a gateway's api_key_file: one per line, blank lines skipped."""
    text = Path(path).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


# ------------------------------------------------------- pydantic -> Problems


def _strip_tags(loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """Drop the discriminator tag pydantic inserts: models.x.vllm.port -> models.x.port."""
    if len(loc) >= 3 and loc[0] == "models" and loc[2] in BACKENDS:
        return (*loc[:2], *loc[3:])
    return loc


def _class_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The pydantic model that validates the mapping at `loc` (tags kept)."""
    cls: Any = Manifest
    i = 0
    while i < len(loc):
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return None
        field = cls.model_fields.get(str(loc[i]))
        if field is None:
            return None
        ann: Any = field.annotation
        i += 1
        while True:
            origin = get_origin(ann)
            if origin in (Union, types.UnionType):
                models = [a for a in get_args(ann) if isinstance(a, type) and a is not type(None)]
                if all(issubclass(a, BaseModel) for a in models) and len(models) > 1:
                    if i < len(loc) and loc[i] in BACKENDS:
                        ann = BACKENDS[str(loc[i])]
                        i += 1
                        continue
                    return None
                ann = models[0] if models else None
            elif origin is Annotated:
                ann = get_args(ann)[0]
            elif origin is dict:
                ann = get_args(ann)[1]
                i += 1  # the dict key (a model's name)
            else:
                break
        cls = ann
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing (null)"
    return repr(value)


def _translate(src: Source, err: ValidationError) -> list[Problem]:
    problems: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    for e in err.errors(include_url=False):
        raw_loc = tuple(e["loc"])
        loc = _strip_tags(raw_loc)
        kind = e["type"]
        secret = any(part in SECRET_KEYS for part in loc)
        got = "" if secret else f", got {_describe(e.get('input'))}"
        pos = src.pos(loc)
        if loc and loc[-1] == "[key]":  # a model's name failed its pattern
            loc = loc[:-1]
            pos = src.pos(loc, key=True)
        if kind == "extra_forbidden":
            key = str(loc[-1])
            cls = _class_at(raw_loc[:-1])
            skip: frozenset[str] = getattr(cls, "inapplicable", frozenset())
            allowed = sorted(set(cls.model_fields) - skip) if cls else []
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            if not close and allowed:
                hint = f" (allowed: {', '.join(allowed)})"
            msg = f"unknown key {key!r}{hint}"
            pos = src.pos(loc, key=True)
            loc = loc[:-1]
        elif kind == "missing":
            msg = f"missing required key {loc[-1]!r}"
            loc = loc[:-1]
            pos = src.pos(loc, key=True)
        elif kind == "union_tag_not_found":
            msg = f"missing required key 'backend' (one of: {ONE_OF})"
            pos = src.pos(loc, key=True)
        elif kind == "union_tag_invalid":
            tag = e.get("ctx", {}).get("tag")
            msg = f"unknown backend {tag!r} (one of: {ONE_OF})"
            loc = (*loc, "backend")
            pos = src.pos(loc)
        elif kind == "literal_error":
            msg = f"must be one of {e['ctx']['expected']}{got}"
        elif kind in ("value_error", "assertion_error"):
            msg = str(e["msg"]).removeprefix("Value error, ")
            if isinstance(e.get("input"), dict):  # a rule about a whole mapping
                pos = src.pos(loc, key=True)
        elif kind == "string_pattern_mismatch":
            msg = _pattern_message(loc, e.get("input"))
        elif kind in ("int_type", "int_parsing", "int_from_float"):
            msg = f"must be an integer{got}"
        elif kind in ("float_type", "float_parsing"):
            msg = f"must be a number{got}"
        elif kind in ("bool_type", "bool_parsing"):
            msg = f"must be true or false{got}"
        elif kind in ("string_type",):
            msg = f"must be a string{got}"
        elif kind in ("list_type",):
            msg = f"must be a list{got}"
        elif kind in ("dict_type", "model_type", "model_attributes_type"):
            msg = f"must be a mapping{got}"
        elif kind.startswith(("greater_than", "less_than")):
            msg = f"{e['msg'].replace('Input should be', 'must be')}{got}"
        elif kind == "too_short":
            msg = f"must have at least {e['ctx']['min_length']} item(s)"
        elif kind == "string_too_short":
            msg = "must not be empty"
        else:
            msg = str(e["msg"]) + got
        if (dotted(loc), msg) in seen:
            continue
        seen.add((dotted(loc), msg))
        problems.append(Problem(src.file, pos.line, pos.column, dotted(loc), msg))
    return problems


def _pattern_message(loc: tuple[str | int, ...], value: Any) -> str:
    if len(loc) == 2 and loc[0] == "models":
        return (
            f"model name {value!r} must start with a letter or digit and hold only "
            "letters, digits, '.', '_' and '-' (at most 64)"
        )
    if loc and loc[-1] == "health_path":
        return f"must start with '/', got {value!r}"
    return f"has an invalid form, got {_describe(value)}"


def json_schema() -> dict[str, Any]:
    schema = Manifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "llmsup manifest (models.yaml)"
    return schema
