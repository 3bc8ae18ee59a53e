"""Restart decisions and backoff, without clocks or processes."""

from __future__ import annotations

import random

import pytest

from llmsup.manifest import Restart
from llmsup.state import (
    Fail,
    Liveness,
    Respawn,
    RestartTracker,
    Stay,
    backoff_delay,
    describe_exit,
    exit_hint,
    listening_soon,
    vllm_phase,
)


class NoJitter(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return a


class MaxJitter(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return b


def test_backoff_doubles_up_to_the_cap() -> None:
    r = NoJitter()
    assert [backoff_delay(n, 5, 300, r) for n in range(1, 9)] == [5, 10, 20, 40, 80, 160, 300, 300]


def test_backoff_jitter_is_bounded_and_never_passes_the_cap() -> None:
    r = MaxJitter()
    assert backoff_delay(1, 5, 300, r) == pytest.approx(5.5)
    assert backoff_delay(10, 5, 300, r) == 300
    rng = random.Random(1)
    delays = [backoff_delay(3, 1, 60, rng) for _ in range(200)]
    assert min(delays) >= 4 and max(delays) <= 4.4
    assert len(set(delays)) > 100  # jitter really varies


POLICY = Restart(policy="on-failure", backoff_initial=1, backoff_max=8, max_restarts=3, window=60)


def test_crash_loop_fails_after_max_restarts_in_window() -> None:
    t = RestartTracker()
    r = NoJitter()
    decisions = [t.decide(POLICY, float(i), True, "exited with code 1", r) for i in range(4)]
    assert decisions[:3] == [Respawn(1), Respawn(2), Respawn(4)]
    assert isinstance(decisions[3], Fail)
    assert "gave up after 3 restarts within 60s" in decisions[3].reason
    assert "exited with code 1" in decisions[3].reason


def test_restarts_outside_the_window_are_forgotten() -> None:
    t = RestartTracker()
    r = NoJitter()
    for now in (0.0, 1.0, 2.0):
        assert isinstance(t.decide(POLICY, now, True, "x", r), Respawn)
    assert isinstance(t.decide(POLICY, 100.0, True, "x", r), Respawn)


def test_ready_resets_the_backoff_streak_but_not_the_window() -> None:
    t = RestartTracker()
    r = NoJitter()
    t.decide(POLICY, 0, True, "x", r)
    t.decide(POLICY, 1, True, "x", r)
    t.ready()
    assert t.decide(POLICY, 2, True, "x", r) == Respawn(1)
    assert isinstance(t.decide(POLICY, 3, True, "x", r), Fail)


@pytest.mark.parametrize(
    ("policy", "failed", "expected"),
    [
        ("on-failure", True, Respawn),
        ("on-failure", False, Stay),
        ("always", False, Respawn),
        ("always", True, Respawn),
        ("never", True, Fail),
        ("never", False, Stay),
    ],
)
def test_policies(policy: str, failed: bool, expected: type) -> None:
    p = POLICY.model_copy(update={"policy": policy})
    assert isinstance(RestartTracker().decide(p, 0, failed, "x", NoJitter()), expected)


def test_probe_counter_needs_failures_in_a_row() -> None:
    c = Liveness(threshold=3)
    assert [c.record(ok) for ok in (False, False, True, False, False, False)] == [
        False,
        False,
        False,
        False,
        False,
        True,
    ]


def test_exit_descriptions() -> None:
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(-9) == "killed by SIGKILL"


def test_deep_probe_failures_add_up_between_passing_health_probes() -> None:
    # The defaults: /health every 10 s, a deep probe every 60 s, 3 failures. Between
    # two deep probes five /health probes pass; they must not wipe the deep streak.
    live = Liveness(threshold=3)
    restart = []
    for _ in range(3):
        restart += [live.record(True) for _ in range(5)]
        restart.append(live.record_deep(False))
    assert restart[-1] is True and not any(restart[:-1])
    assert live.deep_misses == 3 and live.misses == 0


def test_a_good_deep_probe_ends_the_deep_streak_and_health_keeps_its_own() -> None:
    live = Liveness(threshold=3)
    assert not live.record_deep(False) and not live.record_deep(False)
    assert not live.healthy
    assert not live.record_deep(True)
    assert live.deep_misses == 0 and live.healthy
    assert not live.record_deep(False) and not live.record_deep(False)
    # /health failures count on their own, and a good deep probe does not clear them.
    assert not live.record(False) and not live.record(False)
    assert not live.record_deep(True)
    assert live.misses == 2
    assert live.record(False)


def test_a_failing_deep_probe_is_repeated_at_once() -> None:
    live = Liveness(threshold=3)
    assert not live.deep_due(10.0, 60.0)
    assert live.deep_due(60.0, 60.0)
    live.record_deep(False)
    assert live.deep_due(10.0, 60.0)  # confirm (or clear) it at the next check
    live.record_deep(True)
    assert not live.deep_due(10.0, 60.0)


def test_vllm_phases_from_log_lines() -> None:
    line = "INFO 11-25 10:00:01 [gpu_model_runner.py:1] Model loading took 1.2 GiB and 3.1 seconds"
    assert vllm_phase(line) == ("model loaded", 50)
    assert vllm_phase("INFO nothing here") is None
    # The lines real vLLM 0.32 prints on CPU, in their order, with rising progress.
    cpu = [
        "(EngineCore_DP0 pid=1) INFO 12-01 10:00:00 [cpu_worker.py:1] Starting to load model m...",
        "(EngineCore_DP0 pid=1) INFO 12-01 10:00:22 [default_loader.py:1] Loading weights "
        "took 0.01 seconds",
        "(EngineCore_DP0 pid=1) INFO 12-01 10:00:23 [core.py:1] init engine (profile, create kv "
        "cache, warmup model) took 1.60 seconds",
        "(APIServer pid=1) INFO 12-01 10:00:24 [api_server.py:1] Starting vLLM server on "
        "http://0.0.0.0:8000",
        "(APIServer pid=1) INFO:     Application startup complete.",
    ]
    phases = [vllm_phase(line) for line in cpu]
    assert None not in phases
    percents = [p[1] for p in phases if p is not None]
    assert percents == sorted(percents) and len(set(percents)) == len(percents)


def test_only_uvicorns_last_line_wakes_the_readiness_probe() -> None:
    assert listening_soon("(APIServer pid=1) INFO:     Application startup complete.")
    assert not listening_soon("INFO [api_server.py:1] Starting vLLM server on http://0.0.0.0:8000")


def test_exit_hint_names_a_dead_engine_core() -> None:
    line = (
        "(APIServer pid=1) ERROR [core_client.py:1] Engine core proc EngineCore_DP0 died "
        "unexpectedly, shutting down client."
    )
    assert exit_hint("vllm", line) == "EngineCore died"
    assert exit_hint("vllm", "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered")
    assert exit_hint("vllm", "INFO Loading weights took 1 s") is None
    assert exit_hint("command", line) is None
