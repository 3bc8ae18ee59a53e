"""The fake `ollama` executable: `ollama serve`, `ollama --version`, and its runners.

It behaves as FACTS.md describes Ollama 0.33: it listens on OLLAMA_HOST at
once but holds requests until "GPU discovery" ends, keeps pulled models in a
JSON file under OLLAMA_MODELS, runs each loaded model in an `ollama runner`
child on a random local port, and SIGKILLs its runners on SIGTERM (a
SIGKILLed server orphans them). Faults are injected through the FAKE_*
environment and the control file described in _fakecommon's docstring and in
README.md.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import _fakegpu
from _fakecommon import (
    HERE,
    VERSION,
    FakeConfig,
    FakeHTTPServer,
    Faults,
    Handler,
    MainLoop,
    OpenAIError,
    count_tokens,
    embedding,
    env_flag,
    exit_now,
    free_port,
    install_signals,
    kill_quietly,
    log_raw,
    make_server,
    openai_generate,
    python_executable,
    set_process_name,
    start_serving,
    tick_output,
    tokens,
    watch_control_file,
)

SCRIPT = os.path.join(HERE, "ollama")
STORE_FILE = "fake-ollama-store.json"
DEFAULT_KEEP_ALIVE_S = 300.0
RUNNER_POLL_S = 0.1
RUNNER_START_TIMEOUT_S = 10.0
FOREVER_S = 2**63 / 1e9  # Go's largest time.Duration: about 292 years
DEFAULT_VRAM = 2 * _fakegpu.GiB  # what a runner takes on a simulated GPU

USAGE = """Large language model runner

Usage:
  ollama [flags]
  ollama [command]

Available Commands:
  serve       Start ollama
  help        Help about any command

Flags:
  -h, --help      help for ollama
  -v, --version   Show version information
"""


# ---------------------------------------------------------------------------
# Logging in Ollama's formats: slog on stderr, gin's access log on stdout.


def slog(level: str, source: str, msg: str, **attrs: Any) -> None:
    now = datetime.datetime.now().astimezone()
    stamp = now.isoformat(timespec="milliseconds")
    parts = [f"time={stamp}", f"level={level}", f"source={source}", f"msg={json.dumps(msg)}"]
    for key, value in attrs.items():
        text = str(value)
        parts.append(f"{key}={json.dumps(text) if (' ' in text or not text) else text}")
    log_raw(sys.stderr, " ".join(parts))


def compact(obj: Any) -> bytes:
    """One NDJSON line, spaced as Go's encoding/json writes it."""
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def now_iso(offset_s: float = 0.0) -> str:
    when = datetime.datetime.now().astimezone() + datetime.timedelta(seconds=offset_s)
    return when.isoformat()


# ---------------------------------------------------------------------------
# Parsing


def parse_ollama_host(value: str | None) -> tuple[str, int]:
    """OLLAMA_HOST as Ollama reads it: host:port, host, :port or scheme://host:port."""
    default_port = 11434
    text = (value or "").strip()
    scheme, sep, hostport = text.partition("://")
    if not sep:
        hostport = text
    elif scheme == "http":
        default_port = 80
    elif scheme == "https":
        default_port = 443
    hostport = hostport.split("/", 1)[0]
    host, port = "127.0.0.1", default_port
    m = re.fullmatch(r"\[([^\]]*)\]:(\d*)|([^:]*):(\d*)", hostport)
    if m:
        host = m.group(1) if m.group(1) is not None else m.group(3)
        port_text = m.group(2) if m.group(1) is not None else m.group(4)
        port = int(port_text) if port_text and int(port_text) <= 65535 else default_port
    elif hostport:
        host = hostport.strip("[]")
    return (host or "0.0.0.0"), port


_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_go_duration(text: str) -> float:
    """Seconds from a Go duration ("5m", "-1m", "1h30m"); errors worded like Go's."""
    orig = text
    quoted = json.dumps(orig, ensure_ascii=False)
    negative = False
    if text[:1] in ("-", "+"):
        negative = text[0] == "-"
        text = text[1:]
    if text == "0":
        return 0.0
    if not text:
        raise ValueError(f"time: invalid duration {quoted}")
    total = 0.0
    while text:
        number = re.match(r"\d*(\.\d*)?", text)
        digits = number.group(0) if number else ""
        if digits in ("", "."):
            raise ValueError(f"time: invalid duration {quoted}")
        text = text[len(digits) :]
        unit = re.match(r"[^\d.]*", text)
        name = unit.group(0) if unit else ""
        if not name:
            raise ValueError(f"time: missing unit in duration {quoted}")
        if name not in _DURATION_UNITS:
            unit_q = json.dumps(name, ensure_ascii=False)
            raise ValueError(f"time: unknown unit {unit_q} in duration {quoted}")
        total += float(digits) * _DURATION_UNITS[name]
        text = text[len(name) :]
    return -total if negative else total


def default_keep_alive() -> float | None:
    """OLLAMA_KEEP_ALIVE: a duration or whole seconds; None means forever."""
    raw = os.environ.get("OLLAMA_KEEP_ALIVE", "").strip()
    seconds = DEFAULT_KEEP_ALIVE_S
    if raw:
        try:
            seconds = parse_go_duration(raw)
        except ValueError:
            with contextlib.suppress(ValueError):
                seconds = float(int(raw))
    return None if seconds < 0 else seconds


def parse_keep_alive(req: dict[str, Any]) -> float | None:
    """A request's keep_alive in seconds (None: forever). ValueError: a 400."""
    if req.get("keep_alive") is None:
        return default_keep_alive()
    value = req["keep_alive"]
    if isinstance(value, bool):
        raise ValueError("json: cannot unmarshal bool into Go value of type api.Duration")
    if isinstance(value, (int, float)):
        return None if value < 0 else float(int(value))
    if isinstance(value, str):
        seconds = parse_go_duration(value)
        return None if seconds < 0 else seconds
    raise ValueError("json: cannot unmarshal value into Go value of type api.Duration")


def normalize(name: str) -> str:
    """`qwen2.5` is `qwen2.5:latest`."""
    name = name.strip()
    if ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    return name


def model_facts(name: str) -> dict[str, Any]:
    """Size, digest and details, made up from the name and stable across runs."""
    digest = hashlib.sha256(name.encode()).hexdigest()
    base = name.rsplit("/", 1)[-1]
    m = re.search(r"(\d+(?:\.\d+)?)b\b", base.lower())
    params = float(m.group(1)) * 1e9 if m else 1.5e9
    tag = base.rsplit(":", 1)[-1]
    quant = tag.upper() if re.match(r"(?i)q\d|f16|bf16|fp16", tag) else "Q4_K_M"
    family_match = re.match(r"[a-zA-Z]+\d*", base)
    family = family_match.group(0).lower() if family_match else "llama"
    return {
        "size": int(params * 0.6),
        "digest": digest,
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": family,
            "families": [family],
            "parameter_size": f"{params / 1e9:.1f}B",
            "quantization_level": quant,
        },
    }


# ---------------------------------------------------------------------------
# The model store: pulled models persist in a JSON file.


class Store:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, STORE_FILE)
        self.lock = threading.Lock()

    def models(self) -> dict[str, dict[str, Any]]:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        return data.get("models", {}) if isinstance(data, dict) else {}

    def _write(self, models: dict[str, dict[str, Any]]) -> None:
        os.makedirs(self.directory, exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"models": models}, f, indent=1)
        os.replace(tmp, self.path)

    def add(self, name: str) -> None:
        with self.lock:
            models = self.models()
            models[name] = {"modified_at": now_iso()}
            self._write(models)

    def remove(self, name: str) -> None:
        with self.lock:
            models = self.models()
            models.pop(name, None)
            self._write(models)


class GoHandler(Handler):
    server_version = ""


# ---------------------------------------------------------------------------
# Runners


class LoadError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Runner:
    def __init__(self, name: str, proc: subprocess.Popen[bytes], port: int) -> None:
        self.name = name
        self.proc = proc
        self.port = port
        self.loaded_at = time.monotonic()
        self.expires: float | None = None  # monotonic; None: never
        self.expires_wall: float = FOREVER_S
        self.active = 0
        self._lock = threading.Lock()
        # (size, size_vram) on a simulated GPU host; None without one.
        self.sizes: tuple[int, int] | None = None

    def use(self, delta: int) -> None:
        """Count requests in progress: a runner in use does not expire."""
        with self._lock:
            self.active += delta

    def keep(self, keep_alive: float | None) -> None:
        if keep_alive is None:
            self.expires, self.expires_wall = None, FOREVER_S
        else:
            self.expires, self.expires_wall = time.monotonic() + keep_alive, keep_alive


# ---------------------------------------------------------------------------
# The server


class OllamaServer:
    def __init__(self, cfg: FakeConfig, host: str, port: int, store: Store) -> None:
        self.cfg = cfg
        self.host = host
        self.port = port
        self.store = store
        self.faults = Faults(cfg.ignore_sigterm)
        self.loop = MainLoop()
        self.discovered = threading.Event()
        self.runners: dict[str, Runner] = {}
        self.spawned: list[subprocess.Popen[bytes]] = []
        self.sched = threading.RLock()
        self.kill_pending = False
        self.httpd: FakeHTTPServer | None = None
        self.stopping = False
        max_loaded = os.environ.get("OLLAMA_MAX_LOADED_MODELS", "").strip()
        self.max_loaded = int(max_loaded) if max_loaded.isdigit() else 0

    # -- process life

    def run(self) -> int:
        cfg = self.cfg
        set_process_name("ollama")
        install_signals(self.loop, self.faults, self.on_signal)
        watch_control_file(
            cfg.control_file, self.faults, lambda k, v: self.loop.post(lambda: self.on_shot(k, v))
        )
        slog(
            "INFO",
            "routes.go:1",
            "server config",
            env=f"map[OLLAMA_HOST:{os.environ.get('OLLAMA_HOST', '')} "
            f"OLLAMA_MODELS:{self.store.directory}]",
        )
        slog("INFO", "images.go:1", "total blobs: 0")
        if cfg.tick:
            tick_output(cfg.tick)
        try:
            self.httpd = make_server(self.host, self.port, GoHandler, self)
            start_serving(self.httpd)
        except OSError as e:
            address = f"{self.host}:{self.port}"
            log_raw(
                sys.stderr,
                f"Error: listen tcp {address}: bind: {(e.strerror or str(e)).lower()}",
            )
            return 1
        slog("INFO", "routes.go:1", f"Listening on {self.host}:{self.port} (version {VERSION})")
        slog("INFO", "runner.go:1", "discovering available GPUs...")
        self.loop.call_later(cfg.discovery_time, self.end_discovery)
        if cfg.exit_code is not None and cfg.exit_after is not None:
            code = cfg.exit_code
            self.loop.call_later(cfg.exit_after, lambda: self.crash(code))
        if cfg.kill_child_after is not None:
            self.loop.call_later(cfg.kill_child_after, self.kill_runner)
        self.loop.every(RUNNER_POLL_S, self.check_runners)
        return self.loop.run()

    def end_discovery(self) -> None:
        devices = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        total, available = "80.0 GiB", "79.3 GiB"
        sim = _fakegpu.sim_path()
        if sim is not None:
            with contextlib.suppress(_fakegpu.SimError):
                free, size = _fakegpu.memory_on(sim, runner_device())
                total = f"{size / _fakegpu.GiB:.1f} GiB"
                available = f"{free / _fakegpu.GiB:.1f} GiB"
        slog(
            "INFO",
            "types.go:1",
            "inference compute",
            id=devices.split(",")[0] if devices else "GPU-00000000-0000-0000-0000-000000000000",
            library="CUDA",
            name="CUDA0",
            total=total,
            available=available,
        )
        self.discovered.set()
        if self.cfg.hang_after is not None:
            self.loop.call_later(self.cfg.hang_after, lambda: self.faults.trigger("hang"))
        if self.cfg.deep_hang_after is not None:
            self.loop.call_later(self.cfg.deep_hang_after, lambda: self.faults.trigger("deep_hang"))

    def on_signal(self, signum: int) -> None:
        slog("INFO", "routes.go:1", f"received {signal.Signals(signum).name}, shutting down")
        self.shutdown(0)

    def on_shot(self, key: str, value: Any) -> None:
        if key == "exit":
            try:
                code = int(value)
            except (TypeError, ValueError):
                code = 1
            self.crash(code)
        elif key == "kill_child" and value:
            self.kill_runner()

    def crash(self, code: int) -> None:
        slog("ERROR", "routes.go:1", f"fatal error, exiting with code {code}")
        self.shutdown(code)

    def shutdown(self, code: int) -> None:
        """Close at once and SIGKILL every runner, as `ollama serve` does on SIGTERM."""
        if self.stopping:
            return
        self.stopping = True
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
        for proc in self.spawned:
            kill_quietly(proc.pid, signal.SIGKILL)
        for proc in self.spawned:
            proc.wait()
        self.loop.stop(code)

    def kill_runner(self) -> None:
        """SIGKILL the oldest runner, or the next one loaded if none is."""
        live = sorted(self.runners.values(), key=lambda r: r.loaded_at)
        if live:
            slog("INFO", "sched.go:1", "killing runner", model=live[0].name, pid=live[0].proc.pid)
            kill_quietly(live[0].proc.pid, signal.SIGKILL)
        else:
            self.kill_pending = True

    def check_runners(self) -> None:
        """Forget dead runners, unload expired ones (main loop, every RUNNER_POLL_S)."""
        if self.stopping or not self.sched.acquire(blocking=False):
            return
        try:
            if self.kill_pending and self.runners:
                self.kill_pending = False
                self.kill_runner()
            now = time.monotonic()
            for runner in list(self.runners.values()):
                code = runner.proc.poll()
                if code is not None:
                    slog(
                        "ERROR",
                        "sched.go:1",
                        "llama runner process has terminated",
                        model=runner.name,
                        error=f"exit status {code}" if code >= 0 else "signal: killed",
                    )
                    self.forget(runner)
                elif runner.expires is not None and now >= runner.expires and not runner.active:
                    self.unload(runner.name)
        finally:
            self.sched.release()

    # -- the scheduler

    def forget(self, runner: Runner) -> None:
        self.runners.pop(runner.name, None)
        with contextlib.suppress(ValueError):
            self.spawned.remove(runner.proc)

    def unload(self, name: str) -> None:
        with self.sched:
            runner = self.runners.get(name)
            if runner is None:
                return
            slog("INFO", "sched.go:1", "unloading model", model=name)
            kill_quietly(runner.proc.pid, signal.SIGKILL)
            runner.proc.wait()
            self.forget(runner)

    def load(self, name: str, keep_alive: float | None) -> Runner:
        """The runner for `name`, started if needed; its expiry counts from now."""
        with self.sched:
            runner = self.runners.get(name)
            if runner is not None and runner.proc.poll() is not None:
                self.forget(runner)
                runner = None
            if runner is None:
                runner = self.start_runner(name)
            runner.keep(keep_alive)
            return runner

    def start_runner(self, name: str) -> Runner:
        started = time.monotonic()
        if self.cfg.fail_load:
            time.sleep(self.cfg.load_time)
            raise LoadError(
                500,
                "llama runner process has terminated: error loading model: "
                "unable to allocate CUDA0 buffer",
            )
        if self.max_loaded and len(self.runners) >= self.max_loaded:
            oldest = min(self.runners.values(), key=lambda r: r.loaded_at)
            self.unload(oldest.name)
        port = free_port()
        argv = [python_executable(), SCRIPT, "runner", "--model", name, "--port", str(port)]
        slog("INFO", "server.go:1", "starting llama server", cmd=" ".join(argv[1:]))
        proc = subprocess.Popen(argv)
        self.spawned.append(proc)
        deadline = started + RUNNER_START_TIMEOUT_S
        while True:
            code = proc.poll()
            if code is not None:
                with contextlib.suppress(ValueError):
                    self.spawned.remove(proc)
                raise LoadError(500, f"llama runner process has terminated: exit status {code}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                kill_quietly(proc.pid, signal.SIGKILL)
                proc.wait()
                raise LoadError(500, "timed out waiting for llama runner to start")
            time.sleep(0.01)
        remaining = started + self.cfg.load_time - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)
        runner = Runner(name, proc, port)
        sim = _fakegpu.sim_path()
        if sim is not None:
            with contextlib.suppress(_fakegpu.SimError):
                runner.sizes = (runner_vram(), _fakegpu.held_by(sim, {proc.pid}))
        self.runners[name] = runner
        slog(
            "INFO",
            "server.go:1",
            f"llama runner started in {time.monotonic() - started:.2f} seconds",
        )
        return runner

    # -- HTTP

    def access_log(self, h: Handler, code: int) -> None:
        took = (time.monotonic() - getattr(h, "started", time.monotonic())) * 1000
        stamp = time.strftime("%Y/%m/%d - %H:%M:%S")
        method = f"{h.command:<8}"
        client = h.client_address[0]
        log_raw(
            sys.stdout,
            f'[GIN] {stamp} | {code} | {took:12.6f}ms | {client:>15} | {method} "{h.path_only}"',
        )

    def handle(self, h: Handler) -> None:
        h.started = time.monotonic()  # type: ignore[attr-defined]
        self.discovered.wait()
        self.faults.block_if_hung()
        path, method = h.path_only, h.command
        routes: dict[tuple[str, str], Any] = {
            ("GET", "/"): self.root,
            ("HEAD", "/"): self.root,
            ("GET", "/api/version"): self.version,
            ("HEAD", "/api/version"): self.version,
            ("GET", "/api/tags"): self.tags,
            ("GET", "/api/ps"): self.ps,
            ("POST", "/api/pull"): self.pull,
            ("POST", "/api/generate"): self.generate,
            ("POST", "/api/chat"): self.generate,
            ("POST", "/api/embed"): self.embed,
            ("DELETE", "/api/delete"): self.delete,
            ("GET", "/v1/models"): self.openai_models,
            ("POST", "/v1/chat/completions"): self.openai,
            ("POST", "/v1/completions"): self.openai,
            ("POST", "/v1/embeddings"): self.openai,
        }
        route = routes.get((method, path))
        if route is None:
            h.send_text(404, "404 page not found")
            return
        route(h)

    def root(self, h: Handler) -> None:
        if self.faults.active("health_500"):
            h.send_json(500, {"error": "internal error"})
        else:
            h.send_text(200, "Ollama is running")

    def version(self, h: Handler) -> None:
        h.send_json(200, {"version": VERSION})

    def tags(self, h: Handler) -> None:
        models = []
        for name, info in sorted(self.store.models().items()):
            facts = model_facts(name)
            models.append(
                {
                    "name": name,
                    "model": name,
                    "modified_at": info.get("modified_at", ""),
                    "size": facts["size"],
                    "digest": facts["digest"],
                    "details": facts["details"],
                }
            )
        h.send_json(200, {"models": models})

    def ps(self, h: Handler) -> None:
        models = []
        for runner in sorted(self.runners.values(), key=lambda r: r.loaded_at):
            facts = model_facts(runner.name)
            size, size_vram = runner.sizes or (facts["size"], facts["size"])
            remaining = runner.expires_wall
            if runner.expires is not None:
                remaining = max(0.0, runner.expires - time.monotonic())
            models.append(
                {
                    "name": runner.name,
                    "model": runner.name,
                    "size": size,
                    "digest": facts["digest"],
                    "details": facts["details"],
                    "expires_at": now_iso(remaining),
                    "size_vram": size_vram,
                    "context_length": int(os.environ.get("OLLAMA_CONTEXT_LENGTH") or 4096),
                }
            )
        h.send_json(200, {"models": models})

    def _request(self, h: Handler) -> dict[str, Any] | None:
        """The JSON body, or None after answering 400."""
        req, err = h.read_json()
        if err or not isinstance(req, dict):
            h.send_json(400, {"error": err or "invalid request body"})
            return None
        return req

    def pull(self, h: Handler) -> None:
        req = self._request(h)
        if req is None:
            return
        model = req.get("model") or req.get("name")
        if not isinstance(model, str) or not model:
            h.send_json(400, {"error": "model is required"})
            return
        name = normalize(model)
        stream = req.get("stream") is not False
        present = name in self.store.models()
        facts = model_facts(name)
        layers = [(facts["digest"], facts["size"])] + [
            (hashlib.sha256(f"{name}/{part}".encode()).hexdigest(), size)
            for part, size in (("template", 1_482), ("license", 11_343), ("params", 96))
        ]
        if stream:
            h.begin_stream("application/x-ndjson")

        def emit(obj: dict[str, Any]) -> None:
            self.faults.block_if_hung()
            if stream:
                h.write_chunk(compact(obj))

        def fail(message: str) -> None:
            slog("ERROR", "images.go:1", "pull failed", model=name, error=message)
            if stream:
                emit({"error": message})
                h.end_stream()
            else:
                h.send_json(500, {"error": message})

        pull_time = 0.0 if present else self.cfg.pull_time
        emit({"status": "pulling manifest"})
        for index, (digest, total) in enumerate(layers):
            steps = 10 if index == 0 and not present else 1
            share = 0.8 if index == 0 else 0.05
            for step in range(1, steps + 1):
                time.sleep(pull_time * share / steps)
                if self.cfg.pull_fail and index == 0 and step == steps // 2 + 1:
                    fail("max retries exceeded: unexpected EOF")
                    return
                emit(
                    {
                        "status": f"pulling {digest[:12]}",
                        "digest": f"sha256:{digest}",
                        "total": total,
                        "completed": total * step // steps,
                    }
                )
        emit({"status": "verifying sha256 digest"})
        emit({"status": "writing manifest"})
        self.store.add(name)
        if stream:
            emit({"status": "success"})
            h.end_stream()
        else:
            h.send_json(200, {"status": "success"})

    def delete(self, h: Handler) -> None:
        req = self._request(h)
        if req is None:
            return
        model = str(req.get("model") or req.get("name") or "")
        name = normalize(model) if model else ""
        if name not in self.store.models():
            h.send_json(404, {"error": f"model '{model}' not found"})
            return
        self.unload(name)
        self.store.remove(name)
        h.send_bytes(200, b"", None)

    def _known(self, h: Handler, model: Any) -> str | None:
        """The stored name of `model`, or None after answering 400/404."""
        if not isinstance(model, str) or not model:
            h.send_json(400, {"error": "model is required"})
            return None
        name = normalize(model)
        if name not in self.store.models():
            h.send_json(404, {"error": f"model '{model}' not found"})
            return None
        return name

    def generate(self, h: Handler) -> None:
        """/api/generate and /api/chat: load, unload, or generate."""
        chat = h.path_only == "/api/chat"
        req = self._request(h)
        if req is None:
            return
        try:
            keep_alive = parse_keep_alive(req)
        except ValueError as e:
            h.send_json(400, {"error": str(e)})
            return
        model = req.get("model")
        name = self._known(h, model)
        if name is None:
            return
        assert isinstance(model, str)  # _known answered 400 otherwise
        prompt = req.get("messages") if chat else req.get("prompt")
        if not prompt:
            if keep_alive == 0:
                self.unload(name)
                reason = "unload"
            else:
                try:
                    self.load(name, keep_alive)
                except LoadError as e:
                    h.send_json(e.status, {"error": str(e)})
                    return
                reason = "load"
            body: dict[str, Any] = {"model": model, "created_at": now_iso()}
            if chat:
                body["message"] = {"role": "assistant", "content": ""}
            else:
                body["response"] = ""
            h.send_json(200, {**body, "done_reason": reason, "done": True})
            return
        started = time.monotonic()
        try:
            runner = self.load(name, keep_alive)
        except LoadError as e:
            h.send_json(e.status, {"error": str(e)})
            return
        runner.use(1)
        try:
            self._generate(h, req, model, chat, runner, started)
        finally:
            runner.use(-1)
            if keep_alive == 0:
                self.unload(name)
            else:
                runner.keep(keep_alive)

    def _generate(
        self, h: Handler, req: dict[str, Any], model: str, chat: bool, runner: Runner, t0: float
    ) -> None:
        options = req.get("options") or {}
        limit = options.get("num_predict") if isinstance(options, dict) else None
        n = limit if isinstance(limit, int) and limit > 0 else 16
        stream = req.get("stream") is not False
        prompt_count = count_tokens(req.get("messages") if chat else req.get("prompt"))
        load_ns = int((time.monotonic() - t0) * 1e9)

        def piece(text: str) -> dict[str, Any]:
            if chat:
                return {"message": {"role": "assistant", "content": text}}
            return {"response": text}

        if stream:
            h.begin_stream("application/x-ndjson")
        text = ""
        for tok in tokens(n):
            self.faults.block_if_hung(deep=True)
            time.sleep(self.cfg.token_delay)
            if runner.proc.poll() is not None:
                error = {"error": "llama runner process has terminated: signal: killed"}
                if stream:
                    h.write_chunk(compact(error))
                    h.end_stream()
                else:
                    h.send_json(500, error)
                return
            text += tok
            if stream:
                line = {"model": model, "created_at": now_iso(), **piece(tok), "done": False}
                h.write_chunk(compact(line))
        total_ns = int((time.monotonic() - t0) * 1e9)
        final = {
            "model": model,
            "created_at": now_iso(),
            **piece("" if stream else text),
            "done": True,
            "done_reason": "length" if limit else "stop",
            "total_duration": total_ns,
            "load_duration": load_ns,
            "prompt_eval_count": prompt_count,
            "prompt_eval_duration": 1_000_000,
            "eval_count": n,
            "eval_duration": max(0, total_ns - load_ns),
        }
        if not chat:
            final["context"] = list(range(1, prompt_count + n + 1))
        if stream:
            h.write_chunk(compact(final))
            h.end_stream()
        else:
            h.send_json(200, final)

    def embed(self, h: Handler) -> None:
        req = self._request(h)
        if req is None:
            return
        try:
            keep_alive = parse_keep_alive(req)
        except ValueError as e:
            h.send_json(400, {"error": str(e)})
            return
        model = req.get("model")
        name = self._known(h, model)
        if name is None:
            return
        started = time.monotonic()
        try:
            self.load(name, keep_alive)
        except LoadError as e:
            h.send_json(e.status, {"error": str(e)})
            return
        self.faults.block_if_hung(deep=True)
        inputs = req.get("input")
        items = inputs if isinstance(inputs, list) else [inputs or ""]
        h.send_json(
            200,
            {
                "model": model,
                "embeddings": [embedding(str(x)) for x in items],
                "total_duration": int((time.monotonic() - started) * 1e9),
                "load_duration": 0,
                "prompt_eval_count": count_tokens(items),
            },
        )

    # -- OpenAI compatibility

    def openai_models(self, h: Handler) -> None:
        data = []
        for name, info in sorted(self.store.models().items()):
            owner = name.rsplit("/", 2)[-2] if name.count("/") >= 1 else "library"
            created = int(time.time())
            with contextlib.suppress(ValueError, KeyError):
                created = int(datetime.datetime.fromisoformat(info["modified_at"]).timestamp())
            data.append({"id": name, "object": "model", "created": created, "owned_by": owner})
        h.send_json(200, {"object": "list", "data": data})

    def openai(self, h: Handler) -> None:
        try:
            self._openai(h)
        except OpenAIError as e:
            h.send_json(e.status, e.body)

    def _openai(self, h: Handler) -> None:
        req, err = h.read_json()
        if err or not isinstance(req, dict):
            raise OpenAIError(400, err or "invalid request body", "invalid_request_error")
        model = req.get("model")
        if not isinstance(model, str) or not model:
            raise OpenAIError(400, "model is required", "invalid_request_error")
        name = normalize(model)
        if name not in self.store.models():
            raise OpenAIError(404, f"model '{model}' not found", "not_found_error")
        try:
            runner = self.load(name, default_keep_alive())
        except LoadError as e:
            raise OpenAIError(e.status, str(e), "api_error") from e
        runner.use(1)
        try:
            if h.path_only == "/v1/embeddings":
                self.faults.block_if_hung(deep=True)
                inputs = req.get("input")
                items = inputs if isinstance(inputs, list) else [inputs or ""]
                used = count_tokens(items)
                data = [
                    {"object": "embedding", "embedding": embedding(str(x)), "index": i}
                    for i, x in enumerate(items)
                ]
                usage = {"prompt_tokens": used, "total_tokens": used}
                h.send_json(200, {"object": "list", "data": data, "model": model, "usage": usage})
                return
            kind = "chat" if h.path_only == "/v1/chat/completions" else "text"
            prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
            openai_generate(
                h,
                kind,
                req,
                model,
                self.cfg.token_delay,
                self.faults,
                id_prefix=f"{prefix}{int.from_bytes(os.urandom(2), 'big')}",
                fingerprint="fp_ollama",
            )
        finally:
            runner.use(-1)
            runner.keep(default_keep_alive())


# ---------------------------------------------------------------------------
# The runner child


def runner_device() -> str:
    """The GPU a runner uses: the first of CUDA_VISIBLE_DEVICES, else 0."""
    devices = _fakegpu.visible_devices()
    return devices[0] if devices else "0"


def runner_vram() -> int:
    """FAKE_OLLAMA_VRAM: bytes a runner takes on a simulated GPU (2 GiB)."""
    raw = os.environ.get("FAKE_OLLAMA_VRAM", "").strip()
    try:
        return max(0, int(float(raw))) if raw else DEFAULT_VRAM
    except ValueError:
        return DEFAULT_VRAM


class RunnerApp:
    def access_log(self, h: Handler, code: int) -> None:
        pass

    def handle(self, h: Handler) -> None:
        if h.path_only == "/health":
            h.send_json(200, {"status": "ok", "progress": 1})
        else:
            h.send_text(404, "404 page not found")


def runner_main(argv: list[str]) -> int:
    """`ollama runner --model M --port P`: serves /health until killed.

    It never watches its parent: a SIGKILLed server leaves it running.
    """
    opts = dict(zip(argv[::2], argv[1::2], strict=False))
    port = int(opts.get("--port", "0"))
    set_process_name("ollama")
    faults = Faults(env_flag("FAKE_IGNORE_SIGTERM"))
    loop = MainLoop()
    watch_control_file(os.environ.get("FAKE_CONTROL_FILE"), faults)
    install_signals(loop, faults, lambda _s: loop.stop(0))
    sim = _fakegpu.sim_path()
    if sim is not None:
        # As much of the model as fits goes on the GPU; the rest stays on the CPU.
        with contextlib.suppress(_fakegpu.SimError):
            delay = _fakegpu.release_delay()
            _fakegpu.allocate(sim, os.getpid(), runner_device(), runner_vram(), delay)
    server = make_server("127.0.0.1", port, GoHandler, RunnerApp())
    start_serving(server)
    slog("INFO", "runner.go:1", "starting go runner", model=opts.get("--model", ""), port=port)
    return loop.run()


# ---------------------------------------------------------------------------
# Entry point


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0
    if argv[0] in ("-v", "--version"):
        sys.stdout.write(f"ollama version is {VERSION}\n")
        return 0
    if argv[0] == "runner":
        exit_now(runner_main(argv[1:]))
    if argv[0] != "serve":
        sys.stderr.write(f'Error: unknown command "{argv[0]}" for "ollama"\n')
        return 1
    cfg = FakeConfig(load_time_default=0.1)
    if cfg.exit_code is not None and not cfg.exit_after:
        slog("ERROR", "routes.go:1", f"fatal error, exiting with code {cfg.exit_code}")
        return cfg.exit_code
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    host, port = parse_ollama_host(os.environ.get("OLLAMA_HOST"))
    directory = os.environ.get("OLLAMA_MODELS") or os.path.join(
        os.environ.get("TMPDIR") or "/tmp", "fake-ollama-models"
    )
    exit_now(OllamaServer(cfg, host, port, Store(directory)).run())
    return 0
