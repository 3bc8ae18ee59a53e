"""`ollama serve` processes. Models with the same host, port and GPUs share one."""

from __future__ import annotations

from llmsup.backends import Launch, OllamaLoad, cuda_devices
from llmsup.manifest import Manifest, OllamaModel

# Server-wide knobs: models sharing a server must agree on them.
KNOBS: dict[str, str] = {
    "num_parallel": "OLLAMA_NUM_PARALLEL",
    "context_length": "OLLAMA_CONTEXT_LENGTH",
    "kv_cache_type": "OLLAMA_KV_CACHE_TYPE",
    "flash_attention": "OLLAMA_FLASH_ATTENTION",
    "max_loaded_models": "OLLAMA_MAX_LOADED_MODELS",
}


def server_key(name: str, m: OllamaModel, manifest: Manifest) -> tuple[str, int, str]:
    """Models with equal keys run in one `ollama serve`."""
    return (manifest.host(name), m.port, ",".join(str(g) for g in m.gpus))


def knob_env(m: OllamaModel) -> dict[str, str]:
    env = {}
    for field_name, var in KNOBS.items():
        value = getattr(m, field_name)
        if value is not None:
            env[var] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    return env


def build(names: list[str], manifest: Manifest, *, noprune: bool) -> Launch:
    """One server for `names` (all with the same `server_key`)."""
    models = [manifest.models[n] for n in names]
    first = models[0]
    assert isinstance(first, OllamaModel)
    host = manifest.host(names[0])
    env = {"OLLAMA_HOST": f"{host}:{first.port}", **cuda_devices(first.gpus)}
    if noprune:
        # Each server prunes model files it does not know at start; only one may.
        env["OLLAMA_NOPRUNE"] = "1"
    for m in models:
        assert isinstance(m, OllamaModel)
        env.update(knob_env(m))
        env.update(m.env)
    loads = tuple(OllamaLoad(m.model, m.keep_alive) for m in models if isinstance(m, OllamaModel))
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
