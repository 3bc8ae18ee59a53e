"""The CLI's side of the control API: stdlib HTTP over the daemon's Unix socket."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any

from llmsup.errors import DaemonError, NoDaemonError


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


def call(
    socket_path: Path, method: str, url: str, body: Any = None, timeout: float = 600.0
) -> tuple[int, Any]:
    """One request; raises NoDaemonError when nothing answers on the socket."""
    conn = _UnixConnection(socket_path, timeout)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload else {}
        try:
            conn.request(method, url, body=payload, headers=headers)
        except (FileNotFoundError, ConnectionRefusedError):
            raise NoDaemonError(
                f"no llmsup daemon is running (no answer on {socket_path})"
            ) from None
        except PermissionError:
            raise DaemonError(
                f"permission denied on {socket_path}: run as the daemon's user or group"
            ) from None
        try:
            resp = conn.getresponse()
            data = resp.read()
        except TimeoutError:
            raise DaemonError(
                f"the daemon on {socket_path} did not answer within {timeout:g}s; "
                "see `llmsup status`, or its log"
            ) from None
        except (ConnectionError, http.client.HTTPException) as e:
            raise DaemonError(
                f"the daemon on {socket_path} closed the connection without an answer "
                f"({e.__class__.__name__}); it may be stopping: run the command again"
            ) from None
        return resp.status, json.loads(data) if data else None
    finally:
        conn.close()


def alive(socket_path: Path) -> bool:
    try:
        call(socket_path, "GET", "/v1/status", timeout=2.0)
    except (DaemonError, OSError):
        return False
    return True
