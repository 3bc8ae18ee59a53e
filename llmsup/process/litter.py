"""What a server's tree leaves behind on disk: its TMPDIR and its shared memory.

vLLM leaves unix sockets named by UUIDs and `vllm_dist_*` files in TMPDIR at
every exit, and a SIGKILLed tree leaves `/dev/shm/psm_*` segments (hundreds
of MB) that nothing removes. So each launch gets a private TMPDIR under the
state directory, removed once its tree is gone; and the /dev/shm entries its
processes were seen to map or hold open are removed once no process at all
maps or holds them. A tree killed between two snapshots may leave segments
none saw: so also those named as Python's multiprocessing and torch name
theirs, made since the launch, that no process uses (never any other name).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from llmsup.statedir import StateDir

SHM = "/dev/shm/"
# Python's multiprocessing (vLLM's psm_*), torch's shared tensors. Not the
# semaphores (sem.mp-*): glibc maps them under a temporary name, so a live one
# never shows in /proc/PID/maps, and removing it breaks a process that is
# about to open it (a vLLM starting beside a server that just ended).
SHM_PATTERNS = ("psm_", "torch_")
MAX_TMPDIR = 64  # characters, leaving room for a 36-character name and more


def make_tmpdir(state_dir: Path, instance: str) -> Path:
    """A private TMPDIR for one launch: STATE/tmp/<id>, or <tmp>/llmsup-<key>/<id>
    when that would be too long for the unix sockets servers make in it
    (vLLM: TMPDIR/<uuid>; a socket path holds 107 bytes). <tmp> is the daemon's
    own TMPDIR, or /tmp when even that is too long."""
    key, _, ident = instance.partition(":")
    ident = ident.rsplit(":", 1)[-1]
    path = StateDir(state_dir).tmp / ident
    if len(str(path)) > MAX_TMPDIR:
        parent = Path(tempfile.gettempdir()) / f"llmsup-{key}"
        if len(str(parent / ident)) > MAX_TMPDIR:
            parent = Path("/tmp") / f"llmsup-{key}"
        parent.mkdir(mode=0o700, exist_ok=True)
        st = parent.lstat()  # not someone else's (or a link) in a shared /tmp
        if st.st_uid != os.geteuid() or not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o077:
            raise OSError(f"{parent} is not a private directory of ours")
        path = parent / ident
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def tmp_env(path: Path) -> dict[str, str]:
    return {"TMPDIR": str(path), "TMP": str(path), "TEMP": str(path)}


def remove_tmpdir(path: str | None) -> None:
    if path:
        shutil.rmtree(path, ignore_errors=True)


def shm_of(pids: Iterable[int]) -> set[str]:
    """/dev/shm entries these processes map or hold open (unreadable ones skipped)."""
    out: set[str] = set()
    for pid in pids:
        with (
            contextlib.suppress(OSError),
            open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f,
        ):
            for line in f:
                i = line.find(SHM)
                if i >= 0:
                    out.add(line[i:].rstrip("\n").removesuffix(" (deleted)"))
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith(SHM):
                        out.add(target.removesuffix(" (deleted)"))
    return out


def _all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def created_since(since: float) -> set[str]:
    """/dev/shm entries of ours, named as the servers' libraries name theirs, made
    since `since` (a launch's start): a tree killed between two snapshots leaves
    segments no snapshot saw."""
    out = set()
    with contextlib.suppress(OSError):
        for entry in os.scandir(SHM):
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                if (
                    entry.name.startswith(SHM_PATTERNS)
                    and st.st_uid == os.geteuid()
                    and st.st_ctime >= since - 1.0
                ):
                    out.add(SHM + entry.name)
    return out


def remove_shm(paths: Iterable[str], since: float | None = None) -> list[str]:
    """Unlink those of `paths` (and, with `since`, of `created_since`) that are
    ours and that no live process maps or holds open."""
    candidates = set(paths) | (created_since(since) if since is not None else set())
    mine = [p for p in candidates if p.startswith(SHM) and "/" not in p[len(SHM) :] and _owned(p)]
    if not mine:
        return []
    busy = shm_of(_all_pids())
    removed = []
    for p in sorted(set(mine) - busy):
        with contextlib.suppress(OSError):
            os.unlink(p)
            removed.append(p)
    return removed


def _owned(path: str) -> bool:
    try:
        return os.lstat(path).st_uid == os.geteuid()
    except OSError:
        return False
