"""The `ollama` backend: its manifest fields and `ollama serve` processes. Models
with the same host, port and GPUs share one server, which pulls and preloads each."""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from llmsup.backends.base import Backend, GpuClaim, GpuLoad, Http, Locator
from llmsup.backends.launch import Launch, OllamaLoad, cuda_devices
from llmsup.errors import Problem
from llmsup.fields import ModelBase, Port, Size

if TYPE_CHECKING:
    from llmsup.probe import ProbeResult

# Server-wide knobs: models sharing a server must agree on them.
KNOBS: dict[str, str] = {
    "num_parallel": "OLLAMA_NUM_PARALLEL",
    "context_length": "OLLAMA_CONTEXT_LENGTH",
    "kv_cache_type": "OLLAMA_KV_CACHE_TYPE",
    "flash_attention": "OLLAMA_FLASH_ATTENTION",
    "max_loaded_models": "OLLAMA_MAX_LOADED_MODELS",
}
ROOM_WARN = 0.85  # vLLM's shares of a GPU above which Ollama has little room


class OllamaModel(ModelBase):
    backend: Literal["ollama"] = Field(description="`ollama serve`, then pull and preload")
    model: str = Field(min_length=1, description="qwen2.5:7b, hf.co/user/repo:Q8_0, ...")
    port: Port = Field(11434, description="port of the `ollama serve` (OLLAMA_HOST)")
    keep_alive: int | str = Field(-1, description="seconds (negative: forever) or Go duration")
    num_parallel: int | None = Field(
        None, ge=1, description="parallel requests per model (OLLAMA_NUM_PARALLEL)"
    )
    context_length: int | None = Field(
        None, ge=1, description="context length in tokens (OLLAMA_CONTEXT_LENGTH)"
    )
    kv_cache_type: Literal["f16", "q8_0", "q4_0"] | None = Field(
        None, description="OLLAMA_KV_CACHE_TYPE; needs flash_attention"
    )
    flash_attention: bool | None = Field(None, description="OLLAMA_FLASH_ATTENTION")
    max_loaded_models: int | None = Field(
        None, ge=1, description="models loaded at once (OLLAMA_MAX_LOADED_MODELS)"
    )
    gpu_memory: Size | None = Field(
        None, description="free GPU memory to wait for before starting (e.g. 6G)"
    )

    @field_validator("keep_alive")
    @classmethod
    def _keep_alive(cls, v: int | str) -> int | str:
        if isinstance(v, str) and not re.fullmatch(r"-?(\d+(\.\d+)?(ns|us|ms|s|m|h))+", v):
            raise ValueError(
                f"must be a number of seconds (-1: forever) or a Go duration "
                f"such as 5m, -1m, 1h30m, got {v!r}"
            )
        return v

    @property
    def served_names(self) -> list[str]:
        return [self.model]


def knob_env(m: OllamaModel) -> dict[str, str]:
    env = {}
    for field_name, var in KNOBS.items():
        value = getattr(m, field_name)
        if value is not None:
            env[var] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    return env


def build(
    names: Sequence[str], models: Sequence[OllamaModel], host: str, *, noprune: bool
) -> Launch:
    """One server for `names` (all with the same `server_key`)."""
    first = models[0]
    env = {"OLLAMA_HOST": f"{host}:{first.port}", **cuda_devices(first.gpus)}
    if noprune:
        # Each server prunes model files it does not know at start; only one may.
        env["OLLAMA_NOPRUNE"] = "1"
    for m in models:
        env.update(knob_env(m))
        env.update(m.env)
    loads = tuple(OllamaLoad(m.model, m.keep_alive) for m in models)
    return Launch(
        unit=names[0],
        backend="ollama",
        models=tuple(names),
        argv=("ollama", "serve"),
        env=env,
        host=host,
        port=first.port,
        ready_path="/",
        served_names=tuple(x.model for x in loads),
        gpus=tuple(first.gpus),
        ollama_loads=loads,
    )


def check_group(at: Locator, names: Sequence[str], models: Sequence[OllamaModel]) -> list[Problem]:
    """Models sharing one `ollama serve` must agree on its server-wide settings."""
    out = []
    first = models[0]
    base = knob_env(first)
    for n, m in zip(names[1:], models[1:], strict=True):
        for fld, var in KNOBS.items():
            mine = knob_env(m).get(var)
            if mine is not None and base.get(var) not in (None, mine):
                out.append(
                    at.problem(
                        ("models", n, fld),
                        f"shares one `ollama serve` with {names[0]} (same host, port, gpus), "
                        f"which sets {fld} to {getattr(first, fld)!r}; server-wide settings "
                        "must agree, or give this model its own port",
                    )
                )
    for n, m in zip(names, models, strict=True):
        if m.kv_cache_type and m.kv_cache_type != "f16" and not m.flash_attention:
            out.append(
                at.problem(
                    ("models", n, "kv_cache_type"),
                    "Ollama ignores kv_cache_type without flash attention; "
                    "set flash_attention: true",
                    "warning",
                )
            )
    return out


def check_room(
    at: Locator, name: str, spec: OllamaModel, loads: Mapping[str, GpuLoad], near: float
) -> list[Problem]:
    """An Ollama server loads onto any GPU it sees (every one, without `gpus`): warn
    when each of those that vLLM models use is asked for above `near` already."""
    sees = [str(g) for g in spec.gpus] or list(loads)
    if not sees or any(g not in loads or loads[g].peak <= near for g in sees):
        return []
    full = "; ".join(f"GPU {g} at {loads[g].peak:.2f} ({', '.join(loads[g].users)})" for g in sees)
    where = "the GPUs in its gpus" if spec.gpus else "every GPU the vLLM models use"
    return [
        at.problem(
            ("models", name, "gpus") if spec.gpus else ("models", name),
            f"Ollama would load {spec.model} onto {where}, and vLLM models already "
            f"ask for nearly all of them: {full}; one of them will not find its "
            "memory (or Ollama runs on the CPU): give this model gpus with room, "
            "or lower the vLLM models' gpu_memory_utilization",
            "warning",
            key=not spec.gpus,
        )
    ]


class Ollama(Backend[OllamaModel]):
    name = "ollama"
    model = OllamaModel

    def server_key(self, name: str, spec: OllamaModel, host: str) -> Hashable:
        return (host, spec.port, ",".join(str(g) for g in spec.gpus))

    def build(
        self, names: Sequence[str], specs: Sequence[OllamaModel], host: str, *, first: bool
    ) -> Launch:
        return build(names, specs, host, noprune=not first)

    def served_names(self, spec: OllamaModel) -> list[str]:
        return spec.served_names

    def owned_env(self, spec: OllamaModel) -> dict[str, str]:
        return {"OLLAMA_HOST": "host and port", **{var: fld for fld, var in KNOBS.items()}}

    def check_group(
        self, at: Locator, names: Sequence[str], specs: Sequence[OllamaModel]
    ) -> list[Problem]:
        return check_group(at, names, specs)

    def check_beside(
        self, at: Locator, name: str, spec: OllamaModel, loads: Mapping[str, GpuLoad]
    ) -> list[Problem]:
        return check_room(at, name, spec, loads, ROOM_WARN)

    def gpu_claim(self, spec: OllamaModel) -> GpuClaim:
        return GpuClaim(tuple(spec.gpus), free=spec.gpu_memory or 0)

    def steps(self, launch: Launch) -> list[str]:
        """Pull each model, then load it and keep it loaded."""
        out = []
        for load in launch.ollama_loads:
            out += [f"pull {load.model}", f"preload {load.model} (keep_alive {load.keep_alive})"]
        return out

    async def post_start(
        self, launch: Launch, http: Http, report: Callable[[str], None], timeout: float
    ) -> str | None:
        from llmsup.backends import ollama_api  # aiohttp: the daemon's alone

        return await ollama_api.post_start(launch, http, report, timeout)

    async def liveness(self, launch: Launch, http: Http, timeout: float) -> ProbeResult:
        """Each model still loaded: a runner that died unloads its model."""
        from llmsup.backends import ollama_api

        return await ollama_api.still_loaded(launch, http, timeout)
