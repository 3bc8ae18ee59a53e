"""systemd's notify protocol (sd_notify(3)): a datagram per message to $NOTIFY_SOCKET.

Silent when NOTIFY_SOCKET is unset, so the daemon runs the same outside systemd.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if addr.startswith("@"):  # abstract namespace
            self.address = "\0" + addr[1:]
        elif addr.startswith("/"):
            self.address = addr
        self._sock: socket.socket | None = None
        usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        mine = not watchdog_pid or watchdog_pid == str(os.getpid())
        self.watchdog_usec = int(usec) if usec.isdigit() and mine and self.address else 0

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half the timeout, as sd_watchdog_enabled(3) advises."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def send(self, *lines: str) -> None:
        if self.address is None:
            return
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # systemd went away or the socket is full: never fatal
        with contextlib.suppress(OSError):
            self._sock.sendto("\n".join(lines).encode(), self.address)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def status_line(states: list[tuple[str, str, str]]) -> str:
    """One line for systemctl status: '3/4 ready; qwen LOADING model loaded (60%)'.

    `states` holds (unit, state, progress) per server.
    """
    ready = sum(1 for _, s, _ in states if s == "READY")
    parts = [f"{ready}/{len(states)} ready"]
    for unit, state, progress in states:
        if state != "READY":
            parts.append(f"{unit} {state.lower()}" + (f" {progress}" if progress else ""))
    return "; ".join(parts)[:200]
