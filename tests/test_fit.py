"""Weight and KV-cache estimates from hand-written safetensors headers and config.json files."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest

from llmsup.fit import Estimate, FitError, check_fit, estimate, parameter_count
from llmsup.gpu import GiB

DTYPE_SIZE = {"BF16": 2, "F16": 2, "F32": 4, "I8": 1, "I32": 4, "F8_E4M3": 1, "U8": 1}

# Llama 3 8B's config: 8,030,261,248 parameters.
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
LLAMA3_8B_PARAMS = 8_030_261_248
LLAMA3_8B_KV = 2 * 32 * 8 * 128 * 2  # bytes per token in bfloat16: 128 KiB


def write_safetensors(
    path: Path, tensors: dict[str, tuple[str, list[int]]], sparse: bool = False
) -> int:
    """A safetensors file with zeroed data; returns its data size."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = DTYPE_SIZE[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        if sparse:
            f.truncate(8 + len(raw) + offset)
        else:
            f.write(bytes(offset))
    return offset


def model_dir(tmp_path: Path, config: dict[str, Any] | None = LLAMA3_8B) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    return d


def test_safetensors_headers(tmp_path: Path) -> None:
    d = model_dir(tmp_path)
    a = write_safetensors(
        d / "model-00001-of-00002.safetensors",
        {"embed": ("BF16", [1000, 64]), "layer.0.q": ("BF16", [64, 64])},
    )
    b = write_safetensors(d / "model-00002-of-00002.safetensors", {"lm_head": ("BF16", [1000, 64])})
    (d / "README.md").write_text("not weights")
    est = estimate(d, tp=1, pp=1, max_model_len=None, kv_cache_dtype=None, dtype=None)
    assert est is not None
    assert est.weights_total == a + b == 2 * (2 * 64_000 + 64 * 64)
    assert est.weights_per_gpu == est.weights_total
    assert est.source == "safetensors headers (2 files)"
    assert est.kv_per_token_per_gpu == LLAMA3_8B_KV
    assert est.max_model_len == 131072  # the model's own, as vLLM would use
    two = estimate(d, tp=2, pp=1, max_model_len=8192, kv_cache_dtype=None, dtype=None)
    assert two is not None
    assert two.weights_per_gpu == est.weights_total // 2
    assert (two.gpus, two.max_model_len) == (2, 8192)


def test_the_index_decides_which_files_count(tmp_path: Path) -> None:
    d = model_dir(tmp_path)
    write_safetensors(d / "consolidated.safetensors", {"w": ("BF16", [1000, 1000])}, sparse=True)
    size = write_safetensors(d / "model-00001-of-00001.safetensors", {"w": ("BF16", [1000, 1000])})
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}})
    )
    est = estimate(d)
    assert est is not None
    assert (est.weights_total, est.source) == (size, "safetensors headers (1 file)")
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(FitError, match=r"names model-00001-of-00002.safetensors, which is missing"):
        estimate(d)


def test_float_tensors_count_in_the_dtype_vllm_runs(tmp_path: Path) -> None:
    d = model_dir(tmp_path)
    tensors = {"w": ("F32", [1000, 1000]), "q": ("I8", [1000, 1000]), "s": ("F32", [1000])}
    write_safetensors(d / "model.safetensors", tensors, sparse=True)
    auto = estimate(d)  # a float32 checkpoint runs in 16 bits
    assert auto is not None and auto.weights_total == 2_000_000 + 1_000_000 + 2_000
    full = estimate(d, dtype="float32")
    assert full is not None and full.weights_total == 4_000_000 + 1_000_000 + 4_000
    assert full.kv_per_token_per_gpu == 2 * LLAMA3_8B_KV


def test_large_sparse_model(tmp_path: Path) -> None:
    d = model_dir(tmp_path)
    for i in range(4):
        write_safetensors(
            d / f"model-{i}.safetensors", {f"w{i}": ("BF16", [8192, 1024 * 1024])}, sparse=True
        )
    est = estimate(d, tp=4)
    assert est is not None
    assert est.weights_total == 4 * 16 * GiB
    assert est.weights_per_gpu == 16 * GiB
    assert est.source == "safetensors headers (4 files)"


def test_config_parameter_count(tmp_path: Path) -> None:
    assert parameter_count(LLAMA3_8B) == LLAMA3_8B_PARAMS
    d = model_dir(tmp_path)
    est = estimate(d, tp=1, pp=1, max_model_len=None, kv_cache_dtype=None, dtype=None)
    assert est is not None
    assert est.source == "config.json parameter count"
    assert est.weights_total == 2 * LLAMA3_8B_PARAMS
    assert parameter_count({**LLAMA3_8B, "num_parameters": 1234}) == 1234
    # A quantized checkpoint: 4 bits a weight.
    (d / "config.json").write_text(json.dumps({**LLAMA3_8B, "quantization_config": {"bits": 4}}))
    quant = estimate(d)
    assert quant is not None and quant.weights_total == LLAMA3_8B_PARAMS // 2


def test_moe_and_multimodal_configs(tmp_path: Path) -> None:
    moe = {**LLAMA3_8B, "num_local_experts": 8}
    dense_mlp = 3 * 4096 * 14336
    expected = LLAMA3_8B_PARAMS + 32 * (7 * dense_mlp + 4096 * 8)
    assert parameter_count(moe) == expected
    # A multimodal config keeps the language model's numbers in text_config.
    nested = {"architectures": ["X"], "text_config": LLAMA3_8B, "vision_config": {}}
    est = estimate(model_dir(tmp_path, nested))
    assert est is not None
    assert est.weights_total == 2 * LLAMA3_8B_PARAMS
    assert est.kv_per_token_per_gpu == LLAMA3_8B_KV


def test_not_a_local_directory() -> None:
    assert estimate("meta-llama/Llama-3.1-8B-Instruct") is None
    assert estimate(Path("/nonexistent/model")) is None


def test_kv_cache_per_gpu(tmp_path: Path) -> None:
    d = model_dir(tmp_path)

    def kv(**kw: Any) -> int | None:
        est = estimate(d, **kw)
        assert est is not None
        return est.kv_per_token_per_gpu

    assert kv() == LLAMA3_8B_KV
    assert kv(tp=2) == LLAMA3_8B_KV // 2
    assert kv(pp=2) == LLAMA3_8B_KV // 2
    assert kv(tp=16) == LLAMA3_8B_KV // 8  # 8 KV heads: at least one per GPU
    assert kv(kv_cache_dtype="fp8") == LLAMA3_8B_KV // 2
    assert kv(kv_cache_dtype="fp8_e5m2", tp=2) == LLAMA3_8B_KV // 4
    assert kv(kv_cache_dtype="bfloat16") == LLAMA3_8B_KV
    assert kv(kv_cache_dtype="nvfp4") == LLAMA3_8B_KV // 4
    assert kv(dtype="float32") == 2 * LLAMA3_8B_KV

    mla = {
        "hidden_size": 7168,
        "num_hidden_layers": 61,
        "num_attention_heads": 128,
        "kv_lora_rank": 512,
        "qk_rope_head_dim": 64,
        "vocab_size": 129280,
        "intermediate_size": 18432,
    }
    (d / "config.json").write_text(json.dumps(mla))
    assert kv(tp=8) == 61 * (512 + 64) * 2  # the latent is not split over TP ranks


def test_check_fit_error_names_numbers_and_remedies() -> None:
    est = Estimate(80 * GiB, 40 * GiB, LLAMA3_8B_KV, "safetensors headers (4 files)", gpus=2)
    ((level, message),) = check_fit(est, 80 * GiB, 0.45, 8192)
    assert level == "error"
    assert "the weights need 40.0 GiB per GPU (80.0 GiB over 2 GPUs" in message
    assert "gpu_memory_utilization 0.45 x 80.0 GiB gives 36.0 GiB" in message
    for remedy in ("tensor_parallel_size", "higher gpu_memory_utilization", "quantized"):
        assert remedy in message


def test_check_fit_warns_when_one_sequence_does_not_fit() -> None:
    weights = 2 * LLAMA3_8B_PARAMS
    est = Estimate(weights, weights, LLAMA3_8B_KV, "config.json parameter count", 1, 131072)
    assert check_fit(est, 80 * GiB, 0.9) == []  # 72 GiB: 15 GiB weights + 16 GiB of KV
    ((level, message),) = check_fit(est, 80 * GiB, 0.35)  # 28 GiB: 15 + 1 + 12 left
    assert level == "warning"
    assert "one sequence of max_model_len 131072 tokens needs 16.0 GiB" in message
    assert "a 1.0 GiB allowance for activations" in message
    assert "lower max_model_len" in message.lower()
    assert check_fit(est, 80 * GiB, 0.35, 8192) == []  # a shorter max_model_len fits
    ((level, message),) = check_fit(est, 80 * GiB, 0.19)  # 15.2 GiB: no room left at all
    assert level == "warning" and "nothing for the KV cache" in message
    unknown_kv = Estimate(weights, weights, None, "safetensors headers (1 file)")
    assert check_fit(unknown_kv, 80 * GiB, 0.35, 131072) == []


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"\x01\x02", "shorter than 8 bytes"),
        (struct.pack("<Q", 10**12) + b"{}", "claims 1000000000000 bytes"),
        (struct.pack("<Q", 5) + b"{abc}", "corrupt safetensors header"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (struct.pack("<Q", 27) + b'{"w": {"dtype": "BF16"}}   ', "bad entry for 'w'"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "corrupt safetensors header"),
    ],
)
def test_corrupt_headers_raise_fit_error(tmp_path: Path, content: bytes, match: str) -> None:
    d = model_dir(tmp_path)
    (d / "model.safetensors").write_bytes(content)
    with pytest.raises(FitError, match=match):
        estimate(d)


def test_nothing_to_estimate_from(tmp_path: Path) -> None:
    d = model_dir(tmp_path, config=None)
    with pytest.raises(FitError, match=r"no config\.json"):
        estimate(d)
    (d / "config.json").write_text(json.dumps({"model_type": "x"}))
    with pytest.raises(FitError, match="lacks num_parameters"):
        estimate(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(FitError, match="cannot read"):
        estimate(d)
