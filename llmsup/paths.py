"""Where llmsup keeps its state. Light on imports: the CLI needs it for every command."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import yaml

from llmsup.yamlsrc import expand_env

SOCKET_NAME = "control.sock"
_UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with the NUL


def default_state_dir() -> Path:
    """`$LLMSUP_STATE_DIR`; else /var/lib/llmsup as root, ~/.local/state/llmsup otherwise."""
    if os.environ.get("LLMSUP_STATE_DIR"):
        return Path(os.environ["LLMSUP_STATE_DIR"])
    if os.geteuid() == 0:
        return Path("/var/lib/llmsup")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "llmsup"


def state_dir_from_file(manifest: Path) -> Path:
    """The manifest's `state_dir`, read without validating the rest (for status, logs...)."""
    try:
        # libyaml when PyYAML has it: a 100-model manifest in 10 ms, not 130
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        data = yaml.load(manifest.read_text(encoding="utf-8"), Loader=loader)
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return default_state_dir()
    value = data.get("state_dir") if isinstance(data, dict) else None
    if isinstance(value, str) and value:
        return Path(expand_env(value, os.environ)[0])
    return default_state_dir()


def socket_path(state_dir: Path) -> Path:
    path = state_dir / SOCKET_NAME
    if len(str(path).encode()) > _UNIX_PATH_MAX:
        from llmsup.errors import DaemonError

        raise DaemonError(
            f"control socket path {path} is longer than {_UNIX_PATH_MAX} bytes; "
            "choose a shorter state_dir"
        )
    return path


def default_manifest_path(env: Mapping[str, str] | None = None) -> Path:
    """`$LLMSUP_MANIFEST`, else `./models.yaml`, else `/etc/llmsup/models.yaml`."""
    env = os.environ if env is None else env
    if env.get("LLMSUP_MANIFEST"):
        return Path(env["LLMSUP_MANIFEST"])
    local = Path("models.yaml")
    return local if local.exists() else Path("/etc/llmsup/models.yaml")
