"""The control API: JSON over HTTP on a Unix socket (try `curl --unix-socket`).

GET  /v1/status                      daemon and per-model status
POST /v1/models/{name}/{action}      action: start | stop | restart
POST /v1/reload   {"manifest": path} apply a manifest (400 with its problems)
POST /v1/down                        stop every model, then the daemon
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from llmsup.errors import DaemonError, ManifestError

if TYPE_CHECKING:
    from llmsup.daemon import Daemon

DAEMON_KEY = web.AppKey("daemon", object)


def _daemon(request: web.Request) -> Daemon:
    return request.app[DAEMON_KEY]  # type: ignore[return-value]


async def status(request: web.Request) -> web.Response:
    return web.json_response(_daemon(request).status())


async def model_action(request: web.Request) -> web.Response:
    daemon = _daemon(request)
    name, action = request.match_info["name"], request.match_info["action"]
    try:
        server = daemon.server_of(name)
    except DaemonError as e:
        return web.json_response({"error": str(e)}, status=404)
    if action == "start":
        server.tracker.reset()
        server.start()
    elif action == "stop":
        await server.stop()
    elif action == "restart":
        await server.restart()
    else:
        return web.json_response({"error": f"unknown action {action!r}"}, status=400)
    return web.json_response({"ok": True, "models": server.status()})


async def reload(request: web.Request) -> web.Response:
    daemon = _daemon(request)
    try:
        body = await request.json()
    except ValueError:
        body = {}
    path = Path(body.get("manifest") or daemon.manifest_path)
    try:
        result = await daemon.reload(path)
    except ManifestError as e:
        return web.json_response(
            {"error": "manifest not valid", "problems": [str(p) for p in e.problems]}, status=400
        )
    except DaemonError as e:
        return web.json_response({"error": str(e)}, status=409)
    return web.json_response(result)


async def down(request: web.Request) -> web.Response:
    _daemon(request).stopping.set()
    return web.json_response({"ok": True, "pid": os.getpid()}, status=202)


async def serve(daemon: Daemon, path: Path, group: str | None = None) -> web.AppRunner:
    app = web.Application()
    app[DAEMON_KEY] = daemon
    app.add_routes(
        [
            web.get("/v1/status", status),
            web.post("/v1/models/{name}/{action}", model_action),
            web.post("/v1/reload", reload),
            web.post("/v1/down", down),
        ]
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    path.unlink(missing_ok=True)
    old = os.umask(0o177)  # the socket is born 0600: no window where others can connect
    try:
        await web.UnixSite(runner, str(path)).start()
    finally:
        os.umask(old)
    if group is not None:
        import grp

        os.chown(path, -1, grp.getgrnam(group).gr_gid)
        os.chmod(path, 0o660)
    return runner
