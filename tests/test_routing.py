"""The gateway's routing policy against a fake Control: on-demand starts, swaps that
drain the requests in flight first, and what a client is told meanwhile. No
processes and no clocks: each step waits for the condition it needs."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace
from typing import Any

import pytest

from llmsup.backends import Launch
from llmsup.control import ServerView
from llmsup.errors import ModelNotReady, ModelUnavailable
from llmsup.gateway.routing import Routing
from llmsup.state import State


def view(unit: str, state: State, *, on_demand: bool = True) -> ServerView:
    launch = Launch(unit, "vllm", (unit,), ("vllm",), {}, "0.0.0.0", 8000, "/health", (unit,))
    return ServerView(
        launch=launch,
        state=state,
        detail="",
        reason="",
        progress="",
        on_demand=on_demand,
        active=state not in (State.STOPPED, State.FAILED),
        api_key=None,
        restarts=0,
        latency=None,
        gpu_memory={},
        idle_timeout=None,
    )


class FakeControl:
    """Servers as plain views; `a` and `b` cannot run at once."""

    def __init__(self, *views: ServerView) -> None:
        self.table = {v.launch.unit: v for v in views}
        self.calls: list[tuple[str, ...]] = []
        self.waiters: list[asyncio.Event] = []

    def set(self, unit: str, **changes: Any) -> None:
        self.table[unit] = replace(self.table[unit], **changes)
        for w in self.waiters:
            w.set()
        self.waiters.clear()

    def views(self) -> list[ServerView]:
        return list(self.table.values())

    def view(self, unit: str) -> ServerView | None:
        return self.table.get(unit)

    async def wait_change(self, timeout: float) -> None:
        ev = asyncio.Event()
        self.waiters.append(ev)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(ev.wait(), timeout)

    def conflicts(self, unit: str, other: str) -> bool:
        return {unit, other} == {"a", "b"}

    async def start_server(self, unit: str) -> None:
        self.calls.append(("start", unit))
        self.set(unit, state=State.STARTING, active=True)

    async def stop_server(self, unit: str, detail: str = "") -> None:
        self.calls.append(("stop", unit))
        self.set(unit, state=State.STOPPED, active=False, detail=detail)


async def until(predicate: Any) -> None:
    while not predicate():
        await asyncio.sleep(0)


def test_a_swap_drains_the_requests_in_flight_before_it_stops_the_other() -> None:
    async def main() -> None:
        control = FakeControl(view("a", State.READY), view("b", State.STOPPED))
        routing = Routing(control)
        held = await routing.acquire("a", 10)
        assert routing.in_flight == {"a": 1}

        wanting_b = asyncio.create_task(routing.acquire("b", 10))
        await until(lambda: "a" in routing.draining)
        with pytest.raises(ModelNotReady, match="a is being swapped out"):
            await routing.acquire("a", 10)  # no new request for what is being drained
        assert control.calls == []  # a request on `a` is still being served

        routing.release(held)
        await until(lambda: control.calls == [("stop", "a"), ("start", "b")])
        assert not wanting_b.done()  # b is STARTING
        control.set("b", state=State.READY)
        route = await wanting_b
        assert (route.unit, route.base_url) == ("b", "http://127.0.0.1:8000")
        assert routing.in_flight == {"b": 1} and routing.draining == set()

    asyncio.run(main())


def test_a_client_that_gives_up_leaves_the_start_going() -> None:
    async def main() -> None:
        control = FakeControl(view("b", State.STOPPED))
        routing = Routing(control)
        with pytest.raises(ModelNotReady, match=r"b is starting \(starting\)"):
            await routing.acquire("b", 0)
        assert control.calls == [("start", "b")]
        assert control.table["b"].state == State.STARTING
        control.set("b", state=State.READY)
        await routing.acquire("b", 0)
        assert control.calls == [("start", "b")]  # started once

    asyncio.run(main())


def test_what_a_client_is_told_for_each_state() -> None:
    async def main() -> None:
        control = FakeControl(
            replace(view("broken", State.FAILED), reason="exit 1: OOM"),
            view("off", State.STOPPED, on_demand=False),
            view("loading", State.LOADING, on_demand=False),
        )
        routing = Routing(control)
        with pytest.raises(ModelUnavailable, match="broken FAILED: exit 1: OOM") as failed:
            await routing.acquire("broken", 10)
        assert not failed.value.stopped
        with pytest.raises(ModelUnavailable, match="off is stopped") as stopped:
            await routing.acquire("off", 10)
        assert stopped.value.stopped
        with pytest.raises(ModelNotReady, match="loading is loading"):
            await routing.acquire("loading", 10)
        with pytest.raises(ModelUnavailable, match="no server serves 'nope'"):
            await routing.acquire("nope", 10)
        assert control.calls == [] and routing.in_flight == {}

    asyncio.run(main())


def test_a_start_stopped_meanwhile_is_said_to_be_stopped() -> None:
    async def main() -> None:
        control = FakeControl(view("b", State.STOPPED))
        routing = Routing(control)
        wanting = asyncio.create_task(routing.acquire("b", 10))
        await until(lambda: control.calls == [("start", "b")])
        await control.stop_server("b")  # `llmsup stop b` while it starts
        with pytest.raises(ModelUnavailable, match="b STOPPED") as caught:
            await wanting
        assert caught.value.stopped

    asyncio.run(main())
