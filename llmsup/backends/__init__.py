"""Backends as plugins: one module per kind of server, each a `base.Backend` that
owns its manifest fields, builds its `Launch`, checks its models, claims GPUs
and reads its log. `REGISTRY` is the one list of them: the manifest's schema,
the plan and the runner all take the backends from here.
"""

from __future__ import annotations

from typing import Any

from llmsup.backends.base import Backend, Http
from llmsup.backends.command import Command
from llmsup.backends.launch import REDACTED, Launch, OllamaLoad, SecretRef, cuda_devices
from llmsup.backends.ollama import Ollama
from llmsup.backends.remote import RemoteBackend
from llmsup.backends.vllm import Vllm

__all__ = [
    "REDACTED",
    "REGISTRY",
    "Backend",
    "Http",
    "Launch",
    "OllamaLoad",
    "SecretRef",
    "cuda_devices",
    "get",
]

# The order is the one users read in "one of: vllm, ollama, command, remote".
REGISTRY: dict[str, Backend[Any]] = {
    b.name: b for b in (Vllm(), Ollama(), Command(), RemoteBackend())
}


def get(name: str) -> Backend[Any]:
    """The backend of that name (a manifest's entries name only registered ones)."""
    return REGISTRY[name]
