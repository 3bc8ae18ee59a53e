"""One cgroup v2 per server, where the daemon may make them.

A cgroup holds every process its members fork, whatever they do afterwards
(setsid, a blanked environment, a dead parent): the kernel's own answer to
"which processes are this server's". Tracking needs no controller, so the bare
cgroup2 hierarchy of a hybrid host (/sys/fs/cgroup/unified) serves as well as
the unified one at /sys/fs/cgroup.

Where the cgroups go (`prepare`):
- under systemd with `Delegate=yes`, the daemon's own cgroup is ours: the
  daemon moves itself into a leaf `supervisor/` and each server gets a sibling
  leaf (cgroup2 allows processes only in leaves once controllers are enabled);
- otherwise, as root: `<cgroup2>/llmsup/<state key>/`;
- otherwise (or with `LLMSUP_NO_CGROUP=1`): none, and tracking falls back to
  process groups, markers and snapshots of the tree.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

NO_CGROUP_ENV = "LLMSUP_NO_CGROUP"
DAEMON_LEAF = "supervisor"


def cgroup2_mount(mountinfo: str) -> Path | None:
    """The mount point of the cgroup2 hierarchy, from /proc/self/mountinfo's text."""
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if sep and right.split(" ", 1)[0] == "cgroup2":
            fields = left.split(" ")
            if len(fields) > 4:
                # Octal escapes (\040 for a space) as the kernel writes them.
                return Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4]))
    return None


def own_cgroup(proc_cgroup: str) -> str | None:
    """The v2 path ("0::/path") from /proc/PID/cgroup's text."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


def delegated(path: Path) -> bool:
    """Whether systemd handed this cgroup to us (`Delegate=yes`)."""
    for attr in ("trusted.delegate", "user.delegate"):
        with contextlib.suppress(OSError):
            if os.getxattr(path, attr) == b"1":
                return True
    try:  # a user service's delegated cgroup is chowned to the user
        return os.geteuid() != 0 and path.stat().st_uid == os.geteuid()
    except OSError:
        return False


def prepare(key: str) -> Path | None:
    """The directory this daemon makes its servers' cgroups in, or None.

    Effects: may move the daemon into its own leaf (delegated case) and makes
    the directory."""
    if os.environ.get(NO_CGROUP_ENV, "") not in ("", "0"):
        return None
    mount = cgroup2_mount(_read("/proc/self/mountinfo"))
    own = own_cgroup(_read("/proc/self/cgroup"))
    if mount is None or own is None:
        return None
    here = mount / own.lstrip("/")
    try:
        if here.name == DAEMON_LEAF and delegated(here.parent):
            return here.parent  # a daemon restarted in place: already in its leaf
        if own != "/" and delegated(here):
            leaf = here / DAEMON_LEAF
            leaf.mkdir(exist_ok=True)
            join(leaf, os.getpid())
            return here
        if os.geteuid() == 0:
            base = mount / "llmsup" / key
            base.mkdir(parents=True, exist_ok=True)
            return base
    except OSError:
        return None
    return None


def release(base: Path) -> None:
    """At the daemon's exit: remove the directory `prepare` made (root case), if
    empty. A delegated cgroup belongs to the unit and stays."""
    if base.parent.name == "llmsup":
        for d in (base, base.parent):
            with contextlib.suppress(OSError):
                d.rmdir()


def create(base: Path, unit: str, instance: str) -> Path | None:
    """A fresh cgroup for one launch, or None if it cannot be made."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in unit)
    path = base / f"{safe}-{instance.rsplit(':', 1)[-1]}"
    try:
        path.mkdir()
    except OSError:
        return None
    return path


def join(path: Path, pid: int) -> None:
    """Move `pid` into the cgroup (raises OSError, e.g. when it is gone)."""
    with open(path / "cgroup.procs", "w", encoding="ascii") as f:
        f.write(str(pid))


def procs(path: Path) -> set[int]:
    """Every process in the cgroup and the cgroups below it (empty if it is gone)."""
    out: set[int] = set()
    for d, _dirs, _files in os.walk(path):
        out |= {int(x) for x in _read(os.path.join(d, "cgroup.procs")).split()}
    return out


def populated(path: Path) -> bool:
    for line in _read(str(path / "cgroup.events")).splitlines():
        if line.startswith("populated "):
            return line.split()[1] == "1"
    return False


def kill(path: Path) -> bool:
    """SIGKILL every process in the cgroup and below (Linux 5.14+); False if unsupported."""
    try:
        with open(path / "cgroup.kill", "w", encoding="ascii") as f:
            f.write("1")
    except OSError:
        return False
    return True


def remove(path: Path) -> bool:
    """Remove the cgroup and the ones below it; True once it is gone."""
    if not path.exists():
        return True
    for d, _dirs, _files in sorted(os.walk(path), key=lambda w: -len(w[0])):
        with contextlib.suppress(OSError):
            os.rmdir(d)
    return not path.exists()


def leftovers(base: Path, named: set[str | None]) -> list[Path]:
    """Cgroups under `base` that no record names (a daemon killed while it
    wrote one): everything in them is a leftover of ours."""
    try:
        dirs = [d for d in base.iterdir() if d.is_dir()]
    except OSError:
        return []
    # Not ours: the daemon's leaf, and systemd's own (`.control` runs ExecStopPost=).
    return [
        d
        for d in dirs
        if d.name != DAEMON_LEAF and not d.name.startswith(".") and str(d) not in named
    ]
