"""The `vllm` backend: its manifest fields, `vllm serve` command lines, the checks
of its flags against the installed vLLM's, and the phases its log shows."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from llmsup.backends.base import Backend, Context, GpuClaim, Locator
from llmsup.backends.launch import Launch, SecretRef, cuda_devices
from llmsup.backends.vllm_flags import FlagTable
from llmsup.errors import Problem
from llmsup.fields import ApiKey, ModelBase, ModelLen, Port, ServedName
from llmsup.yamlsrc import KeyPath

# The flags and values of each vLLM version: llmsup/data/, read by vllm_flags.py.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.92  # vLLM 0.33's default

# Typed manifest fields and the vLLM flags (with aliases) they produce.
FIELD_FLAGS: dict[str, tuple[str, ...]] = {
    "host": ("--host",),
    "port": ("--port",),
    "served_name": ("--served-model-name",),
    "tensor_parallel_size": ("--tensor-parallel-size", "-tp"),
    "pipeline_parallel_size": ("--pipeline-parallel-size", "-pp"),
    "gpu_memory_utilization": ("--gpu-memory-utilization",),
    "max_model_len": ("--max-model-len",),
    "kv_cache_dtype": ("--kv-cache-dtype",),
    "dtype": ("--dtype",),
    "quantization": ("--quantization", "-q"),
    "trust_remote_code": ("--trust-remote-code", "--no-trust-remote-code"),
    "tool_call_parser": ("--tool-call-parser",),
    "model": ("--model",),
}
# Flags that make vLLM import code named on the command line (or smuggle such
# flags in a file): a manifest entry with `backend: vllm` must only run vLLM.
CODE_FLAGS = frozenset(
    {
        "--middleware",
        "--worker-cls",
        "--worker-extension-cls",
        "--scheduler-cls",
        "--tool-parser-plugin",
        "--reasoning-parser-plugin",
        "--io-processor-plugin",
        "--logits-processors",
        "--config",
        "--logging-config",
        "--log-config-file",
    }
)
# Flags that carry secrets: never on argv, where `ps` shows them to every user.
SECRET_FLAGS = {"--api-key": "api_key", "--hf-token": "env: {HF_TOKEN: ...}"}


class VllmModel(ModelBase):
    backend: Literal["vllm"] = Field(description="`vllm serve`")
    model: str = Field(min_length=1, description="HF id, ModelScope id or local path")
    served_name: ServedName = Field(
        None, description="name(s) clients ask for (--served-model-name; default: model)"
    )
    port: Port = Field(8000, description="--port")
    tensor_parallel_size: int | None = Field(
        None, ge=1, description="--tensor-parallel-size (default: the number of gpus)"
    )
    pipeline_parallel_size: int | None = Field(
        None,
        ge=1,
        description="--pipeline-parallel-size (TP x PP = the number of gpus; default: nodes)",
    )
    nodes: int = Field(
        1,
        ge=1,
        description="nodes the model spans, `gpus` on each (TP within a node, PP across); "
        "above 1 only under `llmsup export kubernetes` (a LeaderWorkerSet)",
    )
    gpu_memory_utilization: float | None = Field(
        None, description="share of each GPU's memory vLLM asks for, in (0, 1] (default 0.92)"
    )
    max_model_len: ModelLen | None = Field(
        None, description="context length: 32768, 32k (32000), 32K (32768), or auto"
    )
    kv_cache_dtype: str | None = Field(None, description="--kv-cache-dtype: auto, fp8, ...")
    dtype: Literal["auto", "half", "float16", "bfloat16", "float", "float32"] | None = Field(
        None, description="--dtype of weights and activations"
    )
    quantization: str | None = Field(None, description="--quantization: awq, gptq, fp8, ...")
    trust_remote_code: bool = Field(
        False, description="run the model repository's own Python code (--trust-remote-code)"
    )
    tool_call_parser: str | None = Field(
        None, description="--tool-call-parser (hermes, ...); adds --enable-auto-tool-choice"
    )
    api_key: ApiKey = Field(
        None, description="key clients must send; reaches vLLM as VLLM_API_KEY, never argv"
    )
    api_key_file: str | None = Field(None, description="file holding the key (instead of api_key)")
    source: Literal["huggingface", "modelscope"] = Field(
        "huggingface", description="where vLLM downloads from (modelscope: VLLM_USE_MODELSCOPE)"
    )
    extra_args: list[str] = Field(
        default_factory=list, description="more `vllm serve` flags, checked against vLLM's"
    )

    @field_validator("gpu_memory_utilization")
    @classmethod
    def _util(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v <= 1:
            raise ValueError(f"must be in (0, 1], got {v}")
        return v

    @model_validator(mode="after")
    def _one_key_source(self) -> VllmModel:
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("set api_key or api_key_file, not both")
        return self

    @property
    def served_names(self) -> list[str]:
        if self.served_name is None:
            return [self.model]
        return [self.served_name] if isinstance(self.served_name, str) else list(self.served_name)


def tensor_parallel(m: VllmModel) -> int:
    return m.tensor_parallel_size or max(1, len(m.gpus))


def pipeline_parallel(m: VllmModel) -> int:
    """Its own, else one stage per node."""
    return m.pipeline_parallel_size or m.nodes


def build(name: str, m: VllmModel, host: str) -> Launch:
    argv = ["vllm", "serve", m.model, "--host", host, "--port", str(m.port)]
    if m.served_name is not None:
        argv += ["--served-model-name", *m.served_names]
    if m.tensor_parallel_size is not None or m.gpus:
        argv += ["--tensor-parallel-size", str(tensor_parallel(m))]
    # Across nodes, one pipeline stage per node unless it says otherwise.
    pp = pipeline_parallel(m) if m.nodes > 1 else m.pipeline_parallel_size
    optional = {
        "--pipeline-parallel-size": pp,
        "--gpu-memory-utilization": m.gpu_memory_utilization,
        "--max-model-len": m.max_model_len,
        "--kv-cache-dtype": m.kv_cache_dtype,
        "--dtype": m.dtype,
        "--quantization": m.quantization,
    }
    for flag, value in optional.items():
        if value is not None:
            argv += [flag, str(value)]
    if m.trust_remote_code:
        argv.append("--trust-remote-code")
    if m.tool_call_parser:
        argv += ["--enable-auto-tool-choice", "--tool-call-parser", m.tool_call_parser]
    argv += m.extra_args

    env = {**cuda_devices(m.gpus), **m.env}
    if m.source == "modelscope":
        env["VLLM_USE_MODELSCOPE"] = "True"
    secrets: dict[str, SecretRef] = {}
    if m.api_key is not None:
        secrets["VLLM_API_KEY"] = SecretRef(value=m.api_key.get_secret_value())
    elif m.api_key_file is not None:
        secrets["VLLM_API_KEY"] = SecretRef(file=m.api_key_file)
    return Launch(
        unit=name,
        backend="vllm",
        models=(name,),
        argv=tuple(argv),
        env=env,
        host=host,
        port=m.port,
        ready_path="/health",
        served_names=tuple(m.served_names),
        gpus=tuple(m.gpus),
        secrets=secrets,
        auth_env="VLLM_API_KEY" if secrets else None,
    )


# ------------------------------------------------------------------ checks


def check(
    at: Locator, name: str, m: VllmModel, flags: FlagTable, *, one_host: bool = True
) -> list[Problem]:
    """GPUs against the parallel sizes (and nodes, which need a cluster unless
    `one_host` is False), and every flag against `flags`."""
    out: list[Problem] = []
    path = ("models", name)
    tp, pp = tensor_parallel(m), pipeline_parallel(m)
    if m.gpus:
        seen: set[str] = set()
        for i, g in enumerate(m.gpus):
            if str(g) in seen:
                out.append(at.problem((*path, "gpus", i), f"GPU {g} is listed twice"))
            seen.add(str(g))
        if tp * pp != len(m.gpus) * m.nodes:
            listed = f"{len(m.gpus)} GPU(s) are listed in gpus"
            if m.nodes > 1:
                listed += f", on each of {m.nodes} nodes ({len(m.gpus) * m.nodes} in all)"
            out.append(
                at.problem(
                    (*path, "tensor_parallel_size"),
                    f"tensor_parallel_size x pipeline_parallel_size = {tp} x {pp} = {tp * pp}, "
                    f"but {listed}; make them equal",
                )
            )
    elif tp * pp % m.nodes:
        out.append(
            at.problem(
                (*path, "nodes"),
                f"tensor_parallel_size x pipeline_parallel_size = {tp} x {pp} = {tp * pp} "
                f"GPUs do not split evenly over {m.nodes} nodes",
            )
        )
    if m.nodes > 1 and one_host:
        out.append(
            at.problem(
                (*path, "nodes"),
                "nodes > 1 runs only under `llmsup export kubernetes` (a LeaderWorkerSet "
                "across nodes); one host cannot: set nodes: 1 to run the model here",
            )
        )
    values, version = flags.values, flags.version
    if m.kv_cache_dtype and m.kv_cache_dtype not in values["kv_cache_dtype"]:
        out.append(
            at.problem(
                (*path, "kv_cache_dtype"),
                f"vLLM {version} does not know kv_cache_dtype {m.kv_cache_dtype!r} "
                f"(known: {', '.join(values['kv_cache_dtype'])}); vLLM fails only after loading",
                "warning",
            )
        )
    if m.tool_call_parser and m.tool_call_parser not in values["tool_call_parsers"]:
        out.append(
            at.problem(
                (*path, "tool_call_parser"),
                f"vLLM {version} does not know tool_call_parser {m.tool_call_parser!r} "
                f"(e.g. hermes, llama3_json, mistral, qwen3_xml)",
                "warning",
            )
        )
    return out + check_extra_args(at, name, m, flags)


def check_extra_args(at: Locator, name: str, m: VllmModel, flags: FlagTable) -> list[Problem]:
    by_flag = {f: fld for fld, fs in FIELD_FLAGS.items() for f in fs}
    out = []
    for i, arg in enumerate(m.extra_args):
        if not arg.startswith("-") or _is_number(arg):
            continue
        # As vLLM reads it (`--worker_cls` is `--worker-cls`, prefixes expand).
        flag = flags.resolve(arg) or arg.split("=", 1)[0]
        path = ("models", name, "extra_args", i)
        if flag in CODE_FLAGS:
            msg = (
                f"{flag} makes vLLM load code named in the manifest; a vllm entry runs "
                "vLLM only: use `backend: command` to run a server you configure freely"
            )
            out.append(at.problem(path, msg))
        elif flag in SECRET_FLAGS:
            use = SECRET_FLAGS[flag]
            msg = f"{flag} would put a secret on the command line, visible in `ps`; use {use}"
            out.append(at.problem(path, msg))
        elif flag in by_flag:
            msg = f"{flag} duplicates the field `{by_flag[flag]}`; set that field instead"
            out.append(at.problem(path, msg))
        elif flag == "--enable-auto-tool-choice" and not m.tool_call_parser:
            msg = "--enable-auto-tool-choice needs a parser: set tool_call_parser (e.g. hermes)"
            out.append(at.problem(path, msg))
        elif flag == "--enable-auto-tool-choice":
            msg = "--enable-auto-tool-choice is implied by tool_call_parser; remove it"
            out.append(at.problem(path, msg, "warning"))
        elif flag not in flags.flags:
            out.append(unknown_flag(at, path, flag, flags))
    return out


def unknown_flag(at: Locator, path: KeyPath, flag: str, flags: FlagTable) -> Problem:
    """An error when the table is the installed vLLM's; a warning when it is a guess."""
    hint = f" (did you mean {s}?)" if (s := flags.suggest(flag)) else ""
    if flags.exact:
        msg = f"the installed vLLM {flags.version} has no flag {flag}{hint}: `vllm serve` exits 2"
        return at.problem(path, msg)
    msg = f"vLLM {flags.version} has no flag {flag}{hint}; `vllm serve` would exit ({flags.why})"
    return at.problem(path, msg, "warning")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------- its log

# vLLM's load-phase log lines (CPU and GPU builds), and how far along each one is.
# On CPU only "Starting to load model", "Loading weights took", "init engine" and
# the last two appear; the others are the GPU path's.
PHASES: tuple[tuple[str, str, int], ...] = (
    ("Starting to load model", "loading weights", 10),
    ("Loading weights took", "weights loaded", 40),
    ("Model loading took", "model loaded", 50),
    ("torch.compile took", "compiled", 65),
    ("Graph capturing finished", "graphs captured", 80),
    ("init engine (profile, create kv cache, warmup model) took", "engine ready", 90),
    ("Starting vLLM server on", "starting API server", 95),
    ("Application startup complete.", "API server started", 99),
)
# uvicorn's "Application startup complete." (base.LISTENING_SOON) is the last line
# before the port accepts; "Starting vLLM server on" comes half a second earlier.


def vllm_phase(line: str) -> tuple[str, int] | None:
    for marker, phase, percent in PHASES:
        if marker in line:
            return phase, percent
    return None


def engine_died(line: str) -> bool:
    """vLLM exits with code 0 when its EngineCore dies: the code alone hides it."""
    return ("Engine core proc" in line and "died unexpectedly" in line) or "EngineDeadError" in line


# ----------------------------------------------------------------- plugin


class Vllm(Backend[VllmModel]):
    name = "vllm"
    model = VllmModel

    def build(
        self, names: Sequence[str], specs: Sequence[VllmModel], host: str, *, first: bool
    ) -> Launch:
        return build(names[0], specs[0], host)

    def served_names(self, spec: VllmModel) -> list[str]:
        return spec.served_names

    def served_key(self, spec: VllmModel) -> str:
        return "served_name" if spec.served_name else "model"

    def check(self, at: Locator, name: str, spec: VllmModel, ctx: Context) -> list[Problem]:
        own = check(at, name, spec, ctx.vllm_flags, one_host=ctx.one_host)
        return own + super().check(at, name, spec, ctx)

    def checked_against(self, ctx: Context) -> dict[str, Any]:
        flags = ctx.vllm_flags_used
        return {"vllm_flags": flags.describe()} if flags is not None else {}

    def owned_env(self, spec: VllmModel) -> dict[str, str]:
        return {"VLLM_API_KEY": "api_key or api_key_file"}

    def check_files(self, at: Locator, name: str, spec: VllmModel) -> list[Problem]:
        if spec.api_key_file and not Path(spec.api_key_file).is_file():
            msg = f"no such file: {spec.api_key_file} (create it with the key, mode 0600)"
            return [at.problem(("models", name, "api_key_file"), msg)]
        return []

    def untrusted(self, at: Locator, name: str, spec: VllmModel) -> list[Problem]:
        if not spec.trust_remote_code:
            return []
        msg = "runs the model repository's Python code: refused for an untrusted manifest"
        return [at.problem(("models", name, "trust_remote_code"), msg)]

    def gpu_claim(self, spec: VllmModel) -> GpuClaim:
        """Its `gpus`, else the first TP x PP visible devices (per node); a share of each."""
        n = tensor_parallel(spec) * pipeline_parallel(spec) // spec.nodes
        gpus = tuple(spec.gpus) or tuple(range(n))
        return GpuClaim(gpus, spec.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION)

    def phase(self, line: str) -> str | None:
        found = vllm_phase(line)
        return f"{found[0]} ({found[1]}%)" if found else None

    def exit_hint(self, line: str) -> str | None:
        return "EngineCore died" if engine_died(line) else None
