"""The one Secret every secret of an export goes to, which the user creates.

Each secret a server gets (`api_key`, `api_key_file`, an `env` variable whose name
says secret), the gateway's keys and the key of each remote model (as `API_KEY` of
that model) become a key of that Secret, read through `secretKeyRef`. Equal secrets
share a key: values are compared here, never kept in anything written; `command()`
prints `kubectl create secret` with placeholders.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from llmsup.backends import Launch, SecretRef
from llmsup.backends.launch import is_secret_name
from llmsup.backends.remote import Remote
from llmsup.manifest import Gateway

SECRET = "llmsup-secrets"
GATEWAY_KEYS = "gateway-api-keys"
REMOTE_KEY = "API_KEY"  # a remote model's key: the variable it is kept under


@dataclass(frozen=True)
class Entry:
    """One key of the Secret: what it holds, and the file that holds it, if any."""

    key: str
    what: str  # for the placeholder: "VLLM_API_KEY of qwen2.5-32b"
    file: str | None = None  # a file the manifest names (its path is no secret)


def secret_env(la: Launch) -> list[str]:
    """The variables of a server that hold secrets, in the order of its environment."""
    own = [k for k in la.env if is_secret_name(k)]
    return own + [k for k in la.secrets if k not in own]


class Secrets:
    """Secret keys by (server, variable); the gateway's keys under GATEWAY_KEYS."""

    def __init__(
        self, launches: Sequence[Launch], gateway: Gateway | None, remotes: Sequence[Remote] = ()
    ) -> None:
        # (variable, what it is) -> the servers that get it; what it is: a file, or a
        # value (compared only, to share a key between equal secrets).
        groups: dict[tuple[str, tuple[str, str]], list[str]] = {}
        refs = [
            (la.unit, var, la.secrets.get(var) or SecretRef(value=la.env[var]))
            for la in launches
            for var in secret_env(la)
        ]
        refs += [(r.name, REMOTE_KEY, r.api_key) for r in remotes if r.api_key is not None]
        for unit, var, ref in refs:
            ident = ("file", ref.file) if ref.file is not None else ("value", ref.value or "")
            groups.setdefault((var, ident), []).append(unit)
        per_var: dict[str, int] = {}
        for var, _ in groups:
            per_var[var] = per_var.get(var, 0) + 1
        self._keys: dict[tuple[str, str], str] = {}
        self.entries: list[Entry] = []
        for (var, (kind, text)), units in groups.items():
            key = var if per_var[var] == 1 else f"{units[0]}.{var}"
            for unit in units:
                self._keys[(unit, var)] = key
            file = text if kind == "file" else None
            self.entries.append(Entry(key, f"{var} of {', '.join(units)}", file))
        self.gateway = gateway is not None and bool(gateway.api_keys or gateway.api_key_file)
        if gateway is not None and self.gateway:
            what = "the gateway keys, one per line"
            if gateway.api_keys and gateway.api_key_file:
                what += f": those of {gateway.api_key_file} and of api_keys"
            file = gateway.api_key_file if not gateway.api_keys else None
            self.entries.append(Entry(GATEWAY_KEYS, what, file))

    def key(self, unit: str, var: str) -> str:
        return self._keys[(unit, var)]

    def ref(self, unit: str, var: str) -> dict[str, object]:
        """`valueFrom` of the variable `var` of server `unit`."""
        return {"secretKeyRef": {"name": SECRET, "key": self.key(unit, var)}}

    def command(self, namespace: str | None) -> str | None:
        """`kubectl create secret generic ...` with a placeholder for each value (a
        file the manifest names is given as is); None when nothing is secret."""
        if not self.entries:
            return None
        lines = [f"kubectl create secret generic {SECRET}"]
        if namespace:
            lines[0] += f" --namespace {namespace}"
        for e in self.entries:
            if e.file is not None:
                lines.append(f"--from-file={e.key}={shlex.quote(e.file)}")
            elif e.key == GATEWAY_KEYS:
                lines.append(f"--from-file={e.key}='<a file with {e.what}>'")
            else:
                lines.append(f"--from-literal={e.key}='<{e.what}>'")
        return " \\\n    ".join(lines)
