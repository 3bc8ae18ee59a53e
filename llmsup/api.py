"""The control API: JSON over HTTP on a Unix socket (try `curl --unix-socket`).

GET  /v1/status                      daemon and per-model status
POST /v1/models/{name}/{action}      action: start | stop | restart
POST /v1/reload   {"manifest": path} apply a manifest (400 with its problems)
POST /v1/down                        stop every model, then the daemon
                                     ({"keep_models": true}: the daemon alone)

Errors answer with `{"error": message}` (a ManifestError adds its "problems") and
the status its class carries (llmsup.errors), mapped in one middleware.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from llmsup.control import Control
from llmsup.errors import LlmsupError

CONTROL: web.AppKey[Control] = web.AppKey("control")


@web.middleware
async def errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every LlmsupError answers with its class's status and body."""
    try:
        return await handler(request)
    except LlmsupError as e:
        return web.json_response(e.body(), status=e.http_status)


async def status(request: web.Request) -> web.Response:
    return web.json_response(request.app[CONTROL].status())


async def model_action(request: web.Request) -> web.Response:
    name, action = request.match_info["name"], request.match_info["action"]
    rows = await request.app[CONTROL].act(name, action)
    return web.json_response({"ok": True, "models": rows})


async def reload(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except ValueError:
        body = {}
    path = body.get("manifest") if isinstance(body, dict) else None
    result = await request.app[CONTROL].reload(Path(path) if path else None)
    return web.json_response(result)


async def down(request: web.Request) -> web.Response:
    try:
        body = await request.json() if request.can_read_body else {}
    except ValueError:
        body = {}
    if isinstance(body, dict) and body.get("keep_models"):
        request.app[CONTROL].leave()
    else:
        request.app[CONTROL].down()
    return web.json_response({"ok": True, "pid": os.getpid()}, status=202)


async def serve(control: Control, path: Path, group: str | None = None) -> web.AppRunner:
    app = web.Application(middlewares=[errors])
    app[CONTROL] = control
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
