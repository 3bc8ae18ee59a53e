"""Restart decisions and backoff, without clocks or processes."""

from __future__ import annotations

import random

import pytest

from llmsup.manifest import Restart
from llmsup.state import (
    Fail,
    ProbeCounter,
    Respawn,
    RestartTracker,
    Stay,
    backoff_delay,
    describe_exit,
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
    c = ProbeCounter(threshold=3)
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


def test_vllm_phases_from_log_lines() -> None:
    line = "INFO 11-25 10:00:01 [gpu_model_runner.py:1] Model loading took 1.2 GiB and 3.1 seconds"
    assert vllm_phase(line) == ("model loaded", 60)
    assert vllm_phase("INFO nothing here") is None
