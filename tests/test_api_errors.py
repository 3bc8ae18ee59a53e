"""The control API answers every LlmsupError with its class's status and body, in
one place; a real daemon's answers for an unknown model, an unknown action, an
invalid manifest and a reload it refuses."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from llmsup import api, errors
from llmsup.control import ServerView
from llmsup.errors import LlmsupError, Problem
from tests.supervisor_util import running
from tests.util import free_port

# What the control API answers with, class by class: a new class gets a row here.
STATUS = {
    "LlmsupError": 500,
    "ManifestError": 400,
    "BadRequest": 400,
    "DaemonError": 409,
    "NoDaemonError": 503,
    "StateFormatError": 409,
    "UnknownModel": 404,
    "LaunchError": 500,
    "UnsafeRuntimeDir": 500,
    "StepError": 502,
    "GpuUnavailable": 503,
    "FitError": 500,
    "GatewayError": 502,
    "ModelUnavailable": 503,
    "ModelNotReady": 503,
    "ApiError": 418,  # its own, whatever it was given
}


def _tree(cls: type[LlmsupError] = LlmsupError) -> list[type[LlmsupError]]:
    return [cls, *(c for sub in cls.__subclasses__() for c in _tree(sub))]


def _instance(cls: type[LlmsupError]) -> LlmsupError:
    if cls is errors.ManifestError:
        return cls([Problem("m.yaml", 3, 5, "models.a.port", "must be a number")])
    if cls is errors.ModelNotReady:
        return cls("starting", 5)
    if cls is errors.ApiError:
        return cls(418, "short and stout", "server_error", "teapot")
    return cls(f"a {cls.__name__}")


class Raising:
    """A Control whose model actions raise the error it is given."""

    def __init__(self) -> None:
        self.error: BaseException = LlmsupError("unset")

    def status(self) -> dict[str, Any]:
        return {}

    async def act(self, model: str, action: str) -> list[dict[str, Any]]:
        raise self.error

    async def reload(self, path: Path | None = None) -> dict[str, list[str]]:
        raise self.error

    def down(self) -> None:
        pass

    def leave(self) -> None:
        pass

    def views(self) -> list[ServerView]:
        return []

    def view(self, unit: str) -> ServerView | None:
        return None

    async def wait_change(self, timeout: float) -> None:
        pass

    def conflicts(self, unit: str, other: str) -> bool:
        return False

    async def start_server(self, unit: str) -> None:
        pass

    async def stop_server(self, unit: str, detail: str = "") -> None:
        pass


def test_every_class_in_the_tree_has_a_status_here() -> None:
    assert sorted(c.__name__ for c in _tree()) == sorted(STATUS)


def test_each_error_answers_with_its_class_status(tmp_path: Path) -> None:
    control = Raising()
    sock = tmp_path / "control.sock"

    async def main() -> dict[str, tuple[int, Any]]:
        runner = await api.serve(control, sock)
        seen = {}
        try:
            async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(sock))) as c:
                for cls in _tree():
                    control.error = _instance(cls)
                    async with c.post("http://x/v1/models/m/start") as r:
                        seen[cls.__name__] = (r.status, await r.json())
                control.error = RuntimeError("a bug")
                async with c.post("http://x/v1/reload", json={}) as r:
                    seen["RuntimeError"] = (r.status, await r.text())
        finally:
            await runner.cleanup()
        return seen

    seen = asyncio.run(main())
    for cls in _tree():
        status, body = seen[cls.__name__]
        assert status == STATUS[cls.__name__], cls.__name__
        assert body == _instance(cls).body(), cls.__name__
    assert seen["ManifestError"][1] == {
        "error": "manifest not valid",
        "problems": ["m.yaml:3:5: models.a.port: must be a number"],
    }
    assert seen["UnknownModel"][1] == {"error": "a UnknownModel"}
    status, text = seen["RuntimeError"]  # not ours: a bug, and no traceback to the client
    assert status == 500
    assert "a bug" not in text and "Traceback" not in text


def test_a_daemon_answers_unknown_names_actions_and_manifests(tmp_path: Path) -> None:
    port = free_port()
    model = f"m: {{backend: vllm, model: org/m, port: {port}}}"
    with running(tmp_path, model) as d:

        async def main() -> dict[str, tuple[int, Any]]:
            seen = {}
            async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(d.sock))) as c:
                for key, url in [
                    ("name", "http://x/v1/models/nosuch/stop"),
                    ("action", "http://x/v1/models/m/explode"),
                ]:
                    async with c.post(url) as r:
                        seen[key] = (r.status, await r.json())
                bad = tmp_path / "bad.yaml"
                bad.write_text("models:\n  m: {backend: vllm, model: org/m, port: nope}\n")
                async with c.post("http://x/v1/reload", json={"manifest": str(bad)}) as r:
                    seen["manifest"] = (r.status, await r.json())
                moved = tmp_path / "moved.yaml"
                moved.write_text(f"state_dir: {tmp_path / 'elsewhere'}\nmodels:\n  {model}\n")
                async with c.post("http://x/v1/reload", json={"manifest": str(moved)}) as r:
                    seen["state_dir"] = (r.status, await r.json())
            return seen

        seen = asyncio.run(main())
    assert seen["name"] == (404, {"error": "no model named 'nosuch' (known: m)"})
    assert seen["action"][0] == 400
    assert "unknown action 'explode'" in seen["action"][1]["error"]
    status, body = seen["manifest"]
    assert status == 400 and body["error"] == "manifest not valid"
    assert any(f"{tmp_path / 'bad.yaml'}:2:" in p and "port" in p for p in body["problems"])
    assert seen["state_dir"][0] == 409
    assert "state_dir cannot change on reload" in seen["state_dir"][1]["error"]
