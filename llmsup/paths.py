"""Where llmsup finds its manifest (the state directory: llmsup.statedir). Light on
imports: the CLI needs it for every command."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def default_manifest_path(env: Mapping[str, str] | None = None) -> Path:
    """`$LLMSUP_MANIFEST`, else `./models.yaml`, else `/etc/llmsup/models.yaml`."""
    env = os.environ if env is None else env
    if env.get("LLMSUP_MANIFEST"):
        return Path(env["LLMSUP_MANIFEST"])
    local = Path("models.yaml")
    return local if local.exists() else Path("/etc/llmsup/models.yaml")
