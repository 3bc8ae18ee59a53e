"""What a daemon remembers of each server's life for the next daemon: its restart
counters, its last exit, and whether it is FAILED or stopped. A daemon that is
killed, or restarted for an upgrade, must not give a crash-looping model a fresh
budget of restarts, nor start a model someone stopped.

One JSON file per server, `STATE/units/UNIT.json`, stamped with the state
directory's format (llmsup.statedir) and written atomically when the facts
change. Wall-clock times: the monotonic clock does not survive a reboot, and a
restart window must. Removed when the daemon stops its servers for good (`down`,
`systemctl stop`): a fresh `up` starts with a clean slate.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from llmsup.state import State
from llmsup.statedir import StateDir, format_of, stamp
from llmsup.supervise.events import Life

REMEMBERED = (State.FAILED, State.STOPPED)  # states kept as they are; any other: running


@dataclass(frozen=True)
class Memory:
    unit: str
    fingerprint: str  # of the launch it is about (`Launch.fingerprint`)
    state: str = "running"  # "failed", "stopped" or "running"
    reason: str = ""
    last_exit: str = ""
    total: int = 0  # restarts, all of them
    restarts: tuple[float, ...] = ()  # wall-clock times of those within the window
    streak: int = 0  # failures since it was last READY (the backoff's exponent)
    ready: bool = False  # READY or UNHEALTHY: adopted, it gets a live server's patience

    @classmethod
    def of(cls, unit: str, fingerprint: str, life: Life, now: float, wall: float) -> Memory:
        """What to remember of `life`; `now` on the monotonic clock `life` keeps,
        `wall` the same instant on the wall clock."""
        state = life.state.value.lower() if life.state in REMEMBERED else "running"
        return cls(
            unit,
            fingerprint,
            state,
            life.reason,
            life.last_exit,
            life.total,
            tuple(round(wall - (now - t), 3) for t in life.restarts),
            life.streak,
            life.state in (State.READY, State.UNHEALTHY),
        )

    def life(self, now: float, wall: float) -> Life:
        """The life it resumes: its counters (the window's times on the monotonic
        clock `now` reads), FAILED or STOPPED as it was."""
        life = Life(
            reason=self.reason,
            last_exit=self.last_exit,
            total=self.total,
            restarts=tuple(now - (wall - t) for t in self.restarts),
            streak=self.streak,
        )
        if self.state == "failed":
            detail = f"{self.reason} (before the daemon restarted)"
            return replace(life, state=State.FAILED, detail=detail)
        if self.state == "stopped":
            return replace(
                life, state=State.STOPPED, detail="stopped (before the daemon restarted)"
            )
        return life


def _dir(state_dir: Path) -> Path:
    return StateDir(state_dir).path / "units"


def _file(state_dir: Path, unit: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in unit)
    return _dir(state_dir) / f"{safe}.json"


def save(state_dir: Path, memory: Memory) -> None:
    """Raises OSError (a full disk): the caller says so and goes on."""
    final = _file(state_dir, memory.unit)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp")
    tmp.write_text(json.dumps({**stamp(), **asdict(memory)}))
    tmp.replace(final)


def load(state_dir: Path) -> dict[str, Memory]:
    """Every server's memory; one that does not parse (a torn write) is forgotten.
    StateFormatError (nothing removed) for one of a newer format."""
    out = {}
    names = {f.name for f in Memory.__dataclass_fields__.values()}
    for f in sorted(_dir(state_dir).glob("*.json")):
        try:
            data: dict[str, Any] = json.loads(f.read_text())
            format_of(data, str(f))
            kept = {k: v for k, v in data.items() if k in names}
            kept["restarts"] = tuple(float(t) for t in kept.get("restarts", ()))
            memory = Memory(**kept)
        except (OSError, ValueError, TypeError):
            f.unlink(missing_ok=True)
            continue
        out[memory.unit] = memory
    return out


def forget(state_dir: Path, unit: str | None = None) -> None:
    """One server's memory, or (None) every server's."""
    files = [_file(state_dir, unit)] if unit is not None else _dir(state_dir).glob("*.json")
    for f in files:
        f.unlink(missing_ok=True)


def now_pair() -> tuple[float, float]:
    """The monotonic and the wall clock, read together."""
    return time.monotonic(), time.time()
