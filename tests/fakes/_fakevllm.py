"""The fake `vllm` executable: `vllm serve MODEL [flags]` and `vllm --version`.

It behaves as FACTS.md describes vLLM 0.33: flags parsed from the real flag
list, no listening socket until the model is "loaded", an EngineCore child
(and one worker per rank with tensor or pipeline parallelism) that outlives a
SIGKILLed API server, /health, /metrics and the OpenAI endpoints. Faults are
injected through the FAKE_* environment and the control file described in
_fakecommon's docstring and in README.md.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http import HTTPStatus
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
    blank_environ,
    count_tokens,
    descendants,
    embedding,
    exit_now,
    install_signals,
    kill_quietly,
    log_raw,
    make_server,
    openai_generate,
    python_executable,
    set_process_name,
    sleep_forever_child,
    spam_output,
    start_serving,
    tick_output,
    vllm_log,
    watch_control_file,
)

SCRIPT = os.path.join(HERE, "vllm")
DATA_DIR = os.path.join(HERE, "..", "..", "llmsup", "data")
FLAGS_FILE = os.path.join(DATA_DIR, "vllm-0.33-serve-flags.json")
VALUES_FILE = os.path.join(DATA_DIR, "vllm-0.33-values.json")
DEFAULT_MODEL = "Qwen/Qwen3-0.6B"

# Hidden sub-commands the fake runs its own children with.
ENGINE_CMD = "_engine_core"
WORKER_CMD = "_worker"

# The flag list has short forms as entries of their own; these are aliases.
SHORT_ALIASES = {
    "-tp": "--tensor-parallel-size",
    "-pp": "--pipeline-parallel-size",
    "-dp": "--data-parallel-size",
    "-q": "--quantization",
}
INT_FLAGS = {
    "--port",
    "--tensor-parallel-size",
    "--pipeline-parallel-size",
    "--data-parallel-size",
}
FLOAT_FLAGS = {"--gpu-memory-utilization", "--shutdown-timeout"}
CHILD_STOP_GRACE_S = 2.0
ENGINE_POLL_S = 0.5
# After the EngineCore dies, as measured on real vLLM: /health is 503 at once, the
# port closes at 2.1 s and the API server exits with code 0 at 2.3 s.
CLOSE_AFTER_ENGINE_DEATH_S = 2.1
EXIT_AFTER_ENGINE_DEATH_S = 2.3
# The end of a start, in fractions of the load time (real vLLM, 25 s: weights
# 22.3 s, engine 23.9 s, "Starting vLLM server on" 24.6 s, uvicorn's
# "Application startup complete." 25.0 s, then the port accepts).
ENGINE_UP_AT = 0.95
SERVER_LINE_AT = 0.97
DEFAULT_DRAIN_S = 0.2
DEFAULT_GPU_MEMORY_UTILIZATION = 0.92
GPU_CLAIM_AT = 0.1  # of the load time: when the workers' devices are initialised
GPU_CLAIM_RETRY_S = 0.05
GPU_CLAIM_DEADLINE_S = 10.0


# ---------------------------------------------------------------------------
# Command line


def build_parser() -> Any:
    import argparse

    with open(FLAGS_FILE, encoding="utf-8") as f:
        flags: dict[str, dict[str, Any]] = json.load(f)["flags"]
    parser = argparse.ArgumentParser(prog="vllm", allow_abbrev=False)
    parser.add_argument("-v", "--version", action="version", version=VERSION)
    sub = parser.add_subparsers(dest="subparser")
    serve = sub.add_parser(
        "serve",
        prog="vllm serve",
        usage="vllm serve [model_tag] [options]",
        help="Launch a local OpenAI-compatible API server to serve LLM completions via HTTP.",
        allow_abbrev=False,
    )
    serve.add_argument("model_tag", nargs="?", help="The model tag to serve.")
    short_of = {long: short for short, long in SHORT_ALIASES.items() if long in flags}
    for name, spec in flags.items():
        if name in ("-h", "--help") or SHORT_ALIASES.get(name) in flags:
            continue
        names = [name] + ([short_of[name]] if name in short_of else [])
        kwargs: dict[str, Any] = {"dest": name.lstrip("-").replace("-", "_")}
        nargs = spec.get("nargs")
        if nargs == "0":
            kwargs["action"] = "store_true"
        else:
            if nargs in ("+", "?"):
                kwargs["nargs"] = nargs
            if nargs == "?":
                kwargs["const"] = True
            if spec.get("choices"):
                kwargs["choices"] = [str(c) for c in spec["choices"]]
            if name in INT_FLAGS:
                kwargs["type"] = int
            elif name in FLOAT_FLAGS:
                kwargs["type"] = float
        serve.add_argument(*names, **kwargs)
    return parser


def normalize_flags(argv: list[str]) -> list[str]:
    """`--max_model_len=4k` means `--max-model-len=4k`, as in vLLM."""
    out = []
    for arg in argv:
        if arg.startswith("--"):
            key, eq, value = arg.partition("=")
            arg = key.replace("_", "-") + eq + value
        out.append(arg)
    return out


def _yaml_scalar(text: str) -> Any:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def config_file_args(path: str) -> list[str]:
    """Flags from a `--config` YAML file (flat keys, scalars and lists only)."""
    items: list[tuple[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.split(" #", 1)[0].rstrip()
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            stripped = line.strip()
            if stripped.startswith("- ") and items and isinstance(items[-1][1], list):
                items[-1][1].append(_yaml_scalar(stripped[2:]))
                continue
            key, _, value = stripped.partition(":")
            value = value.strip()
            if not value:
                items.append((key.strip(), []))
            elif value.startswith("[") and value.endswith("]"):
                parts = [_yaml_scalar(v) for v in value[1:-1].split(",") if v.strip()]
                items.append((key.strip(), parts))
            else:
                items.append((key.strip(), _yaml_scalar(value)))
    args: list[str] = []
    for key, value in items:
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False:
            continue
        elif isinstance(value, list):
            args += [flag, *(str(v) for v in value)]
        else:
            args += [flag, str(value)]
    return args


def expand_config(argv: list[str]) -> list[str]:
    """Insert `--config` file flags after `serve [model_tag]`: the command line wins."""
    if "serve" not in argv:
        return argv
    path = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    if not path:
        return argv
    try:
        extra = config_file_args(path)
    except OSError as e:
        log_raw(sys.stderr, f"vllm: error: cannot read config file {path}: {e}")
        raise SystemExit(2) from e
    at = argv.index("serve") + 1
    if at < len(argv) and not argv[at].startswith("-"):
        at += 1
    return argv[:at] + extra + argv[at:]


def parse_max_model_len(value: Any) -> int:
    text = str(value or "").strip()
    if not text or text in ("-1", "auto"):
        return 4096
    scale = {"k": 1000, "K": 1024, "m": 1000**2, "M": 1024**2}.get(text[-1], 1)
    if scale != 1:
        text = text[:-1]
    try:
        return int(float(text) * scale)
    except ValueError:
        return 4096


def engine_log_name(name: str) -> str:
    """vLLM prefixes engine log lines with EngineCore_DP<rank> even without data parallelism."""
    return name if "_DP" in name else f"{name}_DP0"


# ---------------------------------------------------------------------------
# The HTTP application


class VllmApp:
    def __init__(self, ns: Any, cfg: FakeConfig, faults: Faults) -> None:
        self.model = ns.model_tag or ns.model or DEFAULT_MODEL
        self.served = list(ns.served_model_name or [self.model])
        self.max_model_len = parse_max_model_len(ns.max_model_len)
        keys = list(ns.api_key or [])
        if os.environ.get("VLLM_API_KEY"):
            keys.append(os.environ["VLLM_API_KEY"])
        self.api_keys = keys
        self.cfg = cfg
        self.faults = faults
        self.access_log_on = not ns.disable_uvicorn_access_log
        self.engine_dead = False
        self.created = int(time.time())
        self.counts = threading.Lock()
        self.inflight = 0
        self.running = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft: list[float] = []

    # -- logging

    def access_log(self, h: Handler, code: int) -> None:
        if not self.access_log_on:
            return
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = ""
        host, port = h.client_address[:2]
        request = f"{h.command} {h.path} {h.request_version}"
        line = f'INFO:     {host}:{port} - "{request}" {code} {phrase}'
        log_raw(sys.stdout, f"(APIServer pid={os.getpid()}) {line}")

    # -- routing

    def handle(self, h: Handler) -> None:
        self.count("inflight", 1)
        try:
            self._route(h)
        finally:
            self.count("inflight", -1)

    def count(self, name: str, delta: int) -> None:
        with self.counts:
            setattr(self, name, getattr(self, name) + delta)

    def _route(self, h: Handler) -> None:
        self.faults.block_if_hung()
        path, method = h.path_only, h.command
        if path.startswith("/v1") and self.api_keys:
            auth = h.headers.get("Authorization", "")
            if not any(auth == f"Bearer {key}" for key in self.api_keys):
                h.send_json(401, {"error": "Unauthorized"})
                return
        routes = {
            "/health": ("GET",),
            "/ping": ("GET", "POST"),
            "/version": ("GET",),
            "/metrics": ("GET",),
            "/v1/models": ("GET",),
            "/v1/chat/completions": ("POST",),
            "/v1/completions": ("POST",),
            "/v1/embeddings": ("POST",),
        }
        if path not in routes:
            h.send_json(404, {"detail": "Not Found"})
            return
        if method not in routes[path]:
            h.send_json(405, {"detail": "Method Not Allowed"})
            return
        if path in ("/health", "/ping"):
            if self.engine_dead:
                h.send_bytes(503, b"", None)
            elif self.faults.active("health_500"):
                h.send_bytes(500, b"", None)
            else:
                h.send_bytes(200, b"", None)
        elif path == "/version":
            h.send_json(200, {"version": VERSION})
        elif path == "/metrics":
            h.send_bytes(200, self.metrics().encode(), "text/plain; version=0.0.4; charset=utf-8")
        elif path == "/v1/models":
            h.send_json(200, {"object": "list", "data": [self.model_card(n) for n in self.served]})
        else:
            try:
                self._inference(h, path)
            except OpenAIError as e:
                h.send_json(e.status, e.body)

    def model_card(self, name: str) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "vllm",
            "root": self.model,
            "parent": None,
            "max_model_len": self.max_model_len,
            "permission": [
                {
                    "id": "modelperm-" + os.urandom(8).hex(),
                    "object": "model_permission",
                    "created": self.created,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }

    def _inference(self, h: Handler, path: str) -> None:
        req, err = h.read_json()
        if err or not isinstance(req, dict):
            raise OpenAIError(400, err or "request body must be an object", "BadRequestError", 400)
        model = req.get("model") or self.served[0]
        if model not in self.served:
            raise OpenAIError(
                404, f"The model `{model}` does not exist.", "NotFoundError", 404, "model"
            )
        if self.engine_dead:
            raise OpenAIError(
                500,
                "EngineCore encountered an issue. See stack trace (above) for the root cause.",
                "InternalServerError",
                500,
            )
        if path == "/v1/embeddings":
            self.faults.block_if_hung(deep=True)
            inputs = req.get("input")
            if isinstance(inputs, str) or (
                isinstance(inputs, list) and inputs and isinstance(inputs[0], int)
            ):
                inputs = [inputs]
            if not isinstance(inputs, list) or not inputs:
                raise OpenAIError(400, "input: field required", "BadRequestError", 400)
            used = count_tokens(inputs)
            self.count("prompt_tokens", used)
            h.send_json(
                200,
                {
                    "id": "embd-" + os.urandom(12).hex(),
                    "object": "list",
                    "created": int(time.time()),
                    "model": self.served[0],
                    "data": [
                        {"index": i, "object": "embedding", "embedding": embedding(str(x))}
                        for i, x in enumerate(inputs)
                    ],
                    "usage": {"prompt_tokens": used, "total_tokens": used, "completion_tokens": 0},
                },
            )
            return
        kind = "chat" if path == "/v1/chat/completions" else "text"
        started = time.monotonic()
        first = [True]

        def on_tokens(prompt: int, generated: int) -> None:
            self.count("prompt_tokens", prompt)
            self.count("generation_tokens", generated)
            if generated and first[0]:
                first[0] = False
                self.ttft.append(time.monotonic() - started)

        self.count("running", 1)
        try:
            openai_generate(
                h, kind, req, self.served[0], self.cfg.token_delay, self.faults, on_tokens
            )
        finally:
            self.count("running", -1)

    def metrics(self) -> str:
        labels = f'engine="0",model_name="{self.served[0]}"'
        families = [
            (
                "num_requests_running",
                "gauge",
                "Number of requests in model execution batches.",
                self.running,
            ),
            ("num_requests_waiting", "gauge", "Number of requests waiting to be processed.", 0),
            (
                "kv_cache_usage_perc",
                "gauge",
                "KV-cache usage. 1 means 100 percent usage.",
                min(1.0, self.running * 0.05),
            ),
            (
                "prompt_tokens_total",
                "counter",
                "Number of prefill tokens processed.",
                self.prompt_tokens,
            ),
            (
                "generation_tokens_total",
                "counter",
                "Number of generation tokens processed.",
                self.generation_tokens,
            ),
        ]
        lines = []
        for short, kind, help_, value in families:
            name = "vllm:" + short
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
            lines.append(f"{name}{{{labels}}} {float(value)}")
        name = "vllm:time_to_first_token_seconds"
        lines.append(f"# HELP {name} Histogram of time to first token in seconds.")
        lines.append(f"# TYPE {name} histogram")
        samples = list(self.ttft)
        for bucket in (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5):
            count = sum(1 for s in samples if s <= bucket)
            lines.append(f'{name}_bucket{{{labels},le="{bucket}"}} {float(count)}')
        lines.append(f'{name}_bucket{{{labels},le="+Inf"}} {float(len(samples))}')
        lines.append(f"{name}_count{{{labels}}} {float(len(samples))}")
        lines.append(f"{name}_sum{{{labels}}} {sum(samples)}")
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# The API server process


class ApiServer:
    """The `vllm serve` process: load timeline, engine children, shutdown."""

    def __init__(self, ns: Any, cfg: FakeConfig) -> None:
        self.ns = ns
        self.cfg = cfg
        self.faults = Faults(cfg.ignore_sigterm)
        self.loop = MainLoop()
        self.app = VllmApp(ns, cfg, self.faults)
        self.host = ns.host or "0.0.0.0"
        self.port = ns.port if ns.port is not None else 8000
        self.tp = ns.tensor_parallel_size or 1
        self.pp = ns.pipeline_parallel_size or 1
        self.dp = ns.data_parallel_size or 1
        self.httpd: FakeHTTPServer | None = None
        self.serving = False
        self.ready = False
        self.stopping = False
        self.engines: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.workers: dict[str, list[str]] = {}  # engine name -> its workers, by rank
        self.pid = os.getpid()
        # LLMSUP_FAKE_NVML: memory taken on the simulated host by each holder process.
        self.gpu_sim = _fakegpu.sim_path()
        self.gpu_claimed = self.gpu_sim is None
        self.gpu_error: str | None = None
        self.tracker: subprocess.Popen[bytes] | None = None
        self.tracker_fd: int | None = None  # the write end of the resource tracker's pipe

    # -- logging

    def log(self, msg: str, level: str = "INFO", source: str = "api_server.py:1") -> None:
        vllm_log(level, source, msg, prefix=f"APIServer pid={self.pid}")

    def engine_log(self, msg: str, level: str = "INFO", source: str = "core.py:1") -> None:
        vllm_log(level, source, msg, prefix=self.engine_prefix())

    def engine_prefix(self) -> str:
        name, pid = "EngineCore", 0
        if self.engines:
            name, pid = self.engines[0][0], self.engines[0][1].pid
        return f"{engine_log_name(name)} pid={pid}"

    def engine_error(self, error: str) -> None:
        """An engine start failure: the engine's traceback, then the API server's."""
        self.engine_log("EngineCore failed to start.", "ERROR", "core.py:708")
        prefix = self.engine_prefix()
        log_raw(sys.stderr, f"({prefix}) Traceback (most recent call last):")
        log_raw(sys.stderr, f"({prefix}) {error}")
        log_raw(sys.stderr, "Traceback (most recent call last):")
        log_raw(
            sys.stderr,
            "RuntimeError: Engine core initialization failed. See root cause above. "
            "Failed core proc(s): {}",
        )

    # -- start

    def run(self) -> int:
        cfg = self.cfg
        set_process_name("vllm")
        install_signals(self.loop, self.faults, self.on_signal)
        watch_control_file(
            cfg.control_file, self.faults, lambda k, v: self.loop.post(lambda: self.on_shot(k, v))
        )
        self.log(f"vLLM API server version {VERSION}")
        self.log(f"non-default args: {self.non_default_args()}", source="utils.py:1")
        if cfg.log_spam:
            spam_output(cfg.log_spam)
        if cfg.tick:
            tick_output(cfg.tick)
        try:
            self.httpd = make_server(self.host, self.port, Handler, self.app)
        except OSError as e:
            log_raw(sys.stderr, "Traceback (most recent call last):")
            log_raw(sys.stderr, f"OSError: [Errno {e.errno}] {e.strerror}")
            return 1
        self.start_resource_tracker()
        self.start_engines()
        start = time.monotonic()
        load = cfg.load_time
        self.schedule_load_lines(start, load)
        self.loop.call_at(start + ENGINE_UP_AT * load, lambda: self.finish_loading(start, load))
        if self.gpu_sim is not None:
            self.loop.call_at(
                start + GPU_CLAIM_AT * load,
                lambda: self.claim_gpus(time.monotonic() + GPU_CLAIM_DEADLINE_S),
            )
        if cfg.exit_code is not None and cfg.exit_after is not None:
            code = cfg.exit_code
            self.loop.call_at(start + cfg.exit_after, lambda: self.crash(code))
        if cfg.kill_child_after is not None:
            self.loop.call_at(start + cfg.kill_child_after, self.kill_engine)
        self.loop.every(ENGINE_POLL_S, self.check_engines)
        return self.loop.run()

    def non_default_args(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in sorted(vars(self.ns).items()):
            if value not in (None, False, []) and key != "subparser":
                out[key] = "<redacted>" if key in ("api_key", "hf_token") else value
        out.setdefault("model", self.app.model)
        return out

    def start_resource_tracker(self) -> None:
        """Python's own multiprocessing resource tracker, as vLLM's API server has one.

        It ignores SIGTERM and SIGINT and leaves when the last holder of its pipe
        (this server, the EngineCores, the workers) is gone."""
        read_end, self.tracker_fd = os.pipe()
        code = f"from multiprocessing.resource_tracker import main;main({read_end})"
        self.tracker = subprocess.Popen(
            [python_executable(), "-c", code], pass_fds=(read_end,), stdin=subprocess.DEVNULL
        )
        os.close(read_end)

    def start_engines(self) -> None:
        python = python_executable()
        fds = (self.tracker_fd,) if self.tracker_fd is not None else ()
        for dp_rank in range(self.dp):
            name = "EngineCore" if self.dp == 1 else f"EngineCore_DP{dp_rank}"
            workers = []
            # A worker per rank under each EngineCore, one at TP=1 too.
            for pp_rank in range(self.pp):
                for tp_rank in range(self.tp):
                    w = "Worker"
                    if self.dp > 1:
                        w += f"_DP{dp_rank}"
                    if self.pp > 1:
                        w += f"_PP{pp_rank}"
                    if self.tp > 1:
                        w += f"_TP{tp_rank}"
                    workers.append(w)
            self.workers[name] = workers
            argv = [f"VLLM::{name}", SCRIPT, ENGINE_CMD, name, *workers]
            # argv[0] is the process title, as setproctitle leaves it in vLLM.
            proc = subprocess.Popen(argv, executable=python, pass_fds=fds)
            self.engines.append((name, proc))
            threading.Thread(target=self.watch_engine, args=(proc,), daemon=True).start()

    def watch_engine(self, proc: subprocess.Popen[bytes]) -> None:
        """vLLM learns of a dead EngineCore at once (a pipe breaks): /health is 503
        within milliseconds, not after a poll."""
        with contextlib.suppress(OSError):
            proc.wait()
        self.loop.post(self.check_engines)

    def schedule_load_lines(self, start: float, load: float) -> None:
        """The load phase as vLLM logs it on CPU; the GPU-path lines (model size,
        torch.compile, CUDA graphs) only on a simulated GPU host. The lines from
        "init engine" on come from `finish_loading`, once the load succeeded."""
        model = self.app.model
        gpu = self.gpu_sim is not None
        runner = "gpu_model_runner.py:1" if gpu else "cpu_model_runner.py:1"
        lines: list[tuple[float, str, str, bool]] = [
            (0.02, "model.py:1", "Resolved architecture: Qwen3ForCausalLM", False),
            (0.03, "model.py:1", f"Using max model len {self.app.max_model_len}", False),
            (
                0.05,
                "core.py:93",
                f"Initializing a V1 LLM engine (v{VERSION}) with config: model='{model}', "
                f"tensor_parallel_size={self.tp}, pipeline_parallel_size={self.pp}, "
                f"data_parallel_size={self.dp}, served_model_name={self.app.served[0]}",
                True,
            ),
            (0.1, runner, f"Starting to load model {model}...", True),
            (0.8, "default_loader.py:1", f"Loading weights took {0.6 * load:.2f} seconds", True),
        ]
        if gpu:
            lines += [
                (0.82, runner, f"Model loading took 1.2 GiB and {0.65 * load:.1f} seconds", True),
                (0.85, "backends.py:1", f"torch.compile took {0.1 * load:.1f} s in total", True),
                (0.87, "kv_cache_utils.py:1", "GPU KV cache size: 123,456 tokens", True),
                (
                    0.9,
                    runner,
                    f"Graph capturing finished in {round(0.05 * load)} secs, took 0.10 GiB",
                    True,
                ),
            ]
        for frac, source, msg, engine in lines:
            emit = self.engine_log if engine else self.log
            self.loop.call_at(start + frac * load, functools.partial(emit, msg, source=source))

    def gpu_holders(self) -> list[tuple[int, int]] | None:
        """(pid, global rank) of each process that takes GPU memory, as vLLM's: each
        worker (there is one at TP=1 too). None until all exist."""
        per_engine = self.tp * self.pp
        out: list[tuple[int, int]] = []
        for dp_rank, (name, proc) in enumerate(self.engines):
            workers = self.workers.get(name, [])
            if not workers:
                out.append((proc.pid, dp_rank))
                continue
            titles = {}
            for pid in descendants(proc.pid):
                with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
                    titles[f.read().split(b"\0", 1)[0].decode(errors="replace")] = pid
            for local, worker in enumerate(workers):
                holder = titles.get(f"VLLM::{worker}")
                if holder is None:
                    return None
                out.append((holder, dp_rank * per_engine + local))
        return out

    def claim_gpus(self, deadline: float) -> None:
        """Each holder takes utilization x total on its GPU, or the start fails."""
        if self.stopping or self.gpu_claimed:
            return
        holders = self.gpu_holders()
        if holders is None:
            if time.monotonic() < deadline and all(p.poll() is None for _, p in self.engines):
                self.loop.call_later(GPU_CLAIM_RETRY_S, lambda: self.claim_gpus(deadline))
                return
            holders = []  # a dead engine is check_engines' business
        assert self.gpu_sim is not None
        util = self.ns.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION
        delay = _fakegpu.release_delay()
        gib = float(_fakegpu.GiB)
        for pid, rank in holders:
            device = _fakegpu.device_of_rank(rank)
            try:
                if device is None:
                    raise _fakegpu.SimError(f"no visible device for rank {rank}")
                taken, free, total = _fakegpu.reserve(self.gpu_sim, pid, device, util, delay)
            except _fakegpu.SimError:
                self.gpu_error = "RuntimeError: CUDA error: invalid device ordinal"
                break
            if not taken:
                self.gpu_error = (
                    f"ValueError: Free memory on device ({free / gib:.2f}/{total / gib:.2f} GiB) "
                    "on startup is less than desired GPU memory utilization "
                    f"({util}, {total * util / gib:.2f} GiB). Decrease GPU memory utilization "
                    "or reduce GPU memory used by other processes."
                )
                break
        self.gpu_claimed = True

    def load_error(self) -> str | None:
        ns = self.ns
        with open(VALUES_FILE, encoding="utf-8") as f:
            values = json.load(f)
        if self.cfg.fail_load:
            util = ns.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION
            return (
                "ValueError: Free memory on device (10.52/79.19 GiB) on startup is less than "
                f"desired GPU memory utilization ({util}, {79.19 * util:.2f} GiB). Decrease GPU "
                "memory utilization or reduce GPU memory used by other processes."
            )
        if ns.kv_cache_dtype and ns.kv_cache_dtype not in values["kv_cache_dtype"]:
            allowed = ", ".join(values["kv_cache_dtype"])
            return f"ValueError: Unknown kv cache dtype: '{ns.kv_cache_dtype}' (valid: {allowed})"
        if ns.tool_call_parser and ns.tool_call_parser not in values["tool_call_parsers"]:
            allowed = ",".join(values["tool_call_parsers"])
            return (
                f"KeyError: 'invalid tool call parser: {ns.tool_call_parser} "
                f"(chose from {{ {allowed} }})'"
            )
        return self.gpu_error

    def finish_loading(self, start: float, load: float) -> None:
        """The engine is up (or failed): then the API server starts, and listens last."""
        if self.stopping:
            return
        if not self.gpu_claimed:
            self.loop.call_later(GPU_CLAIM_RETRY_S, lambda: self.finish_loading(start, load))
            return
        error = self.load_error()
        if error:
            self.engine_error(error)
            self.shutdown(1, quiet=True)
            return
        self.engine_log(
            f"init engine (profile, create kv cache, warmup model) took {0.15 * load:.2f} seconds"
        )
        server_at = max(time.monotonic(), start + SERVER_LINE_AT * load)
        self.loop.call_at(server_at, lambda: self.start_api_server(start + load))

    def start_api_server(self, listen_at: float) -> None:
        if self.stopping:
            return
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.log(f"Starting vLLM server on http://{host}:{self.port}")
        self.log("Available routes are:", source="launcher.py:1")
        for route, methods in (("/health", "GET"), ("/v1/chat/completions", "POST")):
            self.log(f"Route: {route}, Methods: {methods}", source="launcher.py:1")
        self.loop.call_at(max(time.monotonic(), listen_at), self.listen)

    def listen(self) -> None:
        """uvicorn: "Application startup complete.", and only then the port accepts."""
        if self.stopping:
            return
        for line in (
            f"INFO:     Started server process [{self.pid}]",
            "INFO:     Waiting for application startup.",
            "INFO:     Application startup complete.",
        ):
            log_raw(sys.stdout, f"(APIServer pid={self.pid}) {line}")
        assert self.httpd is not None
        start_serving(self.httpd)
        if stamp := os.environ.get("FAKE_LISTEN_STAMP"):  # for benchmarks: when it accepts
            with contextlib.suppress(OSError), open(stamp, "a", encoding="utf-8") as f:
                f.write(f"{time.time()}\n")
        self.serving = True
        self.ready = True
        if self.cfg.hang_after is not None:
            self.loop.call_later(self.cfg.hang_after, lambda: self.faults.trigger("hang"))
        if self.cfg.deep_hang_after is not None:
            self.loop.call_later(self.cfg.deep_hang_after, lambda: self.faults.trigger("deep_hang"))

    # -- faults

    def on_shot(self, key: str, value: Any) -> None:
        if key == "exit":
            try:
                code = int(value)
            except (TypeError, ValueError):
                code = 1
            self.crash(code)
        elif key == "kill_child" and value:
            self.kill_engine()

    def kill_engine(self) -> None:
        if self.engines:
            kill_quietly(self.engines[0][1].pid, signal.SIGKILL)

    def crash(self, code: int) -> None:
        self.log(f"Fatal error, exiting with code {code}", "ERROR")
        self.shutdown(code, quiet=True)

    def check_engines(self) -> None:
        if self.stopping or self.app.engine_dead:
            return
        dead = {name: proc.returncode for name, proc in self.engines if proc.poll() is not None}
        if not dead:
            return
        if not self.ready:
            log_raw(
                sys.stderr,
                "RuntimeError: Engine core initialization failed. See root cause above. "
                f"Failed core proc(s): {dead}",
            )
            self.shutdown(1, quiet=True)
            return
        for name in dead:
            self.log(
                f"Engine core proc {engine_log_name(name)} died unexpectedly, "
                "shutting down client.",
                "ERROR",
                "core_client.py:1",
            )
        self.app.engine_dead = True
        self.log("AsyncLLM output_handler failed.", "ERROR", "async_llm.py:1")
        log_raw(sys.stderr, "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered")
        self.loop.call_later(CLOSE_AFTER_ENGINE_DEATH_S, self.close_port)
        self.loop.call_later(EXIT_AFTER_ENGINE_DEATH_S, lambda: self.shutdown(0, quiet=True))

    def close_port(self) -> None:
        if self.httpd is not None and self.serving and not self.stopping:
            self.serving = False
            self.log("Shutting down FastAPI HTTP server.", source="launcher.py:1")
            self.httpd.shutdown()
            self.httpd.server_close()

    # -- stop

    def on_signal(self, signum: int) -> None:
        self.log(f"Received {signal.Signals(signum).name}, shutting down", source="launcher.py:1")
        self.shutdown(0)

    def shutdown(self, code: int, quiet: bool = False) -> None:
        if self.stopping:
            return
        self.stopping = True
        if not quiet:
            self.log("Shutting down FastAPI HTTP server.", source="launcher.py:1")
        if self.httpd is not None:
            if self.serving:
                self.httpd.shutdown()
            self.httpd.server_close()
        drain = self.ns.shutdown_timeout if self.ns.shutdown_timeout else DEFAULT_DRAIN_S
        deadline = time.monotonic() + drain
        while self.app.inflight and time.monotonic() < deadline:
            time.sleep(0.02)
        self.stop_engines()
        self.loop.stop(code)

    def stop_engines(self) -> None:
        live = [proc for _, proc in self.engines if proc.poll() is None]
        for proc in live:
            kill_quietly(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + CHILD_STOP_GRACE_S
        while any(p.poll() is None for p in live) and time.monotonic() < deadline:
            time.sleep(0.02)
        for proc in live:
            if proc.poll() is None:
                for pid in descendants(proc.pid):
                    kill_quietly(pid, signal.SIGKILL)
                kill_quietly(proc.pid, signal.SIGKILL)
                proc.wait()


# ---------------------------------------------------------------------------
# Children


def _is_inheritable(fd: int) -> bool:
    try:
        return os.get_inheritable(fd)
    except OSError:
        return False


def engine_main(name: str, workers: list[str]) -> int:
    """The EngineCore: starts the workers, stops them on SIGTERM, ignores SIGINT."""
    from _fakecommon import env_flag

    set_process_name(f"VLLM::{name}")
    blank_environ()
    faults = Faults(env_flag("FAKE_IGNORE_SIGTERM"))
    loop = MainLoop()
    watch_control_file(os.environ.get("FAKE_CONTROL_FILE"), faults)
    python = python_executable()
    # The resource tracker's pipe, inherited from the API server and passed on.
    fds = tuple(
        fd for fd in map(int, os.listdir("/proc/self/fd")) if fd > 2 and _is_inheritable(fd)
    )
    procs = [
        (
            w,
            subprocess.Popen(
                [f"VLLM::{w}", SCRIPT, WORKER_CMD, w, str(os.getpid())],
                executable=python,
                pass_fds=fds,
            ),
        )
        for w in workers
    ]
    prefix = f"{engine_log_name(name)} pid={os.getpid()}"
    state = {"stopping": False}

    def stop_workers(sig: int) -> None:
        for _, p in procs:
            if p.poll() is None:
                kill_quietly(p.pid, sig)
        deadline = time.monotonic() + CHILD_STOP_GRACE_S
        while any(p.poll() is None for _, p in procs) and time.monotonic() < deadline:
            time.sleep(0.02)
        for _, p in procs:
            if p.poll() is None:
                kill_quietly(p.pid, signal.SIGKILL)
                p.wait()

    def on_term(_signum: int) -> None:
        state["stopping"] = True
        stop_workers(signal.SIGTERM)
        loop.stop(0)

    def check_workers() -> None:
        if state["stopping"]:
            return
        dead = [w for w, p in procs if p.poll() is not None]
        if dead:
            vllm_log(
                "ERROR",
                "multiproc_executor.py:1",
                f"Worker proc {dead[0]} died unexpectedly, shutting down executor.",
                prefix=prefix,
            )
            state["stopping"] = True
            stop_workers(signal.SIGKILL)
            loop.stop(1)

    install_signals(loop, faults, on_term, sigint=False)
    loop.every(ENGINE_POLL_S, check_workers)
    return loop.run()


_KEPT: list[Any] = []  # the litter a worker holds (a socket, a mapping) while it lives


def escape() -> None:
    """FAKE_WORKER_ESCAPE=1: the worker starts a helper that leaves the server's
    session and runs with no environment at all (as Ray's workers and some
    libraries' daemons do), and that outlives the worker: no process group and no
    marker lead to it, only the kernel (cgroup, parentage) or a supervisor's own
    memory of the tree. It holds litter too, with FAKE_LITTER=1."""
    tmp = os.environ.get("TMPDIR", "/tmp") if os.environ.get("FAKE_LITTER") == "1" else ""
    subprocess.Popen(
        ["fake-escapee", SCRIPT, WORKER_CMD, "escapee", "0", tmp],
        executable=python_executable(),
        env={},
        start_new_session=True,
        stdin=subprocess.DEVNULL,
    )


def leave_litter(tmp: str) -> list[Any]:
    """FAKE_LITTER=1: what real vLLM leaves behind, made by the worker: a unix
    socket named by a UUID and a `vllm_dist_*` file in TMPDIR, and a
    `/dev/shm/psm_*` segment it keeps mapped. Returns what must stay referenced."""
    import mmap
    import socket
    import uuid

    if not tmp:
        return []
    kept: list[Any] = []
    with contextlib.suppress(OSError):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(os.path.join(tmp, str(uuid.uuid4())))
        kept.append(sock)
        with open(os.path.join(tmp, f"vllm_dist_{uuid.uuid4().hex[:8]}"), "w") as f:
            f.write("fake\n")
        fd = os.open(f"/dev/shm/psm_{uuid.uuid4().hex[:8]}", os.O_CREAT | os.O_EXCL | os.O_RDWR)
        os.ftruncate(fd, 1 << 16)
        kept.append(mmap.mmap(fd, 1 << 16))
        os.close(fd)
    return kept


# ---------------------------------------------------------------------------
# Entry point


def main(argv: list[str]) -> int:
    if argv and argv[0] == ENGINE_CMD:
        exit_now(engine_main(argv[1], argv[2:]))
    if argv and argv[0] == WORKER_CMD:
        escaped = len(argv) > 3  # the helper `escape` started, with its TMPDIR
        if not escaped and os.environ.get("FAKE_WORKER_ESCAPE") == "1":
            escape()
        set_process_name("fake-escapee" if escaped else f"VLLM::{argv[1]}")
        blank_environ()
        if escaped or os.environ.get("FAKE_LITTER") == "1":
            _KEPT.extend(leave_litter(argv[3] if escaped else os.environ.get("TMPDIR", "/tmp")))
        parent = None if escaped else int(argv[2])
        exit_now(sleep_forever_child("fake-escapee" if escaped else f"VLLM::{argv[1]}", parent))
    parser = build_parser()
    ns = parser.parse_args(expand_config(normalize_flags(argv)))
    if ns.subparser != "serve":
        parser.print_help()
        return 0
    if ns.enable_auto_tool_choice and not ns.tool_call_parser:
        log_raw(sys.stderr, "Traceback (most recent call last):")
        message = "Error: --enable-auto-tool-choice requires --tool-call-parser"
        log_raw(sys.stderr, f"TypeError: {message}")
        return 1
    if ns.uds:
        log_raw(sys.stderr, "vllm (fake): --uds is not supported by the fake server")
        return 2
    cfg = FakeConfig(load_time_default=0.5)
    if cfg.exit_code is not None and not cfg.exit_after:
        vllm_log("ERROR", "api_server.py:1", f"Fatal error, exiting with code {cfg.exit_code}")
        return cfg.exit_code
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    exit_now(ApiServer(ns, cfg).run())
    return 0
