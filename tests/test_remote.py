"""`backend: remote`: models on other hosts behind one gateway.

Pure parts first (an upstream's health, the choice of upstream, the probe's verdict,
the manifest's checks, `status`'s lines), then the gateway over upstreams in this
process (a key refused, a stall after the headers, a refused or reset connection, a
client that leaves), then three llmsup daemons on this machine: A's gateway serves
`qwen` from B's and C's gateways (each supervising a fake vLLM).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from llmsup.backends.remote import Remote
from llmsup.cli import main, render
from llmsup.client import call
from llmsup.control import ServerView
from llmsup.errors import DaemonError, ManifestError
from llmsup.export import kubernetes
from llmsup.gateway.app import create_app, serve
from llmsup.gateway.config import GatewayConfig
from llmsup.gateway.host import Settings
from llmsup.gateway.metrics import ModelCollector
from llmsup.gateway.remote import RemoteModels
from llmsup.gateway.routing import Routing
from llmsup.gateway.upstream import (
    DOWN,
    UNKNOWN,
    UP,
    Candidate,
    Failure,
    Health,
    choose,
    failed,
    judge,
    model_state,
    probed,
)
from llmsup.manifest import parse_manifest
from llmsup.plan import make_plan
from llmsup.state import State
from tests.supervisor_util import Daemon
from tests.test_export_kubernetes import CASES, ROOT, run
from tests.util import free_port, wait_for

# ------------------------------------------------------------ an upstream's health


def test_an_upstream_is_up_after_one_good_probe_and_down_after_failures_in_a_row() -> None:
    h = Health(since=0.0)
    assert h.state == UNKNOWN
    h = probed(h, None, 3, now=1.0)
    assert (h.state, h.since) == (UP, 1.0)
    h = probed(h, "timed out", 3, now=2.0)
    h = probed(h, "timed out", 3, now=3.0)
    assert (h.state, h.failures, h.since) == (UP, 2, 1.0)  # two of three: still up
    h = probed(h, "connection refused", 3, now=4.0)
    assert (h.state, h.failures, h.error, h.since) == (DOWN, 3, "connection refused", 4.0)
    h = probed(h, None, 3, now=5.0)  # back: at once
    assert (h.state, h.failures, h.since) == (UP, 0, 5.0)
    assert (h.error, h.error_at) == ("connection refused", 4.0)  # the last error is kept


def test_an_upstream_never_up_is_down_at_its_first_failure() -> None:
    h = probed(Health(), "connection refused", 5, now=1.0)
    assert (h.state, h.failures) == (DOWN, 1)
    assert probed(h, "again", 5, now=2.0).since == 1.0  # still down since then


def test_a_request_refused_or_refusing_our_key_downs_an_upstream_at_once() -> None:
    up = probed(Health(), None, 3, now=1.0)
    for failure in (Failure.REFUSED, Failure.KEY):
        h = failed(up, failure, "why", 3, now=2.0)
        assert (h.state, h.error, h.since) == (DOWN, "why", 2.0)
        assert probed(h, None, 3, now=3.0).state == UP  # a good probe brings it back
    # A reset, a 503, a stall: one failure, as a failed probe.
    for failure in (Failure.RESET, Failure.UNAVAILABLE, Failure.TIMEOUT):
        assert failed(up, failure, "why", 3, now=2.0).state == UP
        assert failed(up, failure, "why", 1, now=2.0).state == DOWN
    assert Failure.REFUSED.retried and Failure.KEY.retried and not Failure.TIMEOUT.retried


def test_requests_go_to_the_up_upstream_with_the_fewest_in_flight() -> None:
    def c(i: int, up: bool, in_flight: int, last: int = 0) -> Candidate:
        return Candidate(i, up, in_flight, last)

    assert choose([c(0, True, 3), c(1, True, 1), c(2, False, 0)]) == 1
    # Ties: the one picked least recently, so that one request at a time spreads.
    assert choose([c(0, True, 0, last=7), c(1, True, 0, last=4)]) == 1
    assert choose([c(0, True, 0), c(1, True, 0)], avoid=[0]) == 1  # the retry's other one
    assert choose([c(0, True, 0)], avoid=[0]) is None
    assert choose([c(0, False, 0), c(1, False, 0)]) is None


def test_a_remote_model_is_ready_while_one_upstream_is() -> None:
    up, down, unknown = Health(UP), Health(DOWN), Health(UNKNOWN)
    assert model_state([down, up]) == State.READY
    assert model_state([down, unknown]) == State.STARTING
    assert model_state([down, down]) == State.UNHEALTHY


@pytest.mark.parametrize(
    ("status", "body", "verdict"),
    [
        (200, {"data": [{"id": "qwen"}, {"id": "other"}]}, None),
        (401, None, "refused our key (401): check api_key"),
        (500, None, "GET /v1/models answered 500"),
        (200, {"detail": "x"}, "GET /v1/models answered no model list"),
        (200, {"data": [{"id": "other"}]}, "does not serve 'qwen' (it lists: other)"),
        # An llmsup gateway says the model's state there.
        (200, {"data": [{"id": "qwen", "llmsup": {"state": "READY"}}]}, None),
        (
            200,
            {"data": [{"id": "qwen", "llmsup": {"state": "LOADING"}}]},
            "'qwen' is LOADING there",
        ),
        (200, {"data": [{"id": "qwen", "llmsup": {"state": "STOPPED", "on_demand": True}}]}, None),
        (
            200,
            {"data": [{"id": "qwen", "llmsup": {"state": "FAILED", "on_demand": True}}]},
            "'qwen' is FAILED there",
        ),
    ],
)
def test_a_probe_judges_the_model_list(status: int, body: Any, verdict: str | None) -> None:
    assert judge(status, body, ["qwen"]) == verdict


# ------------------------------------------------------------ the manifest

GATEWAY = "gateway: {port: 9100}\n"


def plan_of(text: str) -> Any:
    return make_plan(parse_manifest(text, "m.yaml", {"KEY": "k1"}))


def problems(text: str) -> list[str]:
    try:
        found = plan_of(text).errors
    except ManifestError as e:
        found = e.problems
    ordered = sorted(found, key=lambda p: (p.line, p.column))
    return [f"{p.line}:{p.column} {p.path}: {p.message}" for p in ordered]


def test_a_manifest_of_remote_models_alone_is_valid_and_planned_apart() -> None:
    plan = plan_of(
        GATEWAY + "defaults: {health: {interval: 7s}}\nmodels:\n"
        "  qwen2.5-32b:\n"
        "    backend: remote\n"
        '    urls: ["http://gpu-b:9000", "https://gpu-c.example/llm/"]\n'
        "    served_name: Qwen2.5-32B-Instruct\n"
        "    api_key: ${KEY}\n"
        "    health: {timeout: 2s, failures: 2}\n"
        "  plain: {backend: remote, urls: ['http://gpu-d:9000']}\n"
    )
    assert plan.errors == [] and plan.launches == ()
    qwen, plain = plan.remotes
    assert qwen.urls == ("http://gpu-b:9000", "https://gpu-c.example/llm")
    assert qwen.served_names == ("Qwen2.5-32B-Instruct",)
    assert qwen.key == "k1"
    assert (qwen.interval, qwen.timeout, qwen.failures) == (7.0, 2.0, 2)  # defaults.health too
    assert qwen.read_timeout == 300.0
    assert plain.served_names == ("plain",)  # the key by default
    [entry, _] = plan.to_json()[-2:]
    assert entry["backend"] == "remote" and entry["api_key"] == "***"


def test_a_remote_model_refuses_what_belongs_to_a_process_here() -> None:
    found = problems(
        GATEWAY + "models:\n"
        "  a:\n"
        "    backend: remote\n"
        "    urls: ['http://b:9000', 'http://B:9000/']\n"
        "    gpus: [0]\n"
        "    env: {X: y}\n"
        "    restart: {policy: never}\n"
        "    start: on_demand\n"
        "    health: {startup_timeout: 5m}\n"
    )
    assert found == [
        "5:29 models.a.urls[1]: http://b:9000 is listed twice (urls[0]): each upstream once",
        "6:5 models.a.gpus: `gpus` does not apply to a remote model (its servers run on the "
        "hosts of its urls and are supervised there); remove it",
        "7:5 models.a.env: `env` does not apply to a remote model (its servers run on the "
        "hosts of its urls and are supervised there); remove it",
        "8:5 models.a.restart: `restart` does not apply to a remote model (its servers run on "
        "the hosts of its urls and are supervised there); remove it",
        "9:5 models.a.start: `start` does not apply to a remote model (its servers run on the "
        "hosts of its urls and are supervised there); remove it",
        "10:14 models.a.health.startup_timeout: `health.startup_timeout` does not apply to a "
        "remote model: its upstreams are probed with GET /v1/models (interval, timeout, "
        "failures)",
    ]


@pytest.mark.parametrize(
    ("entry", "found"),
    [
        ("urls: []", "1:30 models.a.urls: must have at least 1 item(s)"),
        (
            "urls: ['ftp://b']",
            "1:31 models.a.urls[0]: must be an http:// or https:// base URL such as "
            "http://gpu-b:9000, got 'ftp://b'",
        ),
        (
            "urls: ['http://u:secret@b:1']",
            "1:31 models.a.urls[0]: must not hold credentials (the URL shows in status and "
            "metrics): give the key as api_key or api_key_file",
        ),
        (
            "urls: ['http://b:9000/v1']",
            "1:31 models.a.urls[0]: give the base without /v1 (http://b:9000): requests add "
            "/v1/... to it",
        ),
        (
            "urls: ['http://b:1?x=1']",
            "1:31 models.a.urls[0]: must be a base URL without ?query or #fragment, got "
            "'http://b:1?x=1'",
        ),
        (
            "urls: ['http://b:1'], port: 8000",
            "1:46 models.a: unknown key 'port' (allowed: api_key, api_key_file, backend, "
            "health, read_timeout, served_name, urls)",
        ),
        (
            "urls: ['http://localhost:9100']",
            "1:31 models.a.urls[0]: http://localhost:9100 is this manifest's own gateway "
            "(127.0.0.1:9100): requests would go round in a loop; give another host's address",
        ),
        (
            "urls: ['http://b:1'], api_key: x, api_key_file: /k",
            "1:3 models.a: set api_key or api_key_file, not both",
        ),
    ],
)
def test_a_remote_model_s_urls_and_keys_are_checked_where_they_are(entry: str, found: str) -> None:
    text = f"models:\n  a: {{backend: remote, {entry}}}\n"
    assert problems(GATEWAY + text) == [found.replace("1:", "3:", 1)]


def test_remote_models_take_part_in_the_checks_across_models() -> None:
    # Its served name (the key by default) against the others', aliases to it, the gateway.
    clash = "models:\n  x: {backend: vllm, model: org/x, served_name: qwen}\n"
    clash += "  qwen: {backend: remote, urls: ['http://b:1']}\n"
    assert problems(GATEWAY + clash) == [
        "4:19 models.qwen.backend: served name 'qwen' is already served by x; requests could "
        "not tell them apart"
    ]
    aliased = GATEWAY.replace("}", ", aliases: {gpt: q}}") + (
        "models:\n  q: {backend: remote, urls: ['http://b:1']}\n"
    )
    assert problems(aliased) == []
    alone = "models:\n  q: {backend: remote, urls: ['http://b:1']}\n"
    assert problems(alone) == [
        "2:16 models.q.backend: a remote model is reached through the gateway: add a "
        "`gateway:` section"
    ]


def test_plan_shows_where_a_remote_model_is_routed() -> None:
    plan = plan_of(
        GATEWAY + "models:\n  c: {backend: remote, urls: ['http://gpu-b:9000'], api_key: k}\n"
    )
    assert render.plan(plan.to_json(), None) == [
        "# 1. c (remote): no process here; the gateway routes to",
        "#   http://gpu-b:9000",
        "#   as c, with its api_key, each probed with GET /v1/models every 10s\n",
    ]


def test_a_reload_that_changes_a_remote_model_or_its_key_restarts_the_gateway(
    tmp_path: Path,
) -> None:
    key = tmp_path / "key"
    key.write_text("k1\n")
    text = (
        GATEWAY + f"models:\n  c: {{backend: remote, urls: ['http://b:1'], api_key_file: {key}}}\n"
    )

    def settings(text: str) -> Settings | None:
        return Settings.of(parse_manifest(text, "m.yaml", {}).manifest)

    before = settings(text)
    assert before is not None and before.remotes[0].key == "k1"  # read when it starts
    assert settings(text) == before  # nothing changed: the gateway is left alone
    assert settings(text.replace("b:1", "c:1")) != before
    key.write_text("k2\n")
    assert settings(text) != before
    loaded = parse_manifest(text, "m.yaml", {})
    key.unlink()
    with pytest.raises(DaemonError, match=r"^models\.c\.api_key_file: cannot read "):
        Settings.of(loaded.manifest)


# ------------------------------------------------------------ the Kubernetes export


@pytest.mark.parametrize("case", ["models", "kubernetes", "cpu-real-model"])
def test_the_exported_gateway_s_manifest_passes_llmsup_check(case: str, tmp_path: Path) -> None:
    manifest, args = CASES[case]
    out = tmp_path / "out"
    r = run(["-f", str(ROOT / manifest), "-o", str(out), *args])
    assert r.exit_code == 0, r.output
    [config] = [
        o
        for o in yaml.safe_load_all((out / "llmsup-gateway.yaml").read_text())
        if o["kind"] == "ConfigMap"
    ]
    text = config["data"]["models.yaml"]
    # As in the gateway's pod: its keys file mounted, the upstreams' keys in its environment.
    keys = tmp_path / "gateway-api-keys"
    keys.write_text("a-gateway-key\n")
    text = text.replace("/etc/llmsup-keys/gateway-api-keys", str(keys))
    gateway = tmp_path / "models.yaml"
    gateway.write_text(text)
    env = {var: "a-key" for var in re.findall(r"\$\{(UPSTREAM_[A-Z0-9_]+)\}", text)}
    checked = CliRunner().invoke(main, ["check", "-f", str(gateway)], env=env)
    assert checked.exit_code == 0, checked.output
    assert " in 0 servers and " in checked.output and " remote" in checked.output
    plan = make_plan(parse_manifest(text, str(gateway), env))
    assert plan.launches == () and len(plan.remotes) >= 1


def test_a_remote_model_is_exported_as_it_is_with_its_key_in_the_secret() -> None:
    loaded = parse_manifest(
        "gateway: {port: 9000}\nmodels:\n"
        "  local: {backend: vllm, model: org/local, api_key: k1}\n"
        "  far: {backend: remote, urls: ['http://gpu-b:9000'], api_key: k2, read_timeout: 1m}\n",
        "m.yaml",
        {},
    )
    result = kubernetes.export(loaded, [], kubernetes.Options())
    objs = {
        (o["kind"], o["metadata"]["name"]): o
        for objs in result.files.values()
        for o in objs
        if o["kind"] != "Kustomization"
    }
    assert ("Deployment", "far") not in objs  # it runs elsewhere
    config = yaml.safe_load(objs[("ConfigMap", "llmsup-gateway")]["data"]["models.yaml"])
    assert config["models"]["far"] == {
        "backend": "remote",
        "urls": ["http://gpu-b:9000"],
        "served_name": ["far"],
        "api_key": "${UPSTREAM_API_KEY}",
        "health": {"interval": 10.0, "timeout": 5.0, "failures": 3},
        "read_timeout": 60.0,
    }
    gateway = objs[("Deployment", "llmsup-gateway")]["spec"]["template"]["spec"]
    env = {
        e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in gateway["containers"][0]["env"]
    }
    assert env == {"UPSTREAM_VLLM_API_KEY": "VLLM_API_KEY", "UPSTREAM_API_KEY": "API_KEY"}
    command = result.secret_command
    assert command is not None and "--from-literal=API_KEY='<API_KEY of far>'" in command
    assert "k2" not in json.dumps(list(objs.values()))


# ------------------------------------------------------------ status


def test_status_shows_each_upstream_with_its_state_and_last_error() -> None:
    row = {
        "name": "qwen",
        "unit": "qwen",
        "backend": "remote",
        "state": "READY",
        "detail": "1 of 2 upstreams up",
        "reason": "",
        "served_names": ["qwen"],
        "upstreams": [
            {
                "url": "http://gpu-b:9000",
                "state": "up",
                "error": "connection refused",
                "for_s": 30.0,
                "error_age_s": 42.0,
                "latency_ms": 3.2,
            },
            {
                "url": "http://gpu-c:9000",
                "state": "down",
                "error": "refused our key (401): check api_key",
                "for_s": 200.0,
                "error_age_s": 1.0,
                "latency_ms": 2.0,
            },
        ],
    }
    lines = render.status({"models": [], "remotes": [row], "gateway": None})
    assert lines[1].split() == [
        *("qwen", "remote", "READY", "-", "-", "-", "-", "3ms", "-"),
        *["1", "of", "2", "upstreams", "up"],
    ]
    assert lines[2:] == [
        "qwen: upstreams",
        "  http://gpu-b:9000  up    30s  3ms  last error 42s ago: connection refused",
        "  http://gpu-c:9000  down  3m   -    refused our key (401): check api_key",
    ]


# ------------------------------------------------------------ the gateway, in process


class NoServers:
    """A daemon with no local server (the gateway of remote models alone)."""

    def views(self) -> list[ServerView]:
        return []

    def view(self, unit: str) -> ServerView | None:
        return None

    async def wait_change(self, timeout: float) -> None:
        await asyncio.sleep(timeout)

    def conflicts(self, unit: str, other: str) -> bool:
        return False

    async def start_server(self, unit: str) -> None:
        raise AssertionError("no server")

    async def stop_server(self, unit: str, detail: str = "") -> None:
        raise AssertionError("no server")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Upstream:
    """An OpenAI-compatible server in this process: `/v1/models` lists `qwen` (no key
    asked), its completions answer as `chat` says; `seen` counts them."""

    name: str
    chat: Handler | None = None
    runner: web.AppRunner | None = None
    port: int = 0
    seen: int = 0
    left: asyncio.Event | None = None  # set when a client of a stream went away
    healthy: bool = True  # False: /v1/models answers 500

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        async def models(request: web.Request) -> web.Response:
            if not self.healthy:
                return web.json_response({"error": "broken"}, status=500)
            return web.json_response({"object": "list", "data": [{"id": "qwen"}]})

        async def chat(request: web.Request) -> web.StreamResponse:
            self.seen += 1
            await request.read()
            if self.chat is not None:
                return await self.chat(request)
            return web.json_response({"id": self.name, "choices": []})

        app = web.Application()
        app.router.add_get("/v1/models", models)
        app.router.add_post("/v1/chat/completions", chat)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port or free_port())
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.left = asyncio.Event()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def remote(urls: list[str], **kw: Any) -> Remote:
    settings: dict[str, Any] = {
        "name": "qwen",
        "served_names": ("qwen",),
        "urls": tuple(urls),
        "api_key": None,
        "interval": 60.0,  # the first probe only, unless a test asks for more
        "timeout": 1.0,
        "failures": 1,
        "read_timeout": 300.0,
    }
    settings.update(kw)
    return Remote(**settings)


@asynccontextmanager
async def gateway_of(r: Remote) -> AsyncIterator[tuple[aiohttp.ClientSession, RemoteModels]]:
    """The gateway process's parts (routing, app) for one remote model, its first
    probes done; a client for it."""
    remotes = RemoteModels([r])
    routing = Routing(NoServers(), remotes)
    config = GatewayConfig(remotes=(r,), extra_collector=ModelCollector(NoServers(), remotes))
    port = free_port()
    listening = await serve(create_app(routing, config), "127.0.0.1", port)
    probes = asyncio.create_task(remotes.run())
    try:
        await until(lambda: all(u.state != UNKNOWN for u in remotes.reports()[0].upstreams))
        async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}") as client:
            yield client, remotes
    finally:
        probes.cancel()
        await listening.cleanup()


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def states(remotes: RemoteModels) -> dict[str, tuple[str, str]]:
    return {u.url: (u.state, u.error) for u in remotes.reports()[0].upstreams}


CHAT = {"model": "qwen", "messages": [{"role": "user", "content": "hi"}]}


async def post(client: aiohttp.ClientSession, body: dict[str, Any] = CHAT) -> tuple[int, Any]:
    async with client.post("/v1/chat/completions", json=body) as r:
        return r.status, await r.json()


def test_an_upstream_refusing_our_key_is_a_502_naming_it_and_is_marked_down() -> None:
    async def refuse(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": "Unauthorized"}, status=401)

    async def body() -> None:
        keyed, good = Upstream("keyed", refuse), Upstream("good")
        await keyed.start()
        await good.start()
        try:
            # Alone: the client is told which upstream refused which key.
            async with gateway_of(remote([keyed.url], api_key=None)) as (client, remotes):
                status, out = await post(client)
                assert status == 502 and out["error"]["code"] == "upstream_unauthorized"
                assert out["error"]["message"] == (
                    f"Upstream {keyed.url} of `qwen` refused our key (401): check api_key "
                    "of model qwen"
                )
                assert states(remotes)[keyed.url] == (DOWN, "refused our key (401): check api_key")
                status, out = await post(client)  # down now: 503 at once, saying why
                assert status == 503 and out["error"]["code"] == "model_unavailable"
                assert "refused our key (401)" in out["error"]["message"]
            # Beside another upstream: the request is answered there.
            async with gateway_of(remote([keyed.url, good.url])) as (client, remotes):
                status, out = await post(client)
                assert (status, out["id"]) == (200, "good")
                assert states(remotes)[keyed.url][0] == DOWN
                assert [(await post(client))[1]["id"] for _ in range(3)] == ["good"] * 3
                assert keyed.seen == 2  # once alone, once here: then never again
        finally:
            await keyed.stop()
            await good.stop()

    asyncio.run(body())


def test_an_upstream_stalling_after_its_headers_is_a_504_after_read_timeout() -> None:
    done = asyncio.Event()

    async def stall(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await done.wait()
        return resp

    async def body() -> None:
        up = Upstream("stalls", stall)
        await up.start()
        try:
            async with gateway_of(remote([up.url], read_timeout=0.5)) as (client, _):
                began = time.monotonic()
                status, out = await post(client, {**CHAT, "stream": True})
                took = time.monotonic() - began
                assert status == 504 and out["error"]["code"] == "upstream_timeout"
                assert out["error"]["message"] == (
                    f"Upstream {up.url} of `qwen` sent its headers, then nothing for 0.5s "
                    "(read_timeout)"
                )
                assert 0.5 <= took < 5  # the model's read_timeout, not the gateway's 5 min
        finally:
            done.set()
            await up.stop()

    asyncio.run(body())


def test_a_refused_or_reset_request_is_tried_once_on_another_upstream() -> None:
    async def reset(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()  # no answer at all: the connection is reset
        raise asyncio.CancelledError

    async def body() -> None:
        gone, resets, good = Upstream("gone"), Upstream("resets", reset), Upstream("good")
        resets2 = Upstream("resets2", reset)
        for u in (gone, resets, resets2, good):
            await u.start()
        try:
            async with gateway_of(remote([gone.url, good.url])) as (client, remotes):
                await gone.stop()  # up at its probe, then nothing listens
                status, out = await post(client)
                assert (status, out["id"]) == (200, "good")
                assert states(remotes)[gone.url] == (DOWN, "connection refused")
            async with gateway_of(remote([resets.url, good.url], failures=2)) as (client, rm):
                status, out = await post(client)
                assert (status, out["id"]) == (200, "good") and resets.seen == 1
                # One reset counts as a failed probe: still up with failures: 2.
                assert states(rm)[resets.url][0] == UP
            async with gateway_of(remote([resets.url, resets2.url])) as (client, rm):
                # Both fail: tried twice, no more, and the last failure is the answer.
                status, out = await post(client)
                assert status == 502 and out["error"]["code"] == "upstream_unreachable"
                assert (resets.seen, resets2.seen) == (2, 1)
        finally:
            for u in (resets, resets2, good):
                await u.stop()

    asyncio.run(body())


def test_a_request_waiting_on_an_upstream_found_down_goes_to_another() -> None:
    done = asyncio.Event()

    async def silent(request: web.Request) -> web.StreamResponse:
        await done.wait()  # as a host that vanished: no answer, no reset
        return web.json_response({"id": "silent"})

    async def body() -> None:
        silent_up, good = Upstream("silent", silent), Upstream("good")
        await silent_up.start()
        await good.start()
        try:
            r = remote([silent_up.url, good.url], interval=0.2, failures=1)
            async with gateway_of(r) as (client, remotes):
                began = time.monotonic()
                asked = asyncio.create_task(post(client))
                await until(lambda: silent_up.seen == 1)  # it went there first
                silent_up.healthy = False  # its next probe finds it down
                status, out = await asked
                assert (status, out["id"]) == (200, "good")
                assert time.monotonic() - began < 3  # a probe interval, not 15 minutes
                assert states(remotes)[silent_up.url] == (DOWN, "GET /v1/models answered 500")
        finally:
            done.set()
            await silent_up.stop()
            await good.stop()

    asyncio.run(body())


def test_a_remote_stream_is_relayed_chunk_by_chunk_and_cut_with_the_error_event() -> None:
    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(3):
            await resp.write(f'data: {{"n": {i}}}\n\n'.encode())
            await asyncio.sleep(0.2)
        assert request.transport is not None
        request.transport.abort()  # dies mid-stream
        return resp

    async def body() -> None:
        up = Upstream("events", events)
        await up.start()
        try:
            async with gateway_of(remote([up.url])) as (client, _):
                began, seen = time.monotonic(), []
                async with client.post("/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                    assert r.status == 200
                    with contextlib.suppress(aiohttp.ClientPayloadError):
                        async for line in r.content:
                            if line.startswith(b"data: "):
                                seen.append((time.monotonic() - began, json.loads(line[6:])))
                assert [e for _, e in seen[:3]] == [{"n": 0}, {"n": 1}, {"n": 2}]
                assert seen[2][0] - seen[0][0] >= 0.3  # as they came, not at the end
                assert seen[-1][1]["error"]["code"] == "upstream_failed"
        finally:
            await up.stop()

    asyncio.run(body())


def test_a_client_that_leaves_cancels_the_upstream_request_and_metrics_say_it() -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            while True:
                await resp.write(b'data: {"n": 0}\n\n')
                await asyncio.sleep(0.05)
        except (ConnectionError, asyncio.CancelledError):
            assert up.left is not None
            up.left.set()
            raise

    up = Upstream("endless", endless)

    async def body() -> None:
        await up.start()
        try:
            async with gateway_of(remote([up.url])) as (client, remotes):
                async with client.post("/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                    await r.content.readline()
                    assert remotes.models["qwen"].upstreams[0].in_flight == 1
                assert up.left is not None
                await asyncio.wait_for(up.left.wait(), 5)  # the gateway hung up on it
                await until(lambda: remotes.models["qwen"].upstreams[0].in_flight == 0)
                async with client.get("/metrics") as m:
                    text = await m.text()
                samples = {
                    (s.name, s.labels.get("code")): s.value
                    for f in text_string_to_metric_families(text)
                    for s in f.samples
                    if s.labels.get("upstream") == up.url
                }
                assert samples[("llmsup_upstream_requests_total", "200")] == 1
                assert samples[("llmsup_upstream_up", None)] == 1
                assert samples[("llmsup_upstream_in_flight", None)] == 0
                async with client.get("/v1/models") as r:
                    card = (await r.json())["data"][0]["llmsup"]
                assert card["backend"] == "remote" and card["state"] == "READY"
                assert card["upstreams"] == [{"url": up.url, "state": "up", "error": ""}]
        finally:
            await up.stop()

    asyncio.run(body())


def test_gateways_whose_remote_models_loop_answer_508() -> None:
    async def body() -> None:
        up = Upstream("any")
        await up.start()
        try:
            async with gateway_of(remote([up.url])) as (client, _):
                headers = {"X-Llmsup-Hops": "8"}
                async with client.post("/v1/chat/completions", json=CHAT, headers=headers) as r:
                    assert r.status == 508
                    assert (await r.json())["error"]["code"] == "loop_detected"
                assert up.seen == 0
        finally:
            await up.stop()

    asyncio.run(body())


# ------------------------------------------------------------ three daemons

KEY = "upstream-key"  # B's and C's gateways ask for it; A's remote model sends it
A_KEY = "a-key"  # clients of A send this


@dataclass
class Host:
    """One llmsup daemon with its gateway on `port`."""

    daemon: Daemon
    port: int
    control: Path  # its fake vLLM's control file (FAKE_CONTROL_FILE)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rewrite(self, text: str) -> None:
        self.daemon.manifest.write_text(text)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.daemon.cli(*args, "-f", str(self.daemon.manifest))

    def status(self) -> dict[str, Any]:
        _, data = call(self.daemon.sock, "GET", "/v1/status", timeout=10)
        return dict(data)


def upstream_host(tmp: Path, name: str) -> Host:
    """B or C: a fake vLLM serving `qwen` (a token every 20 ms) behind a gateway."""
    port, control = free_port(), tmp / f"{name}-control.json"
    control.write_text("{}")
    (tmp / name).mkdir()
    env = f"{{FAKE_TOKEN_DELAY: '0.02', FAKE_CONTROL_FILE: '{control}'}}"
    d = Daemon(
        tmp / name,
        f"qwen: {{backend: vllm, model: org/qwen, served_name: qwen, port: {free_port()}, "
        f"env: {env}}}\n",
    )
    d.manifest.write_text(
        f"gateway: {{port: {port}, api_keys: [{KEY}]}}\n" + d.manifest.read_text()
    )
    return Host(d, port, control)


def gateway_host(tmp: Path, upstreams: list[Host]) -> Host:
    """A: no server of its own; `qwen` is remote, at B's and C's gateways."""
    port = free_port()
    urls = ", ".join(f"'{u.url}'" for u in upstreams)
    (tmp / "a").mkdir()
    d = Daemon(
        tmp / "a",
        f"qwen: {{backend: remote, urls: [{urls}], api_key: {KEY}, read_timeout: 1s,\n"
        "        health: {interval: 300ms, timeout: 1s, failures: 2}}\n",
    )
    d.manifest.write_text(
        f"gateway: {{port: {port}, api_keys: [{A_KEY}]}}\n" + d.manifest.read_text()
    )
    return Host(d, port, tmp / "none")


@dataclass
class Hosts:
    a: Host
    b: Host
    c: Host


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    tmp = tmp_path_factory.mktemp("hosts")
    b, c = upstream_host(tmp, "b"), upstream_host(tmp, "c")
    a = gateway_host(tmp, [b, c])
    try:
        for h in (b, c, a):
            h.daemon.start()
        for h in (b, c):
            h.daemon.wait_state("qwen", "READY")
        wait_for(lambda: remote_row(a)["state"] == "READY", 10, message=a.daemon.log()[-2000:])
        yield Hosts(a, b, c)
    finally:
        for h in (a, b, c):
            h.daemon.stop()


def remote_row(a: Host) -> dict[str, Any]:
    [row] = a.status()["remotes"]
    return dict(row)


def upstream_states(a: Host) -> dict[str, tuple[str, str]]:
    return {u["url"]: (u["state"], u["error"]) for u in remote_row(a)["upstreams"]}


def request(
    host: Host, body: dict[str, Any], path: str = "/v1/chat/completions", key: str = A_KEY
) -> tuple[int, Any, dict[str, str]]:
    req = urllib.request.Request(
        host.url + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def metrics(host: Host, key: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    req = urllib.request.Request(host.url + "/metrics", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def upstream_metric(a: Host, name: str, **labels: str) -> dict[str, float]:
    """Upstream URL -> the value of `name` with `labels` at A."""
    out: dict[str, float] = {}
    for (metric, found), value in metrics(a, A_KEY).items():
        d = dict(found)
        if metric == name and all(d.get(k) == v for k, v in labels.items()):
            out[d["upstream"]] = out.get(d["upstream"], 0.0) + value
    return out


SHORT = {"model": "qwen", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_a_routes_to_b_and_c_and_says_so_in_status_and_models(hosts: Hosts) -> None:
    a, b, c = hosts.a, hosts.b, hosts.c
    for _ in range(6):
        status, out, _ = request(a, SHORT)
        assert status == 200 and out["model"] == "qwen", out
    served = upstream_metric(a, "llmsup_upstream_requests_total", code="200")
    assert served.get(b.url, 0) >= 2 and served.get(c.url, 0) >= 2  # spread over both
    assert upstream_metric(a, "llmsup_upstream_up") == {b.url: 1.0, c.url: 1.0}
    row = remote_row(a)
    assert (row["backend"], row["state"], row["detail"]) == (
        "remote",
        "READY",
        "2 of 2 upstreams up",
    )
    assert a.status()["models"] == []  # no process of its own
    text = a.cli("status").stdout
    assert "qwen  remote   READY" in text and f"  {b.url}  up" in text, text
    logs = a.daemon.cli("logs", "--file", str(a.daemon.manifest), "qwen")
    assert logs.returncode != 0
    assert "'qwen' is a remote model: no server of it runs here" in logs.stderr, logs.stderr
    assert b.url in logs.stderr and c.url in logs.stderr
    req = urllib.request.Request(a.url + "/v1/models", headers={"Authorization": f"Bearer {A_KEY}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        [card] = json.loads(r.read())["data"]
    assert card["llmsup"]["backend"] == "remote"
    assert {u["url"]: u["state"] for u in card["llmsup"]["upstreams"]} == {b.url: "up", c.url: "up"}


def test_a_stream_through_two_gateways_flows_and_a_client_that_leaves_cancels_it(
    hosts: Hosts,
) -> None:
    a = hosts.a

    async def body() -> None:
        headers = {"Authorization": f"Bearer {A_KEY}"}
        async with aiohttp.ClientSession(base_url=a.url, headers=headers) as client:
            began, arrived = time.monotonic(), []
            stream = {**SHORT, "max_tokens": 12, "stream": True}
            async with client.post("/v1/chat/completions", json=stream) as r:
                assert r.status == 200
                async for line in r.content:
                    if line.startswith(b"data: "):
                        arrived.append((time.monotonic() - began, line[6:].strip()))
            assert arrived[-1][1] == b"[DONE]" and len(arrived) == 14  # role, 12 tokens, DONE
            assert arrived[-2][0] - arrived[1][0] >= 0.15  # token by token, 20 ms apart
            # A client that leaves mid-stream: A and the upstream gateway let go.
            endless = {**SHORT, "max_tokens": 5000, "stream": True}
            async with client.post("/v1/chat/completions", json=endless) as r:
                await r.content.readline()
                assert sum(upstream_metric(a, "llmsup_upstream_in_flight").values()) == 1

        def let_go() -> bool:
            held = sum(upstream_metric(a, "llmsup_upstream_in_flight").values())
            below = [
                v
                for h in (hosts.b, hosts.c)
                for (name, labels), v in metrics(h, KEY).items()
                if name == "llmsup_gateway_in_flight" and ("model", "qwen") in labels
            ]
            return held == 0 and sum(below) == 0

        await asyncio.to_thread(wait_for, let_go, 5)

    asyncio.run(body())


def test_an_upstream_hanging_after_its_headers_is_a_504_after_read_timeout(hosts: Hosts) -> None:
    a, b, c = hosts.a, hosts.b, hosts.c
    for h in (b, c):  # both: whichever A picks sends its headers, then nothing
        h.control.write_text(json.dumps({"deep_hang": True}))
    try:
        time.sleep(0.5)  # the fakes read their control file every 0.2 s
        began = time.monotonic()
        stream = {"model": "qwen", "prompt": "hi", "max_tokens": 3, "stream": True}
        status, out, _ = request(a, stream, "/v1/completions")
        took = time.monotonic() - began
        assert status == 504 and out["error"]["code"] == "upstream_timeout", out
        assert "sent its headers, then nothing for 1s (read_timeout)" in out["error"]["message"]
        assert 1 <= took < 10, took
    finally:
        for h in (b, c):
            h.control.write_text("{}")
    time.sleep(0.5)
    assert request(a, SHORT)[0] == 200


def test_an_upstream_refusing_the_key_is_marked_down_and_the_other_serves(hosts: Hosts) -> None:
    a, b, c = hosts.a, hosts.b, hosts.c
    original = c.daemon.manifest.read_text()
    c.rewrite(original.replace(f"api_keys: [{KEY}]", "api_keys: [another-key]"))
    try:
        assert c.cli("reload").returncode == 0
        refused = (DOWN, "refused our key (401): check api_key")
        wait_for(lambda: upstream_states(a)[c.url] == refused, 10)
        assert upstream_states(a)[b.url][0] == UP
        for _ in range(4):  # every request is served, by B
            assert request(a, SHORT)[0] == 200
        assert "refused our key (401): check api_key" in a.cli("status").stdout
    finally:
        c.rewrite(original)
        assert c.cli("reload").returncode == 0
    wait_for(lambda: upstream_states(a)[c.url][0] == UP, 10)


@dataclass
class Namespace:
    """A network namespace joined to this one by a veth pair: `ip` is its end."""

    name: str
    ip: str
    inner: str  # its end of the pair

    def run(self, *argv: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.name, *argv], check=True, timeout=10)

    def enter(self) -> None:
        """In a child before exec: join the namespace (Python 3.11 has no os.setns)."""
        fd = os.open(f"/var/run/netns/{self.name}", os.O_RDONLY)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), "setns")
        os.close(fd)


@pytest.fixture
def netns() -> Iterator[Namespace]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2's `ip`")
    n = os.getpid() % 100_000
    ns = Namespace(f"llmsup-rt-{n}", f"10.251.{n % 250}.2", f"lr{n}n")
    outer = f"lr{n}h"
    steps = [
        ["ip", "netns", "add", ns.name],
        ["ip", "link", "add", outer, "type", "veth", "peer", "name", ns.inner],
        ["ip", "link", "set", ns.inner, "netns", ns.name],
        ["ip", "addr", "add", f"10.251.{n % 250}.1/30", "dev", outer],
        ["ip", "link", "set", outer, "up"],
    ]
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True, timeout=10)
        ns.run("ip", "addr", "add", f"{ns.ip}/30", "dev", ns.inner)
        ns.run("ip", "link", "set", ns.inner, "up")
        ns.run("ip", "link", "set", "lo", "up")
    except (subprocess.SubprocessError, OSError) as e:
        subprocess.run(["ip", "link", "del", outer], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", ns.name], capture_output=True, timeout=10)
        pytest.skip(f"cannot make a network namespace here: {e}")
    try:
        yield ns
    finally:
        subprocess.run(["ip", "link", "del", outer], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", ns.name], capture_output=True, timeout=10)


def test_an_upstream_in_another_network_namespace_that_vanishes_is_routed_around(
    hosts: Hosts, netns: Namespace, tmp_path: Path
) -> None:
    """B2 runs in a network namespace of its own, reached over a veth pair; its link
    then goes down: no refusal, no reset, packets just vanish, as with a host that
    dies or a cable pulled. Requests are served by C meanwhile, and B2 comes back."""
    far = upstream_host(tmp_path, "b2")
    far.daemon.manifest.write_text(
        far.daemon.manifest.read_text().replace("gateway: {", "gateway: {host: 0.0.0.0, ", 1)
    )
    far.daemon.preexec = netns.enter
    far_url = f"http://{netns.ip}:{far.port}"
    near = gateway_host(tmp_path, [Host(far.daemon, far.port, far.control), hosts.c])
    near.rewrite(near.daemon.manifest.read_text().replace(f"http://127.0.0.1:{far.port}", far_url))
    try:
        far.daemon.start()
        far.daemon.wait_state("qwen", "READY")
        near.daemon.start()
        wait_for(lambda: upstream_states(near).get(far_url, ("",))[0] == UP, 10)
        for _ in range(4):
            assert request(near, SHORT)[0] == 200
        assert upstream_metric(near, "llmsup_upstream_requests_total").get(far_url, 0) >= 1

        netns.run("ip", "link", "set", netns.inner, "down")  # gone without a word
        began = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(lambda _: request(near, SHORT)[0], range(8)))
        took = time.monotonic() - began
        assert codes == [200] * 8
        assert took < 10, took  # seconds of probes, not minutes of timeouts
        # Found by a request that could not connect, or by a probe that got no answer.
        found = {"no connection within 1s", "no answer to GET /v1/models within 1s"}
        assert upstream_states(near)[far_url] in {(DOWN, e) for e in found}

        netns.run("ip", "link", "set", netns.inner, "up")
        wait_for(lambda: upstream_states(near)[far_url][0] == UP, 10)
    finally:
        near.daemon.stop()
        far.daemon.stop()


def test_failover_when_a_daemon_stops_503_when_all_are_down_and_recovery(hosts: Hosts) -> None:
    a, b, c = hosts.a, hosts.b, hosts.c
    results: list[int] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            results.append(request(a, SHORT)[0])

    streamed: list[bytes] = []

    def stream() -> None:  # 2 s long: B's gateway lets it end before it exits
        body = {**SHORT, "max_tokens": 100, "stream": True}
        req = urllib.request.Request(
            a.url + "/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {A_KEY}"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            streamed.append(r.read().rstrip().rsplit(b"\n", 1)[-1])

    workers = [threading.Thread(target=load) for _ in range(4)]
    streams = [threading.Thread(target=stream) for _ in range(2)]  # one each to B and C
    for w in workers:
        w.start()
    try:
        wait_for(lambda: len(results) >= 20, 20)
        for t in streams:
            t.start()
        time.sleep(0.3)
        b.daemon.stop()  # `llmsup down` on B, under load
        n = len(results)
        wait_for(lambda: len(results) >= n + 20, 20)
    finally:
        stop.set()
        for t in workers + streams:
            t.join(30)
    assert set(results) == {200}, sorted(set(results))  # nothing lost
    assert streamed == [b"data: [DONE]"] * 2  # nor cut
    wait_for(lambda: upstream_states(a)[b.url] == (DOWN, "connection refused"), 5)
    assert remote_row(a)["state"] == "READY"  # by C

    c.daemon.stop()
    wait_for(lambda: remote_row(a)["state"] == "UNHEALTHY", 5)
    began = time.monotonic()
    status, out, headers = request(a, SHORT)
    assert time.monotonic() - began < 1  # at once, never a hang
    assert status == 503 and out["error"]["code"] == "model_unavailable", out
    assert out["error"]["message"] == (
        f"Model `qwen` is unavailable: no upstream is up ({b.url}: connection refused; "
        f"{c.url}: connection refused)"
    )
    assert headers["Retry-After"] == "1"

    b.daemon.start()  # back: routed to within a probe interval of its model being READY
    b.daemon.wait_state("qwen", "READY")
    ready = time.monotonic()
    wait_for(lambda: request(a, SHORT)[0] == 200, 10)
    assert time.monotonic() - ready < 0.3 + 1.5  # one interval, and a loaded machine's slack
    assert upstream_states(a)[b.url][0] == UP
