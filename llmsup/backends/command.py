"""The `command` backend: any other OpenAI-compatible server (llama.cpp's server,
SGLang, TGI), run as its `command:` says. It runs any program, so it is unconfined."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from llmsup.backends.base import Backend
from llmsup.backends.launch import Launch, cuda_devices
from llmsup.fields import ModelBase, Port
from llmsup.yamlsrc import KeyPath


class CommandModel(ModelBase):
    backend: Literal["command"] = Field(description="any OpenAI-compatible server")
    command: list[str] = Field(min_length=1, description="argv of an OpenAI-compatible server")
    port: Port = Field(description="the port the command listens on")
    health_path: str = Field(
        "/health", pattern=r"^/", description="answers 200 once ready (readiness, liveness)"
    )
    served_name: str | list[str] | None = Field(
        None, description="model name(s) the gateway routes to this server"
    )

    @property
    def served_names(self) -> list[str]:
        if self.served_name is None:
            return []
        return [self.served_name] if isinstance(self.served_name, str) else list(self.served_name)


def build(name: str, m: CommandModel, host: str) -> Launch:
    return Launch(
        unit=name,
        backend="command",
        models=(name,),
        argv=tuple(m.command),
        env={**cuda_devices(m.gpus), **m.env},
        host=host,
        port=m.port,
        ready_path=m.health_path,
        served_names=tuple(m.served_names),
        gpus=tuple(m.gpus),
    )


class Command(Backend[CommandModel]):
    name = "command"
    model = CommandModel
    confined = False

    def build(
        self, names: Sequence[str], specs: Sequence[CommandModel], host: str, *, first: bool
    ) -> Launch:
        return build(names[0], specs[0], host)

    def served_names(self, spec: CommandModel) -> list[str]:
        return spec.served_names

    def served_key(self, spec: CommandModel) -> str:
        return "served_name" if spec.served_name else "model"

    def executable_key(self) -> KeyPath:
        return ("command", 0)
