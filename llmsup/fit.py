"""Will a model's weights, and one full-length sequence of KV cache, fit its GPUs?

`estimate()` reads a local model directory: the JSON headers of its
`*.safetensors` files (never the tensor data), else a parameter count from
`config.json`. `check_fit()` is pure: it compares an estimate with the memory
vLLM will ask for on each GPU (gpu_memory_utilization x total).

The estimate is deliberately simple: weights split evenly over TP x PP GPUs,
KV cache as 2 x layers x KV heads x head size per token (the latent size for
MLA models). Sliding-window and hybrid (Mamba) layers make the KV figure an
upper bound; online quantization (`quantization:` without a quantized
checkpoint) is not counted.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmsup.errors import FitError as FitError
from llmsup.gpu import GiB, fmt_bytes

# What vLLM needs besides weights and KV cache: peak activations while profiling,
# CUDA graphs, the CUDA context and NCCL buffers. A rough allowance.
OVERHEAD_BYTES = 1 * GiB
# The safetensors format caps its JSON header at 100 MB.
MAX_HEADER_BYTES = 100_000_000
INDEX_FILE = "model.safetensors.index.json"

SAFETENSORS_DTYPE_BYTES: dict[str, float] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "F6_E2M3": 0.75,
    "F6_E3M2": 0.75,
    "F4": 0.5,
}
# Tensors vLLM casts to the model dtype when it loads them.
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
DTYPE_BYTES: dict[str, int] = {
    "half": 2,
    "float16": 2,
    "bfloat16": 2,
    "float": 4,
    "float32": 4,
}
# Keys vLLM reads the model's context length from; it takes the smallest present.
MAX_LEN_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "model_max_length",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
# Multimodal configs keep the language model's numbers in a sub-config.
TEXT_CONFIG_KEYS = ("text_config", "llm_config", "language_config")


@dataclass(frozen=True)
class Estimate:
    """Bytes a model needs. `kv_per_token_per_gpu` is None when config.json cannot say."""

    weights_total: int
    weights_per_gpu: int
    kv_per_token_per_gpu: int | None
    source: str
    gpus: int = 1
    max_model_len: int | None = None  # the one asked for, else the model's own


def estimate(
    model_dir: str | Path,
    *,
    tp: int = 1,
    pp: int = 1,
    max_model_len: int | None = None,
    kv_cache_dtype: str | None = None,
    dtype: str | None = None,
) -> Estimate | None:
    """What the model in `model_dir` needs per GPU; None if that is not a local directory.

    Raises FitError when the directory's files cannot be read or tell too little.
    """
    directory = Path(model_dir)
    if not directory.is_dir():
        return None
    gpus = max(1, tp) * max(1, pp)
    config = _text_config(_read_config(directory))
    float_bytes = _float_bytes(dtype)
    files = _safetensors_files(directory)
    if files:
        total = sum(_safetensors_weights(f, float_bytes) for f in files)
        source = f"safetensors headers ({len(files)} file{'s' if len(files) != 1 else ''})"
    else:
        total = _config_weights(directory, config, float_bytes)
        source = "config.json parameter count"
    kv_bytes = _kv_dtype_bytes(kv_cache_dtype, float_bytes)
    return Estimate(
        weights_total=total,
        weights_per_gpu=math.ceil(total / gpus),
        kv_per_token_per_gpu=_kv_per_token(config, max(1, tp), max(1, pp), kv_bytes),
        source=source,
        gpus=gpus,
        max_model_len=max_model_len or _model_max_len(config),
    )


def check_fit(
    est: Estimate,
    gpu_total_bytes: int,
    utilization: float,
    max_model_len: int | None = None,
    *,
    overhead: int = OVERHEAD_BYTES,
) -> list[tuple[str, str]]:
    """("error", why) if the weights alone exceed what vLLM may use on a GPU,
    ("warning", why) if what is left cannot hold one max_model_len sequence, else []."""
    budget = utilization * gpu_total_bytes
    weights = est.weights_per_gpu
    asked = f"gpu_memory_utilization {utilization:g} x {fmt_bytes(gpu_total_bytes)}"
    spread = f"{fmt_bytes(est.weights_total)} over {est.gpus} GPU{'s' if est.gpus != 1 else ''}"
    if weights > budget:
        return [
            (
                "error",
                f"the weights need {fmt_bytes(weights)} per GPU ({spread}, from {est.source}) "
                f"but {asked} gives {fmt_bytes(budget)}: use more GPUs (tensor_parallel_size), "
                "a higher gpu_memory_utilization, or a quantized model",
            )
        ]
    room = budget - weights - overhead
    if room <= 0:
        return [
            (
                "warning",
                f"the weights need {fmt_bytes(weights)} per GPU ({spread}); {asked} "
                f"leaves {fmt_bytes(budget - weights)}, less than the {fmt_bytes(overhead)} "
                "allowed for activations and CUDA graphs, and nothing for the KV cache: "
                "raise gpu_memory_utilization or use more GPUs",
            )
        ]
    length = max_model_len or est.max_model_len
    kv = est.kv_per_token_per_gpu
    if not length or not kv or kv * length <= room:
        return []
    return [
        (
            "warning",
            f"one sequence of max_model_len {length} tokens needs {fmt_bytes(kv * length)} of "
            f"KV cache per GPU, but {asked} minus the weights ({fmt_bytes(weights)}) and "
            f"a {fmt_bytes(overhead)} allowance for activations leaves {fmt_bytes(room)}, "
            f"about {int(room // kv)} tokens: vLLM is likely to refuse to start. Lower "
            "max_model_len, raise gpu_memory_utilization, use kv_cache_dtype fp8, "
            "or use more GPUs",
        )
    ]


# ---------------------------------------------------------------------------
# Reading files


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FitError(f"{path}: cannot read: {e}") from None
    if not isinstance(data, dict):
        raise FitError(f"{path}: not a JSON object")
    return data


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's config: a multimodal config's sub-config over its top level."""
    for key in TEXT_CONFIG_KEYS:
        sub = config.get(key)
        if isinstance(sub, dict):
            return {**config, **sub}
    return config


def _safetensors_files(directory: Path) -> list[Path]:
    """The weight files vLLM loads: those the index names when there is one."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted({str(v) for v in weight_map.values()})
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            raise FitError(f"{index}: not a safetensors index (no weight_map)") from None
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise FitError(f"{index} names {', '.join(missing)}, which is missing")
        return [directory / n for n in names]
    return sorted(p for p in directory.glob("*.safetensors") if p.is_file())


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, read without touching the tensor data."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FitError(f"{path}: corrupt safetensors file: shorter than 8 bytes")
            (length,) = struct.unpack("<Q", head)
            size = path.stat().st_size
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise FitError(
                    f"{path}: corrupt safetensors header: it claims {length} bytes "
                    f"in a file of {size}"
                )
            raw = f.read(length)
    except OSError as e:
        raise FitError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise FitError(f"{path}: corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise FitError(f"{path}: corrupt safetensors header: not a JSON object")
    return header


def _safetensors_weights(path: Path, float_bytes: int) -> int:
    """Bytes of the file's tensors once loaded: float tensors in the model dtype,
    others (quantized weights, scales) as stored."""
    total = 0.0
    for name, info in read_safetensors_header(path).items():
        if name == "__metadata__":
            continue
        try:
            dtype = str(info["dtype"])
            numel = math.prod(int(n) for n in info["shape"])
            offsets = info.get("data_offsets")
            stored = (
                int(offsets[1]) - int(offsets[0])
                if offsets is not None
                else numel * SAFETENSORS_DTYPE_BYTES[dtype]
            )
        except (KeyError, TypeError, ValueError, IndexError, AttributeError):
            raise FitError(f"{path}: corrupt safetensors header: bad entry for {name!r}") from None
        if stored < 0:
            raise FitError(f"{path}: corrupt safetensors header: negative size for {name!r}")
        total += numel * float_bytes if dtype in FLOAT_DTYPES else stored
    return math.ceil(total)


# ---------------------------------------------------------------------------
# Arithmetic on config.json


def _int(config: Mapping[str, Any], key: str) -> int | None:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        return None
    return int(value)


def _float_bytes(dtype: str | None) -> int:
    """Bytes per value of the dtype vLLM runs the model in: the manifest's `dtype`,
    else 16 bits: with `auto`, vLLM keeps a float16 or bfloat16 checkpoint's dtype and
    runs a float32 checkpoint in bfloat16 (float16 where bfloat16 is unsupported)."""
    if dtype and dtype != "auto":
        return DTYPE_BYTES.get(dtype, 2)
    return 2


def _kv_dtype_bytes(kv_cache_dtype: str | None, float_bytes: int) -> float:
    name = (kv_cache_dtype or "auto").lower()
    if name == "auto":
        return float(float_bytes)
    if name in ("float16", "bfloat16", "half"):
        return 2.0
    if name in ("float32", "float"):
        return 4.0
    split = re.search(r"k(\d)v(\d)", name)
    if split:  # separate key and value widths, in bits
        return (int(split.group(1)) + int(split.group(2))) / 16
    bits = re.search(r"(\d)bit", name)
    if bits:
        return int(bits.group(1)) / 8
    if name.startswith(("fp8", "int8")):
        return 1.0
    if name.startswith(("nvfp4", "int4", "fp4")):
        return 0.5
    return float(float_bytes)


def _model_max_len(config: Mapping[str, Any]) -> int | None:
    found = [n for n in (_int(config, k) for k in MAX_LEN_KEYS) if n]
    return min(found) if found else None


def _head_dim(config: Mapping[str, Any]) -> int | None:
    head_dim = _int(config, "head_dim")
    hidden, heads = _int(config, "hidden_size"), _int(config, "num_attention_heads")
    if head_dim is None and hidden and heads:
        head_dim = hidden // heads
    return head_dim


def _kv_per_token(config: Mapping[str, Any], tp: int, pp: int, kv_bytes: float) -> int | None:
    layers = _int(config, "num_hidden_layers")
    if not layers:
        return None
    layers_per_gpu = math.ceil(layers / pp)
    lora, rope = _int(config, "kv_lora_rank"), _int(config, "qk_rope_head_dim")
    if lora and rope:
        # MLA: one latent vector per token and layer, the same on every TP rank.
        return math.ceil(layers_per_gpu * (lora + rope) * kv_bytes)
    heads = _int(config, "num_attention_heads")
    kv_heads = _int(config, "num_key_value_heads") or heads
    head_dim = _head_dim(config)
    if not kv_heads or not head_dim:
        return None
    # With more TP ranks than KV heads, vLLM replicates heads: at least one per GPU.
    heads_per_gpu = max(1, math.ceil(kv_heads / tp))
    return math.ceil(2 * layers_per_gpu * heads_per_gpu * head_dim * kv_bytes)


def parameter_count(config: Mapping[str, Any]) -> int | None:
    """The parameters of a decoder-only transformer described by `config`, or None.

    Embeddings (twice unless tied), then per layer: attention (q, k, v, o), a
    gated MLP (or routed experts and shared experts for MoE) and two norms.
    """
    stated = _int(config, "num_parameters")
    if stated:
        return stated
    hidden = _int(config, "hidden_size")
    layers = _int(config, "num_hidden_layers")
    vocab = _int(config, "vocab_size")
    inter = _int(config, "intermediate_size")
    heads = _int(config, "num_attention_heads")
    head_dim = _head_dim(config)
    if not (hidden and layers and vocab and heads and head_dim):
        return None
    kv_heads = _int(config, "num_key_value_heads") or heads
    tied = bool(config.get("tie_word_embeddings", False))
    embeddings = vocab * hidden * (1 if tied else 2)
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    experts = next(
        (
            n
            for n in (
                _int(config, k) for k in ("num_local_experts", "num_experts", "n_routed_experts")
            )
            if n
        ),
        None,
    )
    if experts:
        expert_inter = _int(config, "moe_intermediate_size") or inter
        if not expert_inter:
            return None
        shared = (_int(config, "n_shared_experts") or 0) * expert_inter
        shared += _int(config, "shared_expert_intermediate_size") or 0
        mlp = 3 * hidden * (experts * expert_inter + shared) + hidden * experts
    elif inter:
        mlp = 3 * hidden * inter
    else:
        return None
    return embeddings + layers * (attention + mlp + 2 * hidden) + hidden


def _quantized_bytes(config: Mapping[str, Any]) -> float | None:
    """Bytes per weight of a quantized checkpoint, from its quantization_config."""
    quant = config.get("quantization_config")
    if not isinstance(quant, dict):
        return None
    bits = _int(quant, "bits") or _int(quant, "w_bit")
    if bits:
        return bits / 8
    method = str(quant.get("quant_method", "")).lower()
    if "fp8" in method:
        return 1.0
    if "fp4" in method or "mxfp4" in method:
        return 0.5
    return None


def _config_weights(directory: Path, config: Mapping[str, Any], float_bytes: int) -> int:
    if not config:
        raise FitError(f"{directory}: no *.safetensors files and no config.json to estimate from")
    params = parameter_count(config)
    if params is None:
        raise FitError(
            f"{directory / 'config.json'}: no *.safetensors files, and the config lacks "
            "num_parameters or hidden_size, num_hidden_layers, vocab_size, "
            "num_attention_heads and intermediate_size to count parameters"
        )
    per_param = _quantized_bytes(config) or float_bytes
    return math.ceil(params * per_param)
