"""Any other OpenAI-compatible server (llama.cpp's server, SGLang, TGI)."""

from __future__ import annotations

from llmsup.backends import Launch, cuda_devices
from llmsup.manifest import CommandModel, Manifest


def build(name: str, m: CommandModel, manifest: Manifest) -> Launch:
    return Launch(
        unit=name,
        backend="command",
        models=(name,),
        argv=tuple(m.command),
        env={**cuda_devices(m.gpus), **m.env},
        host=manifest.host(name),
        port=m.port,
        ready_path=m.health_path,
        served_names=tuple(m.served_names),
        gpus=tuple(m.gpus),
    )
