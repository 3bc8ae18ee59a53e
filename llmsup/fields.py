"""The manifest's value types and the fields every model entry has, whatever its
backend: durations, sizes, GPU ids, ports, health and restart overrides.

Pure pydantic types; `llmsup.manifest` builds the manifest from them and each
backend (`llmsup.backends`) its own model class on top of `ModelBase`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    WithJsonSchema,
)

# ---------------------------------------------------------------- value types


def _some_names(v: str | list[str] | None) -> str | list[str] | None:
    if isinstance(v, list) and not v:
        raise ValueError("must not be an empty list")
    return v


def _no_empty_key(v: Any) -> Any:
    return None if v == "" else v  # `${VLLM_API_KEY:-}`: no key


# A server's names for its model (`served_name`): one, or a list that is not empty.
ServedName = Annotated[str | list[str] | None, AfterValidator(_some_names)]
# A key a model is reached with (`api_key`); empty (an unset `${VAR:-}`) is none.
ApiKey = Annotated[SecretStr | None, BeforeValidator(_no_empty_key)]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> float:
    """`10s`, `5m`, `1h30m`, `500ms`, or a number of seconds (`0.5`)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"must not be negative, got {value}")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d+(\.\d+)?", text):
            return float(text)
        if text and re.fullmatch(f"(?:{_DURATION_PART.pattern})+", text):
            return sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))
    raise ValueError(
        f"must be a duration such as 10s, 5m, 1h, 500ms, or a number of seconds, got {value!r}"
    )


_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?", re.IGNORECASE)


def parse_size(value: Any) -> int:
    """`10M`, `512KiB`, `1G`, or a number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and (m := _SIZE_RE.fullmatch(value.strip())):
        unit = (m.group(2) or "B").upper().rstrip("B").rstrip("I") or "B"
        power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit]
        return int(float(m.group(1)) * 1024**power)
    raise ValueError(f"must be a size such as 10M, 512K, 1G, or a number of bytes, got {value!r}")


_LEN_RE = re.compile(r"(\d+(?:\.\d+)?)([kKmMgG]?)")
_LEN_UNIT = {"": 1, "k": 1000, "K": 1024, "m": 10**6, "M": 2**20, "g": 10**9, "G": 2**30}


def parse_model_len(value: Any) -> int:
    """vLLM's `--max-model-len`: an int, `32k` (x1000), `32K` (x1024), or -1/`auto`."""
    if isinstance(value, int) and not isinstance(value, bool) and (value > 0 or value == -1):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text in ("auto", "-1"):
            return -1
        if m := _LEN_RE.fullmatch(text):
            n = int(float(m.group(1)) * _LEN_UNIT[m.group(2)])
            if n > 0:
                return n
    raise ValueError(
        f"must be a positive number of tokens (27768, 32k = 32000, 32K = 32768) "
        f"or -1/auto, got {value!r}"
    )


def _scalar_to_str(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return value


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0},
                {"type": "string", "pattern": r"^(\d+(\.\d+)?(ms|s|m|h|d))+$|^\d+(\.\d+)?$"},
            ],
            "description": "10s, 5m, 1h, 500ms, or seconds",
        }
    ),
]
Size = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string"}]}),
]
ModelLen = Annotated[
    int,
    BeforeValidator(parse_model_len),
    WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string"}]}),
]
EnvValue = Annotated[str, BeforeValidator(_scalar_to_str)]
Port = Annotated[int, Field(ge=1, le=65535)]


def parse_gpu(value: Any) -> int | str:
    """A GPU index (`0`) or UUID (`GPU-8f0e...`, `MIG-...`)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        if value.isdigit():
            return int(value)
        if re.fullmatch(r"(GPU|MIG)-[A-Za-z0-9/_-]+", value):
            return value
    raise ValueError(f"must be a GPU index (0, 1, ...) or a UUID (GPU-..., MIG-...), got {value!r}")


GpuId = Annotated[
    int | str,
    BeforeValidator(parse_gpu),
    WithJsonSchema(
        {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": "^(GPU|MIG)-"}]}
    ),
]
ModelName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


class Strict(BaseModel):
    """Unknown keys are errors; values never change after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ------------------------------------------------------------------- policies


class HealthOverride(Strict):
    """Health settings; unset fields fall back to `defaults.health`."""

    interval: Duration | None = Field(None, description="seconds between liveness probes")
    timeout: Duration | None = Field(None, description="timeout of one probe")
    failures: int | None = Field(None, ge=1, description="failed probes in a row = unhealthy")
    startup_timeout: Duration | None = Field(None, description="deadline to become ready")
    deep_probe: bool | None = Field(
        None, description="also send a 1-token completion (catches a hung engine)"
    )
    deep_interval: Duration | None = Field(None, description="seconds between deep probes")
    gpu_wait: Duration | None = Field(
        None, description="how long a start waits for its GPUs' memory to be free"
    )


RestartPolicyName = Literal["always", "on-failure", "never"]


class RestartOverride(Strict):
    """Restart settings; unset fields fall back to `defaults.restart`."""

    policy: RestartPolicyName | None = Field(
        None, description="always, on-failure (non-zero exit, crash, hang) or never"
    )
    backoff_initial: Duration | None = Field(None, description="delay before the first restart")
    backoff_max: Duration | None = Field(None, description="cap of the doubling restart delay")
    max_restarts: int | None = Field(
        None, ge=0, description="restarts within `window` before the model is FAILED"
    )
    window: Duration | None = Field(None, description="the period max_restarts counts over")


# --------------------------------------------------------------------- models


class ModelBase(Strict):
    """The fields of every model entry; each backend's class adds its own and its
    `backend` tag (`Literal["vllm"]`, ...), which selects the class."""

    if TYPE_CHECKING:  # declared by each subclass as its Literal tag
        backend: str
    # Fields a backend refuses when set (its check says why): not offered as allowed keys.
    inapplicable: ClassVar[frozenset[str]] = frozenset()

    gpus: list[GpuId] = Field(
        default_factory=list, description="GPU indices or UUIDs (becomes CUDA_VISIBLE_DEVICES)"
    )
    host: str | None = Field(None, description="address to listen on (default: defaults.host)")
    env: dict[str, EnvValue] = Field(
        default_factory=dict, description="extra environment variables of the server"
    )
    health: HealthOverride = Field(
        HealthOverride(), description="probe settings (unset ones: defaults.health)"
    )
    restart: RestartOverride = Field(
        RestartOverride(), description="restart settings (unset ones: defaults.restart)"
    )
    stop_timeout: Duration | None = Field(
        None, description="grace between SIGTERM and SIGKILL (default: defaults.stop_timeout)"
    )
    start: Literal["always", "on_demand"] = Field(
        "always", description="on_demand: started by the gateway on the first request"
    )
    idle_timeout: Duration | None = Field(
        None, description="stop an on_demand model after this long without requests"
    )
    exclusive: str | None = Field(
        None, description="on_demand models of one group never run at the same time"
    )
