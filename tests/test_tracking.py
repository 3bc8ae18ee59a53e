"""Every process of a server is found and stopped, whatever it did to hide, and
nothing is left on disk.

The oracle is independent of llmsup's own bookkeeping: the tree of the server
as the kernel shows it (psutil's children of the server's pid, captured before
the fault, with create times), the cgroup the kernel says the server is in,
the TMPDIR in the server's environment, the /dev/shm files its worker maps.
With FAKE_WORKER_ESCAPE=1 the fake's worker starts a helper that leaves the
session, runs with an empty environment and outlives the worker, so no marker
and no process group lead to it. Each scenario runs with a cgroup per server
(as root) and without (LLMSUP_NO_CGROUP=1: subreaper and snapshots alone).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

import _fakegpu
from _fakegpu import make_sim, nvml_env, sim_uuid
from llmsup.gpu import GiB
from llmsup.process import Record, cgroup, load_records, members, port_in_use, tracking
from llmsup.process.tracking import ProcessTable
from tests.supervisor_util import Daemon, running
from tests.util import free_port, wait_for

MOUNT = cgroup.cgroup2_mount(Path("/proc/self/mountinfo").read_text())
CAN_CGROUP = os.geteuid() == 0 and MOUNT is not None and os.access(MOUNT, os.W_OK)
NO_CGROUP_REASON = "needs root and a writable cgroup2 mount"

# Each scenario runs with the cgroup (where the daemon may make one) and without.
MODES = [
    pytest.param("cgroup", marks=pytest.mark.skipif(not CAN_CGROUP, reason=NO_CGROUP_REASON)),
    "no-cgroup",
]


def env_for(mode: str, **extra: str) -> dict[str, str]:
    env = {"FAKE_WORKER_ESCAPE": "1", "FAKE_LITTER": "1", **extra}
    if mode == "no-cgroup":
        env["LLMSUP_NO_CGROUP"] = "1"
    return env


def one_model(port: int) -> str:
    return f"m: {{backend: vllm, model: org/m, port: {port}}}\n"


# ------------------------------------------------------------- the oracle


Tree = dict[int, float]  # pid -> create time


def tree(pid: int) -> Tree:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return {}
    out = {}
    for p in procs:
        with contextlib.suppress(psutil.Error):
            out[p.pid] = p.create_time()
    return out


def alive(t: Tree) -> list[int]:
    out = []
    for pid, created in t.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.Error:
            continue
    return out


def escapee(t: Tree, server: int) -> int | None:
    """The worker that left the server's session and has no environment."""
    for pid in t:
        with contextlib.suppress(OSError, psutil.Error):
            if os.getsid(pid) != server and not psutil.Process(pid).environ():
                return pid
    return None


def tree_with_escapee(server: int) -> tuple[Tree, int]:
    def ready() -> tuple[Tree, int] | None:
        t = tree(server)
        e = escapee(t, server)
        return (t, e) if e is not None else None

    return wait_for(ready, 20, message="the escaping worker never appeared")


def kernel_cgroup(pid: int) -> Path | None:
    """The cgroup v2 directory the kernel says `pid` is in, if not the root."""
    own = cgroup.own_cgroup(Path(f"/proc/{pid}/cgroup").read_text())
    if MOUNT is None or own in (None, "/"):
        return None
    return MOUNT / str(own).lstrip("/")


def litter_of(server: int, worker: int) -> tuple[Path, list[Path]]:
    """The server's TMPDIR (from its environment) and the /dev/shm files the worker maps."""
    tmpdir = Path(psutil.Process(server).environ()["TMPDIR"])

    def shm() -> list[Path] | None:
        maps = Path(f"/proc/{worker}/maps").read_text()
        found = {line.split()[-1] for line in maps.splitlines() if "/dev/shm/psm_" in line}
        return sorted(Path(p) for p in found) or None

    segments = wait_for(shm, 10, message="the worker maps no /dev/shm/psm_* segment")
    wait_for(lambda: any(p.name.startswith("vllm_dist_") for p in tmpdir.iterdir()), 10)
    return tmpdir, segments


def no_litter(tmpdir: Path, segments: list[Path]) -> bool:
    return not tmpdir.exists() and not any(p.exists() for p in segments)


def port_free(port: int) -> bool:
    return not port_in_use("127.0.0.1", port)


def record_knows(d: Daemon, pid: int) -> bool:
    for f in (d.state / "procs").glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            if any(p == pid for p, _ in json.loads(f.read_text()).get("known", [])):
                return True
    return False


# ------------------------------------------------------------- scenarios


@pytest.mark.parametrize("mode", MODES)
def test_down_stops_the_escaped_worker_and_leaves_no_litter(tmp_path: Path, mode: str) -> None:
    port = free_port()
    with running(tmp_path, one_model(port), extra_env=env_for(mode)) as d:
        server = d.wait_all_ready()["m"]["pid"]
        before, worker = tree_with_escapee(server)
        cg = kernel_cgroup(server)
        assert (cg is not None) == (mode == "cgroup")
        tmpdir, segments = litter_of(server, worker)
        r = d.cli("down", "-f", str(d.manifest))
        assert r.returncode == 0, r.stderr
        assert alive(before) == []  # `down` returns once no process is left
        assert port_free(port)
        assert cg is None or not cg.exists()
        assert no_litter(tmpdir, segments)
        if cg is not None:  # and the daemon's own directory goes with it
            wait_for(lambda: not cg.parent.exists(), 10)


@pytest.mark.parametrize("mode", MODES)
def test_server_sigkill_stops_the_escaped_worker(tmp_path: Path, mode: str) -> None:
    with running(tmp_path, one_model(free_port()), extra_env=env_for(mode)) as d:
        server = d.wait_all_ready()["m"]["pid"]
        before, worker = tree_with_escapee(server)
        cg = kernel_cgroup(server)
        tmpdir, segments = litter_of(server, worker)
        os.kill(server, signal.SIGKILL)
        wait_for(lambda: alive(before) == [], 20, message=f"left: {alive(before)}")
        again = d.wait_state("m", "READY", 20)
        assert again["pid"] != server
        assert cg is None or not cg.exists()
        wait_for(lambda: no_litter(tmpdir, segments), 10)


@pytest.mark.parametrize("mode", MODES)
def test_daemon_sigkill_then_up_adopts_the_tree_and_down_stops_the_escaped_worker(
    tmp_path: Path, mode: str
) -> None:
    """The next daemon adopts the server with its whole tree (the escapee too: it
    is known by the record), and its `down` stops all of it."""
    with running(tmp_path, one_model(free_port()), extra_env=env_for(mode)) as d:
        server = d.wait_all_ready()["m"]["pid"]
        before, worker = tree_with_escapee(server)
        cg = kernel_cgroup(server)
        tmpdir, segments = litter_of(server, worker)
        if mode == "no-cgroup":  # the fallback knows what its snapshots saw
            wait_for(lambda: record_knows(d, worker), 10)
        d.kill_daemon()
        assert sorted(alive(before)) == sorted(before)  # orphans now, all of them
        d.start()  # adopts what the killed daemon left running
        row = d.wait_all_ready()["m"]
        assert row["pid"] == server and row["restarts"] == 0
        assert sorted(alive(before)) == sorted(before)
        wait_for(lambda: worker in d.status()["m"]["pids"], 10)  # its tree is tracked
        assert d.cli("down", "-f", str(d.manifest)).returncode == 0
        assert alive(before) == []
        assert cg is None or not cg.exists()
        assert no_litter(tmpdir, segments)


@pytest.mark.parametrize("mode", MODES)
def test_daemon_sigkill_then_down_without_a_daemon(tmp_path: Path, mode: str) -> None:
    """`down` with no daemon stops what the records name, the escapee too."""
    port = free_port()
    with running(tmp_path, one_model(port), extra_env=env_for(mode)) as d:
        server = d.wait_all_ready()["m"]["pid"]
        before, escaped = tree_with_escapee(server)
        cg = kernel_cgroup(server)
        tmpdir, segments = litter_of(server, escaped)
        if mode == "no-cgroup":
            wait_for(lambda: record_knows(d, escaped), 10)
        d.kill_daemon()
        r = d.cli("down", "-f", str(d.manifest))
        assert r.returncode == 0, r.stderr
        assert alive(before) == []
        assert port_free(port)
        assert cg is None or not cg.exists()
        assert no_litter(tmpdir, segments)


def test_records_keep_the_live_tree_only() -> None:
    """Snapshots add what they see and forget the dead: a record does not grow
    with every child a server ever had."""
    with hidden_process() as (proc, created):
        rec = record(known=((proc.pid, created), (999998, 1.0)))
        [(after, alive_pids)] = tracking.snapshot([rec], ProcessTable())
        assert dict(after.known) == {proc.pid: created, rec.pid: rec.create_time}
        assert alive_pids == {proc.pid}


def test_litter_is_removed_after_a_stop(tmp_path: Path) -> None:
    with running(tmp_path, one_model(free_port()), extra_env={"FAKE_LITTER": "1"}) as d:
        server = d.wait_all_ready()["m"]["pid"]
        before = tree(server)
        worker = wait_for(lambda: next((p for p in tree(server) if is_worker(p)), None), 10)
        tmpdir, segments = litter_of(server, worker)
        assert d.cli("stop", "m", "-f", str(d.manifest)).returncode == 0
        d.wait_state("m", "STOPPED", 20)
        assert alive(before) == []
        wait_for(lambda: no_litter(tmpdir, segments), 10)


@pytest.mark.parametrize("victim", ["server", "EngineCore"])
def test_litter_is_removed_after_a_sigkill(tmp_path: Path, victim: str) -> None:
    with running(tmp_path, one_model(free_port()), extra_env={"FAKE_LITTER": "1"}) as d:
        server = d.wait_all_ready()["m"]["pid"]
        worker = wait_for(lambda: next((p for p in tree(server) if is_worker(p)), None), 10)
        before = tree(server)
        tmpdir, segments = litter_of(server, worker)
        target = server
        if victim == "EngineCore":
            target = next(p for p in before if psutil.Process(p).name().startswith("VLLM::Engine"))
        os.kill(target, signal.SIGKILL)
        wait_for(lambda: alive(before) == [], 20, message=f"left: {alive(before)}")
        wait_for(lambda: no_litter(tmpdir, segments), 10)
        again = d.wait_state("m", "READY", 20)
        assert again["pid"] != server
        # the new server has a TMPDIR of its own
        assert Path(psutil.Process(again["pid"]).environ()["TMPDIR"]) != tmpdir


def is_worker(pid: int) -> bool:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).name().startswith("VLLM::Worker")
    return False


# ------------------------------------------- each mechanism, on its own


@contextlib.contextmanager
def hidden_process() -> Iterator[tuple[subprocess.Popen[bytes], float]]:
    """A process in a session of its own with an empty environment."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], env={}, start_new_session=True
    )
    try:
        created = wait_for(lambda: _created(proc.pid), 5)
        yield proc, created
    finally:
        proc.kill()
        proc.wait()


def _created(pid: int) -> float | None:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).create_time()
    return None


def record(**kw: object) -> Record:
    base: dict[str, object] = {
        "unit": "m",
        "instance": "k:m:1",
        "pid": 999999,
        "pgid": 999999,
        "create_time": time.time() - 5,
        "argv": ["x"],
    }
    return Record(**{**base, **kw})  # type: ignore[arg-type]


def found(rec: Record, pid: int) -> bool:
    return pid in {p.pid for p in members(rec, ProcessTable())}


def test_members_by_snapshot_alone() -> None:
    with hidden_process() as (proc, created):
        assert not found(record(), proc.pid)
        assert found(record(known=((proc.pid, created),)), proc.pid)
        assert not found(record(known=((proc.pid, created - 100),)), proc.pid)  # pid reused


def test_members_by_process_group_alone() -> None:
    with hidden_process() as (proc, _):
        assert found(record(pgid=proc.pid), proc.pid)  # no marker, not known, no cgroup


def test_a_group_whose_id_went_to_another_process_is_not_the_launchs() -> None:
    """The server's pid (its group's id) reused by a session leader that started
    later: the kernel frees a group's id only once the group is empty, so that
    group is someone else's, however young."""
    with hidden_process() as (proc, created):
        ours = record(pid=proc.pid, pgid=proc.pid, create_time=created)
        assert found(ours, proc.pid)
        assert not found(replace(ours, create_time=created - 3), proc.pid)


def test_members_by_descent() -> None:
    """A child that left the session is found through its known parent."""
    script = "import subprocess, sys, time; subprocess.Popen(['sleep', '60'], env={}, "
    script += "start_new_session=True); time.sleep(60)"
    with hidden_process() as (proc, _):
        parent = subprocess.Popen([sys.executable, "-c", script], env={}, start_new_session=True)
        try:
            child = wait_for(lambda: psutil.Process(parent.pid).children(), 5)[0].pid
            created = psutil.Process(parent.pid).create_time()
            assert found(record(known=((parent.pid, created),)), child)
            assert not found(record(), child)
            assert not found(record(known=((parent.pid, created),)), proc.pid)
        finally:
            for p in psutil.Process(parent.pid).children():
                p.kill()
            parent.kill()
            parent.wait()


@pytest.mark.skipif(not CAN_CGROUP, reason=NO_CGROUP_REASON)
def test_members_by_cgroup_alone() -> None:
    assert MOUNT is not None
    base = MOUNT / "llmsup" / f"test-{os.getpid()}"
    base.mkdir(parents=True, exist_ok=True)
    cg = cgroup.create(base, "m", "k:m:abc")
    assert cg is not None
    try:
        with hidden_process() as (proc, _):
            cgroup.join(cg, proc.pid)
            assert not found(record(), proc.pid)
            assert found(record(cgroup=str(cg)), proc.pid)
            assert cgroup.populated(cg) and cgroup.kill(cg)
            wait_for(lambda: proc.poll() is not None, 5)
        wait_for(lambda: cgroup.remove(cg), 5)
    finally:
        cgroup.remove(base)


def test_old_records_still_load(tmp_path: Path) -> None:
    (tmp_path / "procs").mkdir()
    old = {"unit": "m", "instance": "k:m:1", "pid": 5, "pgid": 5, "create_time": 1.0}
    (tmp_path / "procs" / "k_m_1.json").write_text(json.dumps({**old, "argv": ["vllm"]}))
    [rec] = load_records(tmp_path)
    assert rec == Record("m", "k:m:1", 5, 5, 1.0, ["vllm"])
    assert rec.cgroup is None and rec.known == ()


def test_cgroup2_mount_and_own_cgroup_are_parsed() -> None:
    info = (
        "35 24 0:30 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro\n"
        "41 31 0:38 / /sys/fs/cgroup/un\\040ified rw,relatime - cgroup2 cgroup2 rw\n"
    )
    assert cgroup.cgroup2_mount(info) == Path("/sys/fs/cgroup/un ified")
    assert cgroup.cgroup2_mount("35 24 0:30 / /x rw - tmpfs tmpfs rw\n") is None
    assert cgroup.own_cgroup("4:memory:/a\n0::/system.slice/llmsup.service\n") == (
        "/system.slice/llmsup.service"
    )


# ------------------------------------------------------------- subreaper


def test_orphans_come_back_and_are_reaped_but_servers_keep_their_exit_codes() -> None:
    """In a process of its own: a subreaper affects every orphan below it."""
    code = textwrap.dedent(
        """
        import os, subprocess, sys, time
        from llmsup.process import tracking
        assert tracking.become_subreaper()
        # A server that exits 3 at once, registered as ours, not yet polled.
        with tracking.OWN_LOCK:
            server = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
            tracking.own(server)
        # A middle process that starts a grandchild and exits: the grandchild is orphaned.
        mid = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!"], stdout=subprocess.PIPE)
        orphan = int(mid.stdout.readline())
        mid.wait()
        deadline = time.monotonic() + 10
        while open(f"/proc/{orphan}/stat").read().split()[3] != str(os.getpid()):
            assert time.monotonic() < deadline, "the orphan did not come back to us"
            time.sleep(0.02)
        os.kill(orphan, 9)
        while time.monotonic() < deadline:
            if orphan in tracking.reap_orphans():
                break
            time.sleep(0.02)
        assert not os.path.exists(f"/proc/{orphan}"), "the orphan was not reaped"
        time.sleep(0.2)
        tracking.reap_orphans()
        assert server.wait() == 3, server.returncode
        print("ok")
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# ------------------------------------------------------------- GPU holders


def test_gpu_holders_without_an_environment_are_the_models(tmp_path: Path) -> None:
    """The worker holds the GPU memory and its environment is blank (as vLLM's):
    it is still the model's, in `gpus` and in the message of a model that waits
    for that memory (n starts after m, and finds too little free)."""
    sim = make_sim(tmp_path / "gpus.json", n=1, total=80 * GiB)
    models = f"""\
    m: {{backend: vllm, model: org/m, gpus: [0], gpu_memory_utilization: 0.5,
         port: {free_port()}}}
    n: {{backend: vllm, model: org/n, gpus: [0], gpu_memory_utilization: 0.45,
         port: {free_port()}, health: {{gpu_wait: 1s}}}}
    """
    _fakegpu.allocate(sim, os.getpid(), sim_uuid(0), 10 * GiB)  # a foreign holder too
    with running(tmp_path, models, extra_env=nvml_env(sim)) as d:
        server = d.wait_state("m", "READY")["pid"]
        worker = wait_for(lambda: next((p for p in tree(server) if is_worker(p)), None), 10)
        assert not psutil.Process(worker).environ()  # no marker to read
        owners = wait_for(lambda: gpu_owners(d) if len(gpu_owners(d)) == 2 else None, 10)
        assert owners == {worker: "model m", os.getpid(): "foreign"}
        row = d.wait_state("n", "FAILED", 20)
        assert f"pid {worker}" in row["reason"] and "[model m]" in row["reason"], row["reason"]
        assert f"pid {os.getpid()}" in row["reason"] and "[foreign]" in row["reason"]


def gpu_owners(d: Daemon) -> dict[int, str]:
    r = d.cli("gpus", "--json", "-f", str(d.manifest))
    return {p["pid"]: p["owner"] for p in json.loads(r.stdout)["processes"]}
