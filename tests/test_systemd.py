"""llmsup under systemd: the unit as systemd reads it, the notify protocol as the daemon
speaks it, and the whole under a real systemd booted in a container."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from llmsup.notify import Notifier, status_line
from llmsup.process import MARKER, cgroup
from llmsup.systemd import (
    JobUnknown,
    Options,
    Service,
    Verdict,
    after_exit,
    ask_job,
    edited_by_hand,
    job_of,
    on_sigterm,
    render,
    service_of,
    shipped,
    state_lines,
    verdict_here,
)
from tests import systemd_container
from tests.supervisor_util import FAST_DEFAULTS, LLMSUP, Daemon, gone
from tests.util import FAKES_DIR, free_port, wait_for

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "systemd" / "llmsup.service"
VENV_LLMSUP = Path(sys.executable).parent / "llmsup"
NOTIFY_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def llmsup(
    *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LLMSUP, *map(str, args)], capture_output=True, text=True, timeout=60, env=env
    )


def write_manifest(path: Path, port: int = 18000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"state_dir: {path.parent / 'state'}\nmodels:\n"
        f"  m: {{backend: vllm, model: org/m, port: {port}}}\n"
    )
    return path


def man_check(run: Callable[..., subprocess.CompletedProcess[str]]) -> list[str]:
    """verify runs `man` for each Documentation=man:... page: only where man pages are."""
    r = run("sh", "-c", "command -v man >/dev/null && man -w 5 systemd.service", check=False)
    return [] if r.returncode == 0 else ["--man=no"]


def run_here(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=check)


def verify(unit: Path, tmp: Path, *, user: bool = False) -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify: exit 0 even for unknown keys and bad values, so callers
    check that it said nothing at all."""
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0"}
    if user:  # the user manager's runtime directory, which verify --user looks up
        # Short, under /tmp: the distribution's user sockets (gpg-agent's) live in
        # it and a unix socket path holds 107 bytes, which a deep tmp_path exceeds.
        runtime = Path(tempfile.mkdtemp(prefix="xdg-", dir="/tmp"))
        env["XDG_RUNTIME_DIR"] = str(runtime)
    scope = ["--user"] if user else []
    try:
        return subprocess.run(
            ["systemd-analyze", *scope, "verify", *man_check(run_here), str(unit)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
    finally:
        if user:
            shutil.rmtree(env["XDG_RUNTIME_DIR"], ignore_errors=True)


# ------------------------------------------------------------ the unit


def test_shipped_unit_is_the_rendered_one() -> None:
    text = SHIPPED.read_text()
    assert text == shipped().text, "systemd/llmsup.service drifted: regenerate it"
    assert not edited_by_hand(text)
    assert "ExecStart=/usr/local/bin/llmsup up --foreground -f /etc/llmsup/models.yaml\n" in text


@needs_analyze
def test_verify_reports_what_it_does_not_understand(tmp_path: Path) -> None:
    """The check below is worth something: a typo reaches stderr, with exit code 0."""
    bad = tmp_path / "bad.service"
    bad.write_text("[Service]\nExecStart=/bin/true\nWatchdogSecs=3s\nRestart=sometimes\n")
    r = verify(bad, tmp_path)
    assert r.returncode == 0
    assert "Unknown key 'WatchdogSecs'" in r.stderr
    assert "sometimes" in r.stderr


@needs_analyze
@pytest.mark.parametrize("user", [False, True], ids=["system", "user"])
def test_printed_unit_verifies_without_a_word(tmp_path: Path, user: bool) -> None:
    # a space, a % and a $ in the path: ExecStart= must quote and escape them
    manifest = write_manifest(tmp_path / "gpu fleet 100%" / "models$1.yaml")
    scope = ["--user"] if user else []
    r = llmsup("systemd", "print", "-f", manifest, "--path", "/opt/a b/bin:/usr/bin", *scope)
    assert r.returncode == 0, r.stderr
    options = Options(path="/opt/a b/bin:/usr/bin", state_dir=str(manifest.parent / "state"))
    assert r.stdout == render([str(VENV_LLMSUP)], str(manifest), user=user, options=options).text
    assert f'-f "{tmp_path}/gpu fleet 100%%/models$$1.yaml"\n' in r.stdout
    assert 'Environment="PATH=/opt/a b/bin:/usr/bin"\n' in r.stdout
    if not user:  # a state_dir outside /var/lib, with a space and a %
        assert f'ReadWritePaths="{tmp_path}/gpu fleet 100%%/state"\n' in r.stdout
    unit = tmp_path / "units" / "llmsup.service"
    unit.parent.mkdir()
    unit.write_text(r.stdout)
    v = verify(unit, tmp_path, user=user)
    assert (v.returncode, v.stderr, v.stdout) == (0, "", "")


def test_install_writes_once_and_keeps_hand_edits(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "models.yaml")
    units = tmp_path / "units"
    target = units / "llmsup.service"
    # no systemctl on PATH: never daemon-reload the manager of the machine running the tests
    env = {**os.environ, "PATH": str(tmp_path / "empty")}

    def install(*extra: str) -> subprocess.CompletedProcess[str]:
        return llmsup("systemd", "install", "-f", manifest, "--unit-dir", units, *extra, env=env)

    r = install()
    assert r.returncode == 0, r.stderr
    assert f"wrote {target}" in r.stdout
    expected = llmsup("systemd", "print", "-f", manifest, env=env).stdout  # the same PATH
    assert target.read_text() == expected
    assert "systemctl enable --now llmsup" in r.stdout

    before = target.stat()
    r = install()
    assert r.returncode == 0, r.stderr
    assert "up to date" in r.stdout
    after = target.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    edited = expected.replace("WatchdogSec=30s", "WatchdogSec=2min")
    target.write_text(edited)
    r = install()
    assert r.returncode != 0
    assert "edited by hand" in r.stderr and "--force" in r.stderr
    assert "Traceback" not in r.stderr
    assert target.read_text() == edited

    r = install("--force")
    assert r.returncode == 0, r.stderr
    assert target.read_text() == expected
    assert not list(units.glob(".*")), "no temporary file left beside the unit"


def test_install_replaces_a_generated_unit_that_is_out_of_date(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "models.yaml")
    units = tmp_path / "units"
    units.mkdir()
    old = render(["/opt/old/bin/llmsup"], "/etc/llmsup/old.yaml")
    (units / "llmsup.service").write_text(old.text)
    env = {**os.environ, "PATH": str(tmp_path / "empty")}
    r = llmsup("systemd", "install", "-f", manifest, "--unit-dir", units, env=env)
    assert r.returncode == 0, r.stderr
    assert f"-f {manifest}\n" in (units / "llmsup.service").read_text()


def test_install_refuses_an_invalid_manifest(tmp_path: Path) -> None:
    manifest = tmp_path / "models.yaml"
    manifest.write_text("models:\n  m: {backend: vllm, model: org/m, port: 0}\n")
    units = tmp_path / "units"
    r = llmsup("systemd", "install", "-f", manifest, "--unit-dir", units)
    assert r.returncode == 2
    assert f"{manifest}:2:" in r.stderr and "models.m.port" in r.stderr
    assert not units.exists()


def unit_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln and not ln.startswith("#")]


@pytest.mark.parametrize(
    ("state_dir", "user_name", "expected"),
    [
        (None, None, ["StateDirectory=llmsup", "StateDirectoryMode=0700"]),
        (
            None,
            "llm",
            [
                "StateDirectory=llmsup",
                "StateDirectoryMode=0700",
                "Environment=LLMSUP_STATE_DIR=/var/lib/llmsup",  # not the user's ~/.local/state
            ],
        ),
        ("/var/lib/llm/fleet-a/", "llm", ["StateDirectory=llm/fleet-a", "StateDirectoryMode=0700"]),
        ("/srv/llmsup", None, ["ReadWritePaths=/srv/llmsup"]),
        ("/var/lib", None, ["ReadWritePaths=/var/lib"]),
    ],
)
def test_state_directory_matches_the_manifests_state_dir(
    state_dir: str | None, user_name: str | None, expected: list[str]
) -> None:
    assert unit_lines(state_lines(state_dir, user_name)) == expected


def test_shipped_unit_reads_secrets_from_an_optional_environment_file() -> None:
    lines = unit_lines(SHIPPED.read_text())
    assert "EnvironmentFile=-/etc/llmsup/env" in lines
    assert "StateDirectory=llmsup" in lines
    assert not [
        ln for ln in lines if ln.startswith(("User=", "Environment=PATH", 'Environment="PATH'))
    ]


def test_unit_path_is_this_environments_with_its_bin_first(tmp_path: Path) -> None:
    """A venv (or conda env) with vLLM, not activated: the unit still finds `vllm`."""
    manifest = write_manifest(tmp_path / "models.yaml")
    env = {**os.environ, "PATH": f"{FAKES_DIR}:/usr/bin:/bin"}
    r = llmsup("systemd", "print", "-f", manifest, env=env)
    assert r.returncode == 0, r.stderr
    want = f"{VENV_LLMSUP.parent}:{FAKES_DIR}:/usr/bin:/bin"
    assert f'Environment="PATH={want}"' in unit_lines(r.stdout)
    assert "not on the unit's PATH" not in r.stderr
    assert shutil.which("vllm", path=want) == str(FAKES_DIR / "vllm")

    env["PATH"] = "/usr/bin:/bin"  # no vllm there: said before anything is installed
    r = llmsup("systemd", "print", "-f", manifest, env=env)
    assert r.returncode == 0, r.stderr
    assert (
        f"models.m.backend: 'vllm' is not on the unit's PATH (searched: {VENV_LLMSUP.parent}:"
        in r.stderr
    )
    assert "pass --path" in r.stderr


def _some_user() -> str:
    """An account other than root and nobody (systemd-analyze warns about those)."""
    import pwd

    return next(p.pw_name for p in pwd.getpwall() if 0 < p.pw_uid < 65534)


@needs_analyze
def test_unit_for_a_user_with_the_gpu_groups_verifies(tmp_path: Path) -> None:
    import grp

    name = _some_user()
    manifest = tmp_path / "models.yaml"
    manifest.write_text("state_dir: /var/lib/llm/a\nmodels:\n  m: {backend: vllm, model: org/m}\n")
    r = llmsup("systemd", "print", "-f", manifest, "--user-name", name, "--path", "/usr/bin")
    assert r.returncode == 0, r.stderr
    lines = unit_lines(r.stdout)
    assert f"User={name}" in lines
    groups = [g for g in ("video", "render") if g in {x.gr_name for x in grp.getgrall()}]
    assert [ln for ln in lines if ln.startswith("SupplementaryGroups=")] == (
        [f"SupplementaryGroups={' '.join(groups)}"] if groups else []
    )
    assert "StateDirectory=llm/a" in lines
    unit = tmp_path / "units" / "llmsup.service"
    unit.parent.mkdir()
    unit.write_text(r.stdout)
    v = verify(unit, tmp_path)
    assert (v.returncode, v.stderr, v.stdout) == (0, "", "")


@pytest.mark.parametrize("command", ["print", "install"])
def test_a_unit_for_a_missing_manifest_is_refused(tmp_path: Path, command: str) -> None:
    units = tmp_path / "units"
    extra = ["--unit-dir", str(units)] if command == "install" else []
    r = llmsup("systemd", command, "-f", tmp_path / "nosuch.yaml", *extra)
    assert r.returncode == 2
    assert f"{tmp_path}/nosuch.yaml:1:1: no such file" in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout == ""
    assert not units.exists()


def test_unknown_user_name_is_refused(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "models.yaml")
    r = llmsup("systemd", "print", "-f", manifest, "--user-name", "no-such-user-x")
    assert r.returncode == 2
    assert "no such user 'no-such-user-x'" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


# ------------------------------------------------------------ what systemd does to the unit

LLMSUP_UNIT = Service("llmsup.service", user=False)


@pytest.mark.parametrize(
    ("proc_cgroup", "expected"),
    [
        ("0::/system.slice/llmsup.service\n", LLMSUP_UNIT),  # systemd starts it here
        ("0::/system.slice/llmsup.service/supervisor\n", LLMSUP_UNIT),  # then it moves
        ("0::/system.slice/llmsup.service/.control\n", LLMSUP_UNIT),  # ExecStopPost=
        (
            "9:name=systemd:/system.slice/x.service\n1:cpu:/\n0::/system.slice/llmsup.service\n",
            LLMSUP_UNIT,
        ),
        (
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/llmsup.service/supervisor",
            Service("llmsup.service", user=True),
        ),
        (
            "0::/system.slice/system-llmsup.slice/llmsup@a.service\n",
            Service("llmsup@a.service", False),
        ),
        ("0::/system.slice/llmsup.service/m-0123456789ab\n", None),  # a server's cgroup
        ("0::/user.slice/user-1000.slice/user@1000.service/init.scope\n", None),
        ("0::/user.slice/user-1000.slice/session-3.scope\n", None),  # a login shell
        ("0::/\n", None),
        ("1:name=systemd:/system.slice/llmsup.service\n", None),  # no cgroup v2
        ("", None),
    ],
)
def test_the_service_a_process_runs_in(proc_cgroup: str, expected: Service | None) -> None:
    assert service_of(proc_cgroup) == expected


def test_the_daemons_leaf_is_one_that_still_means_its_service() -> None:
    assert service_of(f"0::/system.slice/llmsup.service/{cgroup.DAEMON_LEAF}") == LLMSUP_UNIT


def test_the_job_of_a_unit_in_systemctls_listing() -> None:
    listing = (
        "1071 llmsup.service        restart running\n"
        "1072 llmsup-b.service      stop    waiting\n"
        "1073 network-online.target start   waiting\n"
    )
    assert job_of(listing, "llmsup.service") == "restart"
    assert job_of(listing, "llmsup-b.service") == "stop"
    assert job_of(listing, "llmsup-c.service") is None
    assert job_of("", "llmsup.service") is None
    assert job_of("No jobs running.\n", "llmsup.service") is None


@pytest.mark.parametrize(
    ("job", "error", "on_term", "after"),
    [
        # (the job, what asking said) -> does SIGTERM keep the models? does ExecStopPost=?
        ("restart", None, True, True),  # systemctl restart, try-restart
        ("stop", None, False, False),  # systemctl stop, shutdown
        (None, None, False, True),  # a kill by hand; after: the daemon's own exit, a crash
        ("start", None, False, True),  # ExecStopPost= after a start that failed
        (None, "Failed to connect to bus", False, False),  # in doubt, stop
    ],
)
def test_only_a_restart_or_a_crash_keeps_the_models(
    job: str | None, error: str | None, on_term: bool, after: bool
) -> None:
    assert on_sigterm(LLMSUP_UNIT, job, error).keep is on_term
    assert after_exit(LLMSUP_UNIT, job, error).keep is after
    assert "llmsup.service" in on_sigterm(LLMSUP_UNIT, job, error).why
    if error is not None:
        assert error in on_sigterm(LLMSUP_UNIT, job, error).why


def test_outside_a_service_sigterm_stops_and_stop_post_does_nothing() -> None:
    assert not on_sigterm(None, None).keep
    assert after_exit(None, None).keep
    asked = []

    def decide(service: Service | None, job: str | None, error: str | None) -> Verdict:
        asked.append((service, job, error))
        return Verdict(False, "")

    verdict_here(decide, "0::/user.slice/user-0.slice/session-1.scope\n")
    assert asked == [(None, None, None)], "no systemctl asked"


class FakeSystemctl:
    """`systemctl` on PATH: prints `jobs` (or fails), and keeps the arguments it got."""

    def __init__(self, bin_dir: Path) -> None:
        self.dir = bin_dir
        bin_dir.mkdir(parents=True, exist_ok=True)
        exe = bin_dir / "systemctl"
        exe.write_text(
            "#!/bin/sh\n"
            'here=$(dirname "$0")\n'
            'echo "$@" >> "$here/calls"\n'
            'if [ -e "$here/fail" ]; then cat "$here/fail" >&2; exit 1; fi\n'
            'if [ -e "$here/slow" ]; then sleep 10; fi\n'
            'cat "$here/jobs"\n'
        )
        exe.chmod(0o755)
        self.answer("")

    def answer(self, jobs: str) -> None:
        (self.dir / "jobs").write_text(jobs)

    def calls(self) -> list[str]:
        path = self.dir / "calls"
        return path.read_text().splitlines() if path.exists() else []

    def path(self) -> str:
        return f"{self.dir}{os.pathsep}{os.environ.get('PATH', '')}"


def test_asking_systemctl_for_the_units_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeSystemctl(tmp_path / "bin")
    monkeypatch.setenv("PATH", fake.path())
    fake.answer("7 llmsup.service restart running\n")
    assert ask_job(LLMSUP_UNIT) == "restart"
    assert ask_job(Service("llmsup.service", user=True)) == "restart"
    fake.answer("")
    assert ask_job(LLMSUP_UNIT) is None
    assert fake.calls() == [
        "list-jobs --no-legend --no-pager --full llmsup.service",
        "--user list-jobs --no-legend --no-pager --full llmsup.service",
        "list-jobs --no-legend --no-pager --full llmsup.service",
    ]
    (fake.dir / "fail").write_text("Failed to connect to bus: No such file or directory\n")
    with pytest.raises(JobUnknown, match="list-jobs: Failed to connect to bus"):
        ask_job(LLMSUP_UNIT)
    verdict = verdict_here(on_sigterm, "0::/system.slice/llmsup.service/supervisor\n")
    assert not verdict.keep and "Failed to connect to bus" in verdict.why
    (fake.dir / "fail").unlink()
    (fake.dir / "slow").write_text("")
    started = time.monotonic()
    with pytest.raises(JobUnknown, match=r"did not answer in 0\.3s"):
        ask_job(LLMSUP_UNIT, timeout=0.3)
    assert time.monotonic() - started < 5


@pytest.fixture
def service_cgroup() -> Iterator[Path]:
    """A cgroup named as a service's, marked delegated as systemd marks one with
    Delegate=yes: the daemon lays its cgroups out there as under systemd."""
    mount = cgroup.cgroup2_mount(Path("/proc/self/mountinfo").read_text())
    if os.geteuid() != 0 or mount is None:
        pytest.skip("a service's cgroup of our own needs root and a cgroup2 mount")
    path = mount / f"llmsup-test-{os.getpid()}-{time.monotonic_ns()}.service"
    try:
        path.mkdir()
        os.setxattr(path, "trusted.delegate", b"1")
    except OSError as e:
        cgroup.remove(path)
        pytest.skip(f"cannot make a delegated cgroup under {mount}: {e.strerror}")
    try:
        yield path
    finally:
        cgroup.kill(path)
        wait_for(lambda: cgroup.remove(path), 10)


def in_cgroup(path: Path) -> Callable[[], None]:
    """A preexec_fn: the child joins `path` before it runs anything."""
    return lambda: cgroup.join(path, os.getpid())


def test_sigterm_for_a_restart_leaves_the_models_to_the_next_daemon(
    tmp_path: Path, service_cgroup: Path, listener: NotifyListener
) -> None:
    unit = service_cgroup.name
    fake = FakeSystemctl(tmp_path / "bin")
    models = f"m: {{backend: vllm, model: org/m, port: {free_port()}}}\n"
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "PATH": fake.path()}
    d = Daemon(tmp_path, models, extra_env=env)
    d.env["PATH"] = f"{fake.dir}{os.pathsep}{FAKES_DIR}{os.pathsep}{os.environ['PATH']}"
    d.preexec = in_cgroup(service_cgroup)
    try:
        fake.answer(f"41 {unit} restart running\n")
        d.start()
        row = d.wait_all_ready()["m"]
        server_cgroup = cgroup.own_cgroup(Path(f"/proc/{row['pid']}/cgroup").read_text())
        assert f"/{unit}/m-" in str(server_cgroup), "the layout of a delegated unit"
        procs = wait_for(lambda: d.processes() if len(d.processes()) >= 4 else None)
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0, d.log()
        assert f"SIGTERM: {unit} is restarting: every model runs on" in d.log()
        assert not [p for p in procs if not alive(p)], "every process of the model runs on"
        assert fake.calls() == [f"list-jobs --no-legend --no-pager --full {unit}"]

        fake.answer(f"42 {unit} stop running\n")
        d.start()
        again = d.wait_all_ready()["m"]
        assert (again["pid"], again["restarts"]) == (row["pid"], 0), "adopted"
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0, d.log()
        assert f"SIGTERM: {unit} is stopping: stopping every model" in d.log()
        assert gone([p.pid for p in procs])
        assert d.processes() == []
    finally:
        d.stop()
    assert not d.leftovers


def test_stop_post_stops_what_a_killed_daemon_left_only_when_the_unit_stops(
    tmp_path: Path, service_cgroup: Path, listener: NotifyListener
) -> None:
    unit = service_cgroup.name
    fake = FakeSystemctl(tmp_path / "bin")
    models = f"m: {{backend: vllm, model: org/m, port: {free_port()}}}\n"
    d = Daemon(tmp_path, models, extra_env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    d.env["PATH"] = f"{fake.dir}{os.pathsep}{FAKES_DIR}{os.pathsep}{os.environ['PATH']}"
    d.preexec = in_cgroup(service_cgroup)
    control = service_cgroup / ".control"  # where systemd runs ExecStopPost=

    def stop_post() -> str:
        control.mkdir(exist_ok=True)
        r = subprocess.run(
            [*LLMSUP, "systemd", "stop-post", "-f", str(d.manifest)],
            env=d.env,
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=in_cgroup(control),
        )
        assert r.returncode == 0, r.stderr
        return r.stdout

    try:
        d.start()
        d.wait_all_ready()
        procs = wait_for(lambda: d.processes() if len(d.processes()) >= 4 else None)
        d.kill_daemon()
        # something else the unit's cgroup holds (in the daemon's leaf): killed at the end
        stray = subprocess.Popen(
            ["sleep", "300"], preexec_fn=in_cgroup(service_cgroup / cgroup.DAEMON_LEAF)
        )
        fake.answer(f"43 {unit} restart running\n")
        assert f"{unit} is in a restart job: its models run on" in stop_post()
        fake.answer("")
        assert f"{unit} has no stop job" in stop_post()
        assert not [p for p in procs if not alive(p)] and stray.poll() is None

        fake.answer(f"44 {unit} stop running\n")
        said = stop_post()
        assert f"{unit} is stopping: stopping what is left of its models" in said
        assert "  m: stopped pid " in said
        assert f"killed what else was left in the unit's cgroup: pid {stray.pid}" in said
        assert stray.wait(5) == -signal.SIGKILL
        assert gone([p.pid for p in procs])
        assert cgroup.procs(service_cgroup) == set()
    finally:
        d.stop()


# ------------------------------------------------------------ the notify protocol


@dataclass(frozen=True)
class Datagram:
    t: float
    pid: int
    fields: tuple[str, ...]


class NotifyListener:
    """What systemd's side of NOTIFY_SOCKET sees: each datagram with its sender's pid."""

    CREDS = struct.calcsize("3i")  # struct ucred: pid, uid, gid

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.datagrams: list[Datagram] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._done.is_set():
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(self.CREDS))
            except TimeoutError:
                continue
            pid = -1
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid, _, _ = struct.unpack("3i", cdata[: self.CREDS])
            fields = tuple(data.decode().split("\n"))
            self.datagrams.append(Datagram(time.monotonic(), pid, fields))

    def lines(self) -> list[tuple[int, Datagram, str]]:
        """(index of the datagram, datagram, field), in the order they arrived."""
        return [(i, d, f) for i, d in enumerate(list(self.datagrams)) for f in d.fields]

    def first(self, match: Callable[[str], bool]) -> int:
        return next((i for i, _, f in self.lines() if match(f)), -1)

    def close(self) -> None:
        self._done.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    sock = NotifyListener(str(tmp_path / "notify.sock"))
    try:
        yield sock
    finally:
        sock.close()


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def test_daemon_speaks_sd_notify_from_its_main_pid(
    tmp_path: Path, listener: NotifyListener
) -> None:
    models = f"""\
    m:
      backend: vllm
      model: org/m
      gpus: [0, 1]
      port: {free_port()}
      # stopping takes the whole stop_timeout (2s): EXTEND_TIMEOUT_USEC has time to show
      env: {{FAKE_LOAD_TIME: "0.3", FAKE_IGNORE_SIGTERM: "1"}}
    """
    notify_env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"}
    d = Daemon(tmp_path, models, extra_env=notify_env)
    d.env.pop("WATCHDOG_PID", None)
    try:
        d.start()
        assert d.proc is not None
        main = d.proc.pid
        d.wait_all_ready()
        wait_for(lambda: listener.first(lambda f: f == "STATUS=1/1 ready") >= 0, 10)
        ready = listener.first(lambda f: f == "READY=1")
        wait_for(
            lambda: sum(i > ready and f == "WATCHDOG=1" for i, _, f in listener.lines()) >= 10,
            10,
            message=f"too few pings: {listener.datagrams}",
        )
        # the servers get none of systemd's variables: only llmsup talks to systemd
        server = psutil.Process(d.status()["m"]["pid"])

        def whole_tree() -> list[psutil.Process] | None:
            procs = [server, *server.children(recursive=True)]
            return procs if len(procs) == 5 else None

        # the API server, its resource tracker, the EngineCore and two TP workers
        procs = wait_for(whole_tree, message="the server's tree never complete")
        for p in procs:  # the EngineCore and the workers blank theirs: nothing to read there
            env = environ_of(p.pid)
            assert not [v for v in NOTIFY_VARS if v in env], (p.cmdline(), env)
        assert MARKER in environ_of(server.pid)
        pids = [p.pid for p in procs]
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0, d.log()
        assert gone(pids)
        assert d.processes() == []
    finally:
        d.stop()

    lines = listener.lines()
    assert {g.pid for _, g, _ in lines} == {main}, "every datagram comes from the main pid"
    fields = [f for _, _, f in lines]
    assert fields.count("READY=1") == 1 and fields.count("STOPPING=1") == 1
    ready = listener.first(lambda f: f == "READY=1")
    stopping = listener.first(lambda f: f == "STOPPING=1")
    assert {f for i, _, f in lines if i < ready} <= {"WATCHDOG=1"}, "only pings before READY=1"
    status = [i for i, _, f in lines if f.startswith("STATUS=") and i < stopping]
    assert status and ready < status[0], "STATUS= follows READY=1"
    assert [f for i, _, f in lines if i == status[-1]] == ["STATUS=1/1 ready"]
    assert "STATUS=stopping all models" in lines[stopping][1].fields
    extend = [(i, f) for i, _, f in lines if f.startswith("EXTEND_TIMEOUT_USEC=")]
    assert extend, "stopping asks systemd for more time"
    assert all(i > stopping for i, _ in extend)
    assert all(int(f.split("=")[1]) >= 2_000_000 for _, f in extend), "at least stop_timeout"
    # WATCHDOG=1 keeps coming while running (its pace is measured in bench/watchdog.py)
    pings = [g.t for i, g, f in lines if f == "WATCHDOG=1" and ready < i < stopping]
    assert len(pings) >= 10


def test_daemon_without_notify_socket_runs_as_usual(tmp_path: Path) -> None:
    models = f"m: {{backend: vllm, model: org/m, port: {free_port()}}}\n"
    d = Daemon(tmp_path, models, extra_env={"WATCHDOG_USEC": "400000"})
    d.env.pop("NOTIFY_SOCKET", None)
    try:
        d.start()
        d.wait_all_ready()
        pids = [p.pid for p in d.processes()]
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0, d.log()
        assert gone(pids)
        assert d.processes() == []
    finally:
        d.stop()


def test_notifier_sends_to_an_abstract_address() -> None:
    name = f"llmsup-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = NotifyListener("\0" + name)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.enabled and n.address == "\0" + name
        n.send("READY=1", "STATUS=2/2 ready")
        wait_for(lambda: sock.datagrams, 5)
        n.close()
        n.close()
    finally:
        sock.close()
    assert sock.datagrams[0].fields == ("READY=1", "STATUS=2/2 ready")
    assert sock.datagrams[0].pid == os.getpid()


def test_notifier_addresses_and_watchdog() -> None:
    me = str(os.getpid())
    assert Notifier({"NOTIFY_SOCKET": "/run/systemd/notify"}).address == "/run/systemd/notify"
    for env in ({}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "relative/notify"}):
        n = Notifier(env)
        assert not n.enabled and n.watchdog_interval is None
        n.send("READY=1")  # silent no-op
        n.close()

    def interval(**env: str) -> float | None:
        return Notifier({"NOTIFY_SOCKET": "@x", **env}).watchdog_interval

    assert interval(WATCHDOG_USEC="400000") == pytest.approx(0.2)
    assert interval(WATCHDOG_USEC="30000000", WATCHDOG_PID=me) == pytest.approx(15)
    assert interval(WATCHDOG_USEC="400000", WATCHDOG_PID=str(os.getppid())) is None
    assert interval(WATCHDOG_USEC="0") is None
    assert interval(WATCHDOG_USEC="soon") is None
    assert interval() is None
    assert Notifier({"WATCHDOG_USEC": "400000"}).watchdog_interval is None


def test_notifier_never_fails_when_systemd_is_gone(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    n.send("WATCHDOG=1")
    n.close()


def test_status_line() -> None:
    assert status_line([]) == "0/0 ready"
    assert status_line([("a", "READY", ""), ("b", "READY", "")]) == "2/2 ready"
    rows = [
        ("a", "READY", ""),
        ("qwen", "LOADING", "model loaded (60%)"),
        ("b", "BACKOFF", ""),
        ("c", "READY", ""),
    ]
    assert status_line(rows) == "2/4 ready; qwen loading model loaded (60%); b backoff"
    many = [(f"model-{i}", "STARTING", "x" * 40) for i in range(20)]
    assert len(status_line(many)) <= 200


# ------------------------------------------------------------ a real systemd

MANIFEST = "/etc/llmsup/test fleet 100%/models.yaml"  # ExecStart= quoting, end to end
DROP_IN = f"""\
[Service]
Environment=PATH={FAKES_DIR}:{systemd_container.CONTAINER_PATH}
WatchdogSec=3s
RestartSec=1s
LimitCORE=0
"""


def container_manifest(load_a: str, stubborn_a: bool = False) -> str:
    """Two models on the container's own loopback; only `a`'s entry depends on `load_a`
    (and `stubborn_a`: it ignores SIGTERM, so stopping it takes its stop_timeout, 8s)."""
    a_env = f'FAKE_LOAD_TIME: "{load_a}"' + (', FAKE_IGNORE_SIGTERM: "1"' if stubborn_a else "")
    a_stop = ", stop_timeout: 8s" if stubborn_a else ""
    return f"""{FAST_DEFAULTS}models:
  a: {{backend: vllm, model: org/a, port: 18001, gpus: [0], env: {{{a_env}}}{a_stop}}}
  b: {{backend: ollama, model: "qwen2.5:0.5b", port: 18002, gpus: [1]}}
"""


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[systemd_container.Container]:
    # Skip only for a missing prerequisite, decided before trying; once root and the
    # tools are here, a tree that will not build or a system that will not boot fails.
    reason = systemd_container.missing_prerequisite()
    if reason is not None:
        pytest.skip(f"no systemd container here: {reason}")
    with systemd_container.booted(tmp_path_factory.mktemp("nspawn")) as c:
        yield c


def status_inside(c: systemd_container.Container) -> dict[str, Any]:
    r = c.run(sys.executable, "-m", "llmsup.cli", "status", "--json", "-f", MANIFEST, timeout=30)
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def models_inside(c: systemd_container.Container) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in status_inside(c)["models"]}


def all_ready(c: systemd_container.Container) -> dict[str, dict[str, Any]] | None:
    rows = models_inside(c)
    return rows if all(r["state"] == "READY" for r in rows.values()) else None


def model_processes(c: systemd_container.Container) -> list[psutil.Process]:
    """Processes inside the container that llmsup launched: they carry its marker, or
    run a fake from FAKES_DIR (vLLM's EngineCore and workers blank their environment)."""
    out = []
    for p in c.processes():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and (
                MARKER in p.environ() or str(FAKES_DIR) in cmdline(p)
            ):
                out.append(p)
        except psutil.Error:
            continue
    return out


def until(predicate: Callable[[], T | None], timeout: float, message: str) -> T:
    return wait_for(predicate, timeout, interval=0.3, message=message)


def cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def unit_cgroup_procs(c: systemd_container.Container) -> list[int]:
    """Every process in llmsup.service's cgroup and below (pids inside the container)."""
    script = (
        "cg=$(awk '$3 == \"cgroup2\" {print $2; exit}' /proc/self/mounts)"
        "/system.slice/llmsup.service; "
        '[ -d "$cg" ] || exit 0; find "$cg" -name cgroup.procs -exec cat {} +'
    )
    return [int(pid) for pid in c.run("sh", "-c", script).stdout.split()]


def same_processes(before: list[psutil.Process]) -> list[str]:
    """Those of `before` that are no longer the very processes they were."""
    return [cmdline(p) or str(p.pid) for p in before if not alive(p)]


def journal(c: systemd_container.Container, after: str = "") -> str:
    """llmsup.service's journal; with `after` (an earlier one), what came since."""
    r = c.run("journalctl", "--no-pager", "-o", "short-monotonic", "-u", "llmsup", check=False)
    return r.stdout.removeprefix(after)


@pytest.mark.container
@pytest.mark.timeout(900)
def test_shipped_unit_verifies_in_a_real_system(container: systemd_container.Container) -> None:
    c = container
    c.write("/root/shipped/llmsup.service", SHIPPED.read_text())
    analyze = ["systemd-analyze", "verify", *man_check(c.run)]  # minbase has no man-db
    r = c.run(*analyze, "/root/shipped/llmsup.service", check=False)
    assert "/usr/local/bin/llmsup is not executable" in r.stderr, "verify checks ExecStart"
    c.run("ln", "-s", str(VENV_LLMSUP), "/usr/local/bin/llmsup")
    assert c.run("/usr/local/bin/llmsup", "--version").stdout.startswith("llmsup")
    r = c.run(*analyze, "/root/shipped/llmsup.service", check=False)
    assert (r.returncode, r.stderr, r.stdout) == (0, "", "")


@pytest.mark.container
@pytest.mark.timeout(900)
def test_under_a_real_systemd(container: systemd_container.Container) -> None:
    c = container
    try:
        _install_start_reload_watchdog_stop(c)
        _killed_while_stopping_then_down(c)
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- journalctl -u llmsup ---\n{journal(c)}") from None


def _install_start_reload_watchdog_stop(c: systemd_container.Container) -> None:
    def show(*props: str) -> dict[str, str]:
        return c.show("llmsup.service", *props)

    # install: the drop-in first, so that install's own daemon-reload loads both
    c.write("/etc/systemd/system/llmsup.service.d/test.conf", DROP_IN)
    c.write(MANIFEST, container_manifest("0.3"))
    c.write("/etc/llmsup/env", "LLMSUP_TEST_SECRET=from-the-env-file\n", mode="600")
    r = c.run(sys.executable, "-m", "llmsup.cli", "systemd", "install", "-f", MANIFEST)
    assert "wrote /etc/systemd/system/llmsup.service" in r.stdout
    assert "not running here" not in r.stdout and "failed" not in r.stderr, (r.stdout, r.stderr)
    analyze = ["systemd-analyze", "verify", *man_check(c.run)]
    r = c.run(*analyze, "/etc/systemd/system/llmsup.service", check=False)
    assert (r.returncode, r.stderr) == (0, ""), "the installed unit and the drop-in verify"
    props = show("LoadState", "Type", "NotifyAccess", "ExecStart", "DropInPaths")
    assert (props["LoadState"], props["Type"], props["NotifyAccess"]) == (
        "loaded",
        "notify",
        "main",
    )
    assert f"argv[]={VENV_LLMSUP} up --foreground -f {MANIFEST} ;" in props["ExecStart"]

    # start: returns once READY=1 came, so the control socket answers at once
    c.run("systemctl", "start", "llmsup", timeout=150)
    props = show("ActiveState", "SubState", "MainPID", "WatchdogUSec")
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
    assert props["WatchdogUSec"] == "3s", (
        "the drop-in's WatchdogSec= (systemd shows it once started)"
    )
    main = int(props["MainPID"])
    environ = c.run("cat", f"/proc/{main}/environ").stdout.split("\0")
    assert "LLMSUP_TEST_SECRET=from-the-env-file" in environ, "EnvironmentFile= is read"
    daemon = status_inside(c)["daemon"]
    assert (daemon["pid"], daemon["manifest"]) == (main, MANIFEST)
    assert daemon["state_dir"] == "/var/lib/llmsup"  # StateDirectory=
    rows = until(lambda: all_ready(c), 60, "models never READY")

    # Delegate=yes: the daemon sits in a leaf of the unit's cgroup, each server in a
    # cgroup of its own beside it (found and killed whatever its session or environment).
    def cgroup_of(pid: int) -> str:
        return cgroup.own_cgroup(c.run("cat", f"/proc/{pid}/cgroup").stdout) or ""

    unit_cgroup = cgroup_of(main).removesuffix("/supervisor")
    assert unit_cgroup.endswith("/llmsup.service"), cgroup_of(main)
    for name in ("a", "b"):
        server_cgroup = cgroup_of(rows[name]["pid"])
        assert server_cgroup.startswith(f"{unit_cgroup}/{rows[name]['unit']}-"), server_cgroup
    wait_for(lambda: show("StatusText")["StatusText"] == "2/2 ready", 10, interval=0.3)

    # reload: only the changed model restarts
    a_server = next(p for p in c.processes() if c.pid_inside(p) == rows["a"]["pid"])

    def a_tree() -> list[psutil.Process] | None:  # vllm, tracker, EngineCore, Worker
        procs = [a_server, *a_server.children(recursive=True)]
        return procs if len(procs) == 4 else None

    old_a = until(a_tree, 30, "a's process tree never complete")
    c.write(MANIFEST, container_manifest("0.4"))
    c.run("systemctl", "reload", "llmsup")

    def a_restarted() -> dict[str, dict[str, Any]] | None:
        now = all_ready(c)
        return now if now and now["a"]["pid"] != rows["a"]["pid"] else None

    after = until(a_restarted, 60, "a never restarted on reload")
    assert after["b"]["pid"] == rows["b"]["pid"] and after["b"]["restarts"] == 0
    assert not any(alive(p) for p in old_a)
    props = show("MainPID", "NRestarts")
    assert (int(props["MainPID"]), props["NRestarts"]) == (main, "0"), "the watchdog was fed"

    # systemctl restart: the daemon alone restarts (KillMode=process; it asks systemd
    # why it got SIGTERM and leaves); the new one adopts every model, none reloads
    old = model_processes(c)
    # vllm, its tracker, EngineCore, Worker; ollama, its runner
    assert len(old) >= 6, [cmdline(p) for p in old]
    mark = journal(c)
    c.run("systemctl", "restart", "llmsup", timeout=150)
    props = show("ActiveState", "MainPID", "NRestarts")
    assert props["ActiveState"] == "active" and props["NRestarts"] == "0", props
    assert int(props["MainPID"]) not in (0, main), "a new daemon"
    main = int(props["MainPID"])
    adopted = until(lambda: all_ready(c), 60, "not READY after systemctl restart")
    assert {n: (r["pid"], r["restarts"]) for n, r in adopted.items()} == {
        n: (r["pid"], 0) for n, r in after.items()
    }
    assert not same_processes(old), "every process of every model runs on"
    assert status_inside(c)["daemon"]["pid"] == main
    said = journal(c, after=mark)
    assert "SIGTERM: llmsup.service is restarting" in said
    assert "llmsup.service is in a restart job: its models run on" in said, "ExecStopPost="

    # a frozen daemon: the watchdog kills it alone, systemd starts it again, and the
    # new daemon adopts the models, which ran on meanwhile
    mark = journal(c)
    c.run("kill", "-STOP", str(main))

    def restarted() -> dict[str, str] | None:
        p = show("ActiveState", "MainPID", "NRestarts")
        fresh = p["MainPID"] not in ("0", str(main)) and p["ActiveState"] == "active"
        return p if fresh and p["NRestarts"] == "1" else None

    props = until(restarted, 60, "no restart by the watchdog")
    said = journal(c, after=mark)
    assert "Watchdog timeout" in said
    new = until(lambda: all_ready(c), 60, "not READY after the watchdog's restart")
    assert status_inside(c)["daemon"]["pid"] == int(props["MainPID"])
    assert {n: (r["pid"], r["restarts"]) for n, r in new.items()} == {
        n: (r["pid"], 0) for n, r in after.items()
    }
    assert not same_processes(old)
    assert "llmsup.service has no stop job" in said, "ExecStopPost= left them to the next daemon"

    # stop: the daemon stops its models and exits 0; nothing is left in the cgroup
    running = model_processes(c)
    assert running
    mark = journal(c)
    c.run("systemctl", "stop", "llmsup", timeout=330)
    props = show("ActiveState", "Result", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    assert gone([p.pid for p in running])
    assert model_processes(c) == []
    assert [cmd for cmd in map(cmdline, c.processes()) if str(FAKES_DIR) in cmd] == []
    assert unit_cgroup_procs(c) == []
    assert "SIGTERM: llmsup.service is stopping: stopping every model" in journal(c, after=mark)


def _killed_while_stopping_then_down(c: systemd_container.Container) -> None:
    """A daemon SIGKILLed while it stops its models (as TimeoutStopSec= would):
    ExecStopPost= stops the rest. `llmsup down --keep-models` leaves the models to the
    unit's next start; `llmsup down` stops everything, the unit included."""

    def show(*props: str) -> dict[str, str]:
        return c.show("llmsup.service", *props)

    c.write(MANIFEST, container_manifest("0.3", stubborn_a=True))
    c.run("systemctl", "start", "llmsup", timeout=150)
    until(lambda: all_ready(c), 60, "models never READY")
    running = model_processes(c)
    main = show("MainPID")["MainPID"]
    mark = journal(c)
    c.run("systemctl", "stop", "--no-block", "llmsup")
    # `a` ignores SIGTERM: the daemon waits its stop_timeout (8s) before SIGKILL
    until(lambda: "b: stopped" in journal(c, after=mark), 30, "the daemon never began stopping")
    assert [p for p in running if alive(p)], "a still runs"
    c.run("kill", "-KILL", main)

    def stopped() -> dict[str, str] | None:
        p = show("ActiveState", "Result", "ExecMainStatus")
        return p if p["ActiveState"] in ("inactive", "failed") else None

    props = until(stopped, 60, "the unit never stopped")
    assert props["ExecMainStatus"] == str(int(signal.SIGKILL)), props
    said = journal(c, after=mark)
    assert "llmsup.service is stopping: stopping what is left of its models" in said
    assert "  a: stopped pid " in said, "ExecStopPost= stopped a"
    assert gone([p.pid for p in running])
    assert model_processes(c) == []
    assert unit_cgroup_procs(c) == []

    # `down --keep-models`: the unit stops, its models run on; its next start adopts them
    c.write(MANIFEST, container_manifest("0.3"))
    c.run("systemctl", "start", "llmsup", timeout=150)
    rows = until(lambda: all_ready(c), 60, "models never READY")
    running = model_processes(c)
    assert running
    cli = [sys.executable, "-m", "llmsup.cli"]
    c.run(*cli, "down", "--keep-models", "-f", MANIFEST, timeout=120)
    props = until(stopped, 30, "the unit never stopped after `llmsup down --keep-models`")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    assert not same_processes(running)
    c.run("systemctl", "start", "llmsup", timeout=150)
    adopted = until(lambda: all_ready(c), 60, "models never READY again")
    assert {n: r["pid"] for n, r in adopted.items()} == {n: r["pid"] for n, r in rows.items()}

    # `llmsup down`: every model and the daemon stop; the unit is inactive, its cgroup empty
    mark = journal(c)
    c.run(*cli, "down", "-f", MANIFEST, timeout=120)
    props = until(stopped, 30, "the unit never stopped after `llmsup down`")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    assert "llmsup.service has no stop job" in journal(c, after=mark)
    assert gone([p.pid for p in running])
    assert model_processes(c) == []
    assert unit_cgroup_procs(c) == []


USER_MANIFEST = "/etc/llmsup/as-a-user.yaml"


@pytest.mark.container
@pytest.mark.timeout(900)
def test_unit_for_a_service_user_in_a_real_system(
    container: systemd_container.Container,
) -> None:
    """`install --user-name` and `--path`, no drop-in: `vllm` is found through the
    unit's PATH alone, the daemon and its servers run as that user, in the state
    directory systemd made for it from the manifest's state_dir."""
    c = container
    try:
        _as_a_service_user(c)
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- journalctl -u llmsup ---\n{journal(c)}") from None
    finally:
        c.run("systemctl", "stop", "llmsup", check=False, timeout=330)


def _as_a_service_user(c: systemd_container.Container) -> None:
    c.run("systemctl", "stop", "llmsup", check=False, timeout=330)  # an earlier test's
    c.run("rm", "-rf", "/etc/systemd/system/llmsup.service.d")  # its PATH would hide ours
    c.run("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "llm")
    for path in systemd_container.binds():  # the interpreter sits under /root (0700) here
        for parent in Path(path).parents:
            if parent != Path("/"):
                c.run("chmod", "o+x", str(parent), check=False)
    c.write(
        USER_MANIFEST,
        f"state_dir: /var/lib/llmsup-llm\n{FAST_DEFAULTS}models:\n"
        "  a: {backend: vllm, model: org/a, port: 18011}\n",
    )
    unit_path = f"{FAKES_DIR}:{systemd_container.CONTAINER_PATH}"
    install = ["systemd", "install", "-f", USER_MANIFEST, "--user-name", "llm"]
    r = c.run(sys.executable, "-m", "llmsup.cli", *install, "--path", unit_path)
    assert "wrote /etc/systemd/system/llmsup.service" in r.stdout, (r.stdout, r.stderr)
    assert "not on the unit's PATH" not in r.stderr, r.stderr
    r = c.run("cat", "/etc/systemd/system/llmsup.service")
    assert "User=llm\n" in r.stdout and "StateDirectory=llmsup-llm\n" in r.stdout
    analyze = ["systemd-analyze", "verify", *man_check(c.run)]
    r = c.run(*analyze, "/etc/systemd/system/llmsup.service", check=False)
    assert (r.returncode, r.stderr) == (0, "")

    c.run("systemctl", "start", "llmsup", timeout=150)
    props = c.show("llmsup.service", "ActiveState", "MainPID")
    assert props["ActiveState"] == "active", props
    assert c.run("stat", "-c", "%U", f"/proc/{props['MainPID']}").stdout.strip() == "llm"
    assert c.run("stat", "-c", "%U %a", "/var/lib/llmsup-llm").stdout.split() == ["llm", "700"]

    def ready() -> dict[str, Any] | None:
        status = ["status", "--json", "-f", USER_MANIFEST]
        r = c.run(sys.executable, "-m", "llmsup.cli", *status, timeout=30, check=False)
        rows = json.loads(r.stdout)["models"] if r.returncode == 0 else []
        return rows[0] if rows and rows[0]["state"] == "READY" else None

    row = until(ready, 60, "a never READY under User=llm")
    assert c.run("stat", "-c", "%U", f"/proc/{row['pid']}").stdout.strip() == "llm"
    # not root: the daemon asks systemd over D-Bus whether it restarts
    c.run("systemctl", "restart", "llmsup", timeout=150)
    again = until(ready, 60, "a never READY after systemctl restart under User=llm")
    assert again["pid"] == row["pid"], journal(c)
    c.run("systemctl", "stop", "llmsup", timeout=330)
    props = c.show("llmsup.service", "ActiveState", "Result")
    assert props == {"ActiveState": "inactive", "Result": "success"}
    assert unit_cgroup_procs(c) == []
