"""`vllm serve` command lines."""

from __future__ import annotations

from llmsup.backends import Launch, SecretRef, cuda_devices
from llmsup.manifest import Manifest, VllmModel

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
# Environment variables that load code into any process (the dynamic linker,
# Python's startup): the same reason.
CODE_ENV = frozenset(
    {"LD_PRELOAD", "LD_AUDIT", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME", "PYTHONUSERBASE",
     "BASH_ENV", "ENV", "PATH", "VLLM_PLUGINS"}
)  # fmt: skip
# Flags that carry secrets: never on argv, where `ps` shows them to every user.
SECRET_FLAGS = {"--api-key": "api_key", "--hf-token": "env: {HF_TOKEN: ...}"}


def tensor_parallel(m: VllmModel) -> int:
    return m.tensor_parallel_size or max(1, len(m.gpus))


def build(name: str, m: VllmModel, manifest: Manifest) -> Launch:
    host = manifest.host(name)
    argv = ["vllm", "serve", m.model, "--host", host, "--port", str(m.port)]
    if m.served_name is not None:
        argv += ["--served-model-name", *m.served_names]
    if m.tensor_parallel_size is not None or m.gpus:
        argv += ["--tensor-parallel-size", str(tensor_parallel(m))]
    optional = {
        "--pipeline-parallel-size": m.pipeline_parallel_size,
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
