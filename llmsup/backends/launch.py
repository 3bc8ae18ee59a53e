"""What one server process is: argv, environment, and how to tell it is ready.

Pure data a backend builds from the manifest; `llmsup.process` and the
supervisor act on it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW", re.IGNORECASE)
REDACTED = "***"


def is_secret_name(name: str) -> bool:
    """An environment variable whose name says it holds a secret (KEY, TOKEN, ...):
    `plan` shows its value as `***`, an export puts it in a Secret."""
    return bool(_SECRET_NAME.search(name))


@dataclass(frozen=True)
class SecretRef:
    """A secret given inline (already expanded from `${VAR}`) or in a file."""

    value: str | None = None
    file: str | None = None

    def read(self) -> str:
        if self.value is not None:
            return self.value
        assert self.file is not None
        return Path(self.file).read_text(encoding="utf-8").strip()


@dataclass(frozen=True)
class OllamaLoad:
    """One model an Ollama server must pull and keep loaded."""

    model: str
    keep_alive: int | str


@dataclass(frozen=True)
class Launch:
    """One server process to supervise (one Ollama server may serve several models)."""

    unit: str
    backend: str
    models: tuple[str, ...]
    argv: tuple[str, ...]
    env: Mapping[str, str]
    host: str
    port: int
    ready_path: str
    served_names: tuple[str, ...] = ()
    gpus: tuple[int | str, ...] = ()
    secrets: Mapping[str, SecretRef] = field(default_factory=dict)
    ollama_loads: tuple[OllamaLoad, ...] = ()
    auth_env: str | None = None  # name of the env var holding the server's API key

    def display_env(self) -> dict[str, str]:
        """The environment llmsup adds, secrets shown as `***`."""
        out = {k: (REDACTED if is_secret_name(k) else v) for k, v in self.env.items()}
        out.update(dict.fromkeys(self.secrets, REDACTED))
        return dict(sorted(out.items()))

    def resolve_env(self) -> dict[str, str]:
        """The environment to add at launch, secrets read now (files may change)."""
        env = dict(self.env)
        env.update({k: ref.read() for k, ref in self.secrets.items()})
        return env

    def fingerprint(self) -> str:
        """Changes whenever what would be launched changes (for reload)."""
        data = {
            "argv": self.argv,
            "env": sorted(self.env.items()),
            "secrets": sorted((k, v.value, v.file) for k, v in self.secrets.items()),
            "loads": [(x.model, str(x.keep_alive)) for x in self.ollama_loads],
            "models": self.models,
        }
        return hashlib.sha256(json.dumps(data, default=str).encode()).hexdigest()[:16]


def cuda_devices(gpus: tuple[int | str, ...] | list[int | str]) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES for `gpus` (indices or UUIDs, both accepted by CUDA).

    CUDA numbers devices fastest-first by default, NVML and nvidia-smi by PCI bus:
    PCI_BUS_ID makes index 2 in the manifest the GPU that `nvidia-smi` calls 2.
    """
    if not gpus:
        return {}
    return {
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpus),
    }
