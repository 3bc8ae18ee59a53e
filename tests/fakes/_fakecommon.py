"""Code shared by the fake `vllm` and `ollama` executables beside this file.

Standard library only, and only cheap imports: the fakes must start in a few
tens of milliseconds on any python3 >= 3.10.

Fault injection (environment, read once at start; seconds as floats):

    FAKE_LOAD_TIME=T        vLLM: load time before listening (default 0.5).
                            Ollama: time to load a model (default 0.1).
    FAKE_DISCOVERY_TIME=T   Ollama: requests wait this long after start (default 0.3).
    FAKE_PULL_TIME=T        Ollama: duration of a pull (default 0.5).
    FAKE_TOKEN_DELAY=T      delay between generated tokens (default 0.01).
    FAKE_EXIT_CODE=N        exit with code N (1 if only FAKE_EXIT_AFTER is set),
    FAKE_EXIT_AFTER=T       T s after start (0, the default: at once, before
                            listening; later, the children are stopped first).
    FAKE_HANG_AFTER=T       T s after ready: accept connections, never answer.
    FAKE_HEALTH_OK_BUT_HUNG_AFTER=T
                            T s after ready: health answers, generation hangs.
    FAKE_KILL_CHILD_AFTER=T T s after start: SIGKILL the EngineCore (vLLM) or
                            the oldest runner (Ollama; the first one loaded
                            later if none is loaded at T).
    FAKE_IGNORE_SIGTERM=1   the server and its children ignore SIGTERM.
    FAKE_FAIL_LOAD=1        vLLM: exit 1 with a CUDA-OOM-like error after the
                            load time. Ollama: loading a model answers 500.
    FAKE_PULL_FAIL=1        Ollama: pull streams end with an {"error": ...} line.
    FAKE_CONTROL_FILE=PATH  JSON file polled every 0.2 s, see below.
    FAKE_LISTEN_STAMP=PATH  vLLM: append time.time() when the port begins to accept.
    FAKE_LOG_SPAM=N         vLLM: N bytes/s of progress lines on stdout from start,
                            written raw as a progress bar does: a write that
                            fails (EPIPE) is fatal, exit 1.
    FAKE_TICK=T             vLLM and Ollama servers: `tick N` on stdout every T s,
                            N = 0, 1, 2, ... from start: a line missing from a log
                            shows as a gap in the sequence.
    LLMSUP_FAKE_NVML=PATH   a simulated GPU host to take memory on (_fakegpu.py).
    FAKE_GPU_RELEASE_DELAY=T  simulated memory of a dead process is freed T s
                            after it is first seen dead (default 0).
    FAKE_OLLAMA_VRAM=N      Ollama: bytes a runner takes on the simulated GPU
                            (default 2 GiB).

Control file keys (the file may be absent, or rewritten at any time; write it
atomically, e.g. to a temporary name and then rename):

    {"hang": true}            like FAKE_HANG_AFTER, now; false lets requests go on.
    {"deep_hang": true}       health answers, generation hangs; false resumes.
    {"health_500": true}      vLLM /health (Ollama GET /) answers 500.
    {"ignore_sigterm": true}  the server and its children ignore SIGTERM.
    {"exit": N}               the server stops its children and exits with code N.
    {"kill_child": true}      SIGKILL the EngineCore (vLLM) or oldest runner (Ollama).

"exit" and "kill_child" are one-shot: the server that acts on them removes them
from the file, so a restarted server does not act on them again. The other
keys are states: they hold for every fake reading the file until changed.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import json
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

VERSION = "0.33.0"
HERE = os.path.dirname(os.path.abspath(__file__))
CONTROL_POLL_S = 0.2
PARENT_POLL_S = 0.1

# ---------------------------------------------------------------------------
# Configuration


def env_float(name: str, default: float | None = None) -> float | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        log_raw(sys.stderr, f"fake: ignoring {name}={raw!r}: not a number")
        return default


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


class FakeConfig:
    """The FAKE_* environment of one process."""

    def __init__(self, load_time_default: float) -> None:
        self.load_time: float = env_float("FAKE_LOAD_TIME", load_time_default) or 0.0
        self.discovery_time: float = env_float("FAKE_DISCOVERY_TIME", 0.3) or 0.0
        self.pull_time: float = env_float("FAKE_PULL_TIME", 0.5) or 0.0
        self.token_delay: float = env_float("FAKE_TOKEN_DELAY", 0.01) or 0.0
        code = env_float("FAKE_EXIT_CODE")
        after = env_float("FAKE_EXIT_AFTER")
        self.exit_code: int | None = None
        self.exit_after: float | None = None
        if code is not None or after is not None:
            self.exit_code = int(code) if code is not None else 1
            self.exit_after = after or 0.0
        self.hang_after = env_float("FAKE_HANG_AFTER")
        self.deep_hang_after = env_float("FAKE_HEALTH_OK_BUT_HUNG_AFTER")
        self.kill_child_after = env_float("FAKE_KILL_CHILD_AFTER")
        self.ignore_sigterm = env_flag("FAKE_IGNORE_SIGTERM")
        self.fail_load = env_flag("FAKE_FAIL_LOAD")
        self.pull_fail = env_flag("FAKE_PULL_FAIL")
        self.control_file = os.environ.get("FAKE_CONTROL_FILE") or None
        self.log_spam: float = env_float("FAKE_LOG_SPAM", 0.0) or 0.0
        self.tick: float = env_float("FAKE_TICK", 0.0) or 0.0


# ---------------------------------------------------------------------------
# Logging: whole lines, flushed, never raising (the reader may be gone).

_log_lock = threading.Lock()


def log_raw(stream: Any, line: str) -> None:
    with _log_lock:
        try:
            stream.write(line + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass


def vllm_log(level: str, source: str, msg: str, prefix: str = "", stream: Any = None) -> None:
    """A line in vLLM's format: `INFO 11-25 10:00:00 [api_server.py:1] msg`."""
    stamp = time.strftime("%m-%d %H:%M:%S")
    lead = f"({prefix}) " if prefix else ""
    log_raw(stream or sys.stdout, f"{lead}{level} {stamp} [{source}] {msg}")


def spam_output(rate: float) -> None:
    """FAKE_LOG_SPAM: `rate` bytes/s of progress lines on stdout, in a thread, written
    as a progress bar writes them (no handling of a failed write): a failed write
    ends the process with exit code 1, as it ends code that does not expect it."""

    def run() -> None:
        n = 0
        while True:
            tick = time.monotonic()
            out = bytearray()
            while len(out) < rate / 10:
                n += 1
                out += f"Loading safetensors checkpoint shards: step {n} |{'#' * 60}|\n".encode()
            try:
                os.write(1, out)
            except OSError as e:
                log_raw(sys.stderr, f"BrokenPipeError: [Errno {e.errno}] {e.strerror}")
                exit_now(1)
            time.sleep(max(0.0, 0.1 - (time.monotonic() - tick)))

    threading.Thread(target=run, name="fake-log-spam", daemon=True).start()


def tick_output(interval: float) -> None:
    """FAKE_TICK: `tick N` on stdout every `interval` s, in a thread (whole lines,
    never raising: a line that cannot be written is lost, and its number with it)."""

    def run() -> None:
        for n in itertools.count():
            log_raw(sys.stdout, f"tick {n}")
            time.sleep(interval)

    threading.Thread(target=run, name="fake-tick", daemon=True).start()


# ---------------------------------------------------------------------------
# Processes


def set_process_name(name: str) -> None:
    """Set the kernel's comm name (15 bytes at most), as setproctitle does."""
    raw = name.encode()[:15]
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_name = 15
        if libc.prctl(pr_set_name, ctypes.c_char_p(raw), 0, 0, 0) == 0:
            return
    except (OSError, AttributeError):
        pass
    with contextlib.suppress(OSError), open("/proc/self/comm", "wb") as f:
        f.write(raw)


def blank_environ() -> None:
    """Zero this process's environment area, as setproctitle does in vLLM's
    EngineCore and workers: /proc/PID/environ then reads as NUL bytes, so no
    variable set at launch (a supervisor's marker, say) can be read from outside.

    Like setproctitle, first move the C environment to fresh memory, so that
    getenv() and the children started later still see it; os.environ is a copy
    made at start and keeps its values.
    """
    import ctypes

    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rfind(b")") + 2 :].split()
        start, end = int(fields[47]), int(fields[48])  # env_start, env_end (fields 50, 51)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.clearenv()
        for key, value in os.environ.items():
            libc.setenv(os.fsencode(key), os.fsencode(value), 1)
        if end > start:
            ctypes.memset(start, 0, end - start)
    except (OSError, ValueError, IndexError, AttributeError) as e:
        log_raw(sys.stderr, f"fake: cannot blank the environment: {e}")


def python_executable() -> str:
    # sys.executable is empty in a process started with a made-up argv[0].
    if sys.executable:
        return sys.executable
    return os.readlink("/proc/self/exe")


def descendants(pid: int) -> list[int]:
    """Pids of all live descendants of `pid`, from /proc."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        children[int(fields[1])].append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_quietly(pid: int, sig: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, sig)


# ---------------------------------------------------------------------------
# The main loop: timers and posted callbacks, all run on the main thread.


class MainLoop:
    """Runs callbacks on the main thread until `stop(code)`.

    Signal handlers call `post_from_signal`, which only appends to a deque: taking
    a lock inside a handler could deadlock against the interrupted main thread.
    The loop therefore never sleeps longer than TICK.
    """

    TICK = 0.05

    def __init__(self) -> None:
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._posted: collections.deque[Callable[[], None]] = collections.deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._exit_code: int | None = None

    def call_at(self, when: float, fn: Callable[[], None]) -> None:
        with self._lock:
            heapq.heappush(self._timers, (when, next(self._seq), fn))
        self._wake.set()

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        self.call_at(time.monotonic() + delay, fn)

    def every(self, interval: float, fn: Callable[[], None]) -> None:
        def tick() -> None:
            fn()
            self.call_later(interval, tick)

        self.call_later(interval, tick)

    def post(self, fn: Callable[[], None]) -> None:
        """From any thread but not from a signal handler."""
        self._posted.append(fn)
        self._wake.set()

    def post_from_signal(self, fn: Callable[[], None]) -> None:
        self._posted.append(fn)

    def stop(self, code: int) -> None:
        if self._exit_code is None:
            self._exit_code = code

    def run(self) -> int:
        while self._exit_code is None:
            while self._posted and self._exit_code is None:
                self._posted.popleft()()
            now = time.monotonic()
            due: list[Callable[[], None]] = []
            with self._lock:
                while self._timers and self._timers[0][0] <= now:
                    due.append(heapq.heappop(self._timers)[2])
                timeout = self.TICK
                if self._timers:
                    timeout = max(0.0, min(timeout, self._timers[0][0] - now))
            for fn in due:
                if self._exit_code is not None:
                    break
                fn()
            if self._exit_code is None and not due:
                self._wake.wait(timeout)
                self._wake.clear()
        return self._exit_code


def exit_now(code: int) -> None:
    """Leave without interpreter teardown: daemon threads may hold sockets."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


# ---------------------------------------------------------------------------
# Faults: states set by the environment timers and by the control file.


class Faults:
    def __init__(self, ignore_sigterm: bool = False) -> None:
        self._cond = threading.Condition()
        self._set: set[str] = set()  # from FAKE_* timers: permanent
        self._control: dict[str, Any] = {}
        if ignore_sigterm:
            self._set.add("ignore_sigterm")

    def trigger(self, key: str) -> None:
        with self._cond:
            self._set.add(key)
            self._cond.notify_all()

    def set_control(self, control: dict[str, Any]) -> None:
        with self._cond:
            self._control = control
            self._cond.notify_all()

    def active(self, key: str) -> bool:
        return key in self._set or bool(self._control.get(key))

    def block_if_hung(self, deep: bool = False) -> None:
        """Block while hung (and, for generation, while deeply hung)."""
        with self._cond:
            while self.active("hang") or (deep and self.active("deep_hang")):
                self._cond.wait()


class ControlFile:
    """Reads FAKE_CONTROL_FILE; removes the one-shot keys it hands out."""

    ONE_SHOT = ("exit", "kill_child")

    def __init__(self, path: str) -> None:
        self.path = path

    def read(self, consume: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        """(state keys, one-shot keys); both empty if the file is absent or unreadable."""
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}, {}
        if not isinstance(data, dict):
            return {}, {}
        shots = {k: data.pop(k) for k in self.ONE_SHOT if k in data}
        if shots and consume:
            tmp = f"{self.path}.{os.getpid()}.tmp"
            try:
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(data, f)
                os.replace(tmp, self.path)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        return data, (shots if consume else {})


def watch_control_file(
    path: str | None, faults: Faults, on_shot: Callable[[str, Any], None] | None = None
) -> None:
    """Poll the control file in a daemon thread; one-shot keys go to `on_shot`."""
    if not path:
        return
    control = ControlFile(path)

    def poll() -> None:
        while True:
            state, shots = control.read(consume=on_shot is not None)
            faults.set_control(state)
            if on_shot is not None:
                for key, value in shots.items():
                    on_shot(key, value)
            time.sleep(CONTROL_POLL_S)

    threading.Thread(target=poll, name="control", daemon=True).start()


def install_signals(
    loop: MainLoop, faults: Faults, on_stop: Callable[[int], None], sigint: bool = True
) -> None:
    """SIGTERM (and SIGINT if `sigint`) post `on_stop(signum)` unless SIGTERM is ignored."""

    def handler(signum: int, _frame: Any) -> None:
        if signum == signal.SIGTERM and faults.active("ignore_sigterm"):
            return
        loop.post_from_signal(lambda: on_stop(signum))

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler if sigint else signal.SIG_IGN)


def sleep_forever_child(name: str, parent: int | None = None) -> int:
    """Body of a child that only sleeps: EngineCore workers, for instance.

    Given the pid of its `parent`, it leaves soon after that parent dies (vLLM's
    workers watch their EngineCore through a pipe); otherwise a killed parent
    leaves it running.
    """
    set_process_name(name)
    faults = Faults(env_flag("FAKE_IGNORE_SIGTERM"))
    loop = MainLoop()
    watch_control_file(os.environ.get("FAKE_CONTROL_FILE"), faults)
    install_signals(loop, faults, lambda _s: loop.stop(0), sigint=False)
    if parent is not None:

        def check_parent() -> None:
            if os.getppid() != parent:
                loop.stop(0)

        loop.every(PARENT_POLL_S, check_parent)
    return loop.run()


# ---------------------------------------------------------------------------
# HTTP


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class FakeHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    app: Any = None

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), which can wait on DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class FakeHTTPServer6(FakeHTTPServer):
    address_family = socket.AF_INET6


def make_server(host: str, port: int, handler: type, app: Any) -> FakeHTTPServer:
    """Bind (raising OSError if the port is taken) but do not listen yet."""
    cls = FakeHTTPServer6 if ":" in host else FakeHTTPServer
    server = cls((host, port), handler, bind_and_activate=False)
    try:
        server.server_bind()
    except OSError:
        server.server_close()
        raise
    server.app = app
    return server


def start_serving(server: FakeHTTPServer) -> threading.Thread:
    server.server_activate()
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="http", daemon=True
    )
    thread.start()
    return thread


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with Content-Length on every answer and chunked streams.

    Requests go to `self.server.app.handle(self)`.
    """

    protocol_version = "HTTP/1.1"
    # Real servers (uvicorn) set TCP_NODELAY; without it headers and body written
    # separately wait ~40 ms for the delayed ACK.
    disable_nagle_algorithm = True
    server_version = "uvicorn"
    timeout = None

    def version_string(self) -> str:
        return self.server_version

    def send_header(self, keyword: str, value: str) -> None:
        # Go's net/http sends no Server header: an empty server_version means none.
        if keyword == "Server" and not value:
            return
        super().send_header(keyword, value)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        app = self.server.app  # type: ignore[attr-defined]
        app.access_log(self, int(code) if str(code).isdigit() else 0)

    def _dispatch(self) -> None:
        app = self.server.app  # type: ignore[attr-defined]
        self.path_only = self.path.split("?", 1)[0]
        try:
            app.handle(self)
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    do_GET = do_POST = do_HEAD = do_DELETE = do_PUT = _dispatch

    # -- reading

    def read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            while True:
                line = self.rfile.readline()
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def read_json(self) -> tuple[Any, str | None]:
        """(object, None) or (None, error message)."""
        body = self.read_body()
        if not body.strip():
            return None, "missing request body"
        try:
            return json.loads(body), None
        except ValueError as e:
            return None, f"invalid JSON: {e}"

    # -- answering

    def send_bytes(
        self,
        status: int,
        body: bytes,
        content_type: str | None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj, separators=(",", ":")).encode()
        self.send_bytes(status, body, "application/json", headers)

    def send_text(self, status: int, text: str, content_type: str = "text/plain") -> None:
        self.send_bytes(status, text.encode(), f"{content_type}; charset=utf-8")

    def begin_stream(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")


# ---------------------------------------------------------------------------
# Text generation


_TEXT = "The quick brown fox jumps over the lazy dog while a fake model talks ."
_WORDS = _TEXT.split()


def tokens(n: int) -> Iterator[str]:
    """`n` tokens of deterministic text, each a word with its leading space."""
    for i in range(n):
        word = _WORDS[i % len(_WORDS)]
        yield word if i == 0 else " " + word


def count_tokens(value: Any) -> int:
    """A rough token count of a prompt, messages or embedding input."""
    if value is None:
        return 0
    if isinstance(value, str):
        return max(1, len(value.split()))
    if isinstance(value, int):
        return 1
    if isinstance(value, list):
        return sum(count_tokens(v) for v in value)
    if isinstance(value, dict):
        # a chat message: its content plus a few tokens of template
        return 4 + count_tokens(value.get("content"))
    return 1


def embedding(text: str, dims: int = 8) -> list[float]:
    """A small vector that depends only on `text`."""
    seed = sum(text.encode()) or 1
    return [round(((seed * (i + 7)) % 97) / 97.0 - 0.5, 6) for i in range(dims)]


class OpenAIError(Exception):
    """An OpenAI-style error answer: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self, status: int, message: str, type_: str, code: Any = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _max_tokens(req: dict[str, Any], kind: str) -> int:
    value = req.get("max_tokens")
    if value is None and kind == "chat":
        value = req.get("max_completion_tokens")
    if value is None:
        return 16
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise OpenAIError(
            400, f"max_tokens must be at least 1, got {value}.", "BadRequestError", 400
        )
    return value


def openai_generate(
    h: Handler,
    kind: str,
    req: dict[str, Any],
    model: str,
    token_delay: float,
    faults: Faults,
    on_tokens: Callable[[int, int], None] | None = None,
    id_prefix: str = "",
    fingerprint: str | None = None,
) -> None:
    """Answer /v1/chat/completions (kind "chat") or /v1/completions ("text").

    Raises OpenAIError for a bad request before anything is sent.
    """
    if kind == "chat":
        messages = req.get("messages")
        if not isinstance(messages, list) or not messages:
            raise OpenAIError(400, "messages: field required", "BadRequestError", 400)
        prompt_tokens = count_tokens(messages)
    else:
        if "prompt" not in req:
            raise OpenAIError(400, "prompt: field required", "BadRequestError", 400)
        prompt_tokens = count_tokens(req.get("prompt"))
    n = _max_tokens(req, kind)
    stream = bool(req.get("stream"))
    options = req.get("stream_options") or {}
    include_usage = stream and isinstance(options, dict) and bool(options.get("include_usage"))
    created = int(time.time())
    rid = (id_prefix or ("chatcmpl-" if kind == "chat" else "cmpl-")) + os.urandom(12).hex()
    usage = {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + n,
        "completion_tokens": n,
    }
    obj = "chat.completion" if kind == "chat" else "text_completion"
    extra = {"system_fingerprint": fingerprint} if fingerprint else {}

    def choice(text: str, finish: str | None, first: bool = False) -> dict[str, Any]:
        if kind != "chat":
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        key = "delta" if stream else "message"
        return {"index": 0, key: delta, "logprobs": None, "finish_reason": finish}

    if on_tokens:
        on_tokens(prompt_tokens, 0)
    if not stream:
        text = ""
        for tok in tokens(n):
            faults.block_if_hung(deep=True)
            time.sleep(token_delay)
            text += tok
        body = {
            "id": rid,
            "object": obj,
            "created": created,
            "model": model,
            "choices": [choice(text, "length", first=True)],
            "usage": usage,
            **extra,
        }
        if on_tokens:
            on_tokens(0, n)
        h.send_json(200, body)
        return

    def event(payload: Any) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
        h.write_chunk(f"data: {data}\n\n".encode())

    chunk_obj = obj + ".chunk" if kind == "chat" else obj
    head = {"id": rid, "object": chunk_obj, "created": created, "model": model, **extra}
    h.begin_stream("text/event-stream; charset=utf-8")
    if kind == "chat":
        event({**head, "choices": [choice("", None, first=True)]})
    for i, tok in enumerate(tokens(n)):
        faults.block_if_hung(deep=True)
        time.sleep(token_delay)
        event({**head, "choices": [choice(tok, "length" if i == n - 1 else None)]})
        if on_tokens:
            on_tokens(0, 1)
    if include_usage:
        event({**head, "choices": [], "usage": usage})
    event("[DONE]")
    h.end_stream()
