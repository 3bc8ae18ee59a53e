"""The manifest: loading, located errors, and cross-model checks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmsup.backends.vllm import VllmModel
from llmsup.errors import ManifestError, Problem
from llmsup.manifest import (
    json_schema,
    parse_duration,
    parse_manifest,
    parse_model_len,
    parse_size,
)
from llmsup.plan import make_plan

ENV = {"VLLM_API_KEY": "sk-secret-123", "HOME": "/root"}

VLLM = "    backend: vllm\n    model: m\n"


def problems_of(text: str, env: dict[str, str] | None = None) -> list[Problem]:
    """Every problem of a manifest: load errors, or the plan's errors and warnings."""
    try:
        loaded = parse_manifest(textwrap.dedent(text), "models.yaml", ENV if env is None else env)
    except ManifestError as e:
        return e.problems
    return list(make_plan(loaded).problems)


# (id, manifest, expected "line:col", key path, part of the message)
BAD: list[tuple[str, str, str, str, str]] = [
    ("empty file", "", "1:1", "", "the manifest is empty"),
    ("only a comment", "# nothing\n", "1:1", "", "the manifest is empty"),
    ("not a mapping", "- a\n- b\n", "1:1", "", "must be a mapping with a `models:` key"),
    ("no models", "version: 1\n", "1:1", "", "missing required key 'models'"),
    (
        "yaml syntax",
        "models:\n  a: {backend: vllm\n",
        "3:1",
        "",
        "YAML syntax error",
    ),
    ("bad indentation", "models:\n  a:\n    backend: vllm\n   model: x\n", "4:4", "", "YAML"),
    ("tab indentation", "models:\n\ta: 1\n", "2:1", "", "YAML syntax error"),
    (
        "duplicate model",
        "models:\n  a:\n" + VLLM + "  a:\n" + VLLM,
        "5:3",
        "models.a",
        "duplicate key 'a' (first defined at line 2)",
    ),
    (
        "duplicate key in a model",
        "models:\n  a:\n" + VLLM + "    port: 1\n    port: 2\n",
        "6:5",
        "models.a.port",
        "duplicate key 'port'",
    ),
    (
        "unknown top-level key",
        "version: 1\nmodel:\n  a: {}\n",
        "2:1",
        "",
        "unknown key 'model' (did you mean 'models'?)",
    ),
    (
        "misspelled field",
        "models:\n  a:\n" + VLLM + "    tensor_paralel_size: 4\n",
        "5:5",
        "models.a",
        "unknown key 'tensor_paralel_size' (did you mean 'tensor_parallel_size'?)",
    ),
    (
        "ollama field on vllm",
        "models:\n  a:\n" + VLLM + "    keep_alive: -1\n",
        "5:5",
        "models.a",
        "unknown key 'keep_alive'",
    ),
    (
        "misspelled health key",
        "models:\n  a:\n" + VLLM + "    health: {intervall: 5s}\n",
        "5:14",
        "models.a.health",
        "did you mean 'interval'",
    ),
    ("wrong version", "version: 2\nmodels: {}\n", "1:10", "version", "must be one of 1"),
    (
        "missing backend",
        "models:\n  a:\n    model: m\n",
        "2:3",
        "models.a",
        "missing required key 'backend'",
    ),
    (
        "unknown backend",
        "models:\n  a:\n    backend: sglang\n    model: m\n",
        "3:14",
        "models.a.backend",
        "unknown backend 'sglang' (one of: vllm, ollama, command, remote)",
    ),
    (
        "missing model",
        "models:\n  a:\n    backend: vllm\n",
        "2:3",
        "models.a",
        "missing required key 'model'",
    ),
    (
        "utilization above 1",
        "models:\n  qwen:\n" + VLLM + "    gpu_memory_utilization: 1.5\n",
        "5:29",
        "models.qwen.gpu_memory_utilization",
        "must be in (0, 1], got 1.5",
    ),
    (
        "utilization zero",
        "models:\n  a:\n" + VLLM + "    gpu_memory_utilization: 0\n",
        "5:29",
        "models.a.gpu_memory_utilization",
        "must be in (0, 1]",
    ),
    (
        "port as text",
        "models:\n  a:\n" + VLLM + "    port: http\n",
        "5:11",
        "models.a.port",
        "must be an integer, got 'http'",
    ),
    (
        "port out of range",
        "models:\n  a:\n" + VLLM + "    port: 70000\n",
        "5:11",
        "models.a.port",
        "must be less than or equal to 65535",
    ),
    (
        "bad gpu id",
        "models:\n  a:\n" + VLLM + "    gpus: [0, gpu1]\n",
        "5:15",
        "models.a.gpus[1]",
        "must be a GPU index (0, 1, ...) or a UUID",
    ),
    (
        "negative gpu",
        "models:\n  a:\n" + VLLM + "    gpus: [-1]\n",
        "5:12",
        "models.a.gpus[0]",
        "got -1",
    ),
    (
        "bad duration",
        "models:\n  a:\n" + VLLM + "    health: {interval: 10 seconds}\n",
        "5:24",
        "models.a.health.interval",
        "must be a duration such as 10s, 5m, 1h, 500ms",
    ),
    (
        "bad default duration",
        "defaults:\n  restart: {backoff_max: forever}\nmodels:\n  a:\n" + VLLM,
        "2:26",
        "defaults.restart.backoff_max",
        "must be a duration",
    ),
    (
        "bad restart policy",
        "models:\n  a:\n" + VLLM + "    restart: {policy: sometimes}\n",
        "5:23",
        "models.a.restart.policy",
        "must be one of 'always', 'on-failure' or 'never'",
    ),
    (
        "bad max_model_len",
        "models:\n  a:\n" + VLLM + "    max_model_len: 32q\n",
        "5:20",
        "models.a.max_model_len",
        "must be a positive number of tokens",
    ),
    (
        "bad dtype",
        "models:\n  a:\n" + VLLM + "    dtype: fp7\n",
        "5:12",
        "models.a.dtype",
        "must be one of 'auto'",
    ),
    (
        "unset env variable",
        "models:\n  a:\n" + VLLM + "    api_key: ${NOPE_NOT_SET}\n",
        "5:14",
        "models.a.api_key",
        "environment variable NOPE_NOT_SET is not set",
    ),
    (
        "bad env reference",
        "models:\n  a:\n" + VLLM + "    env: {X: '${1BAD}'}\n",
        "5:14",
        "models.a.env.X",
        "bad variable reference",
    ),
    (
        "bad env name",
        "models:\n  a:\n" + VLLM + "    env: {'BAD-NAME': x}\n",
        "5:11",
        "models.a.env.BAD-NAME",
        "not a valid environment variable name",
    ),
    (
        "bad model name",
        "models:\n  'my model':\n" + VLLM,
        "2:3",
        "models.my model",
        "model name 'my model' must start with a letter or digit",
    ),
    (
        "models is a list",
        "models:\n  - backend: vllm\n",
        "2:3",
        "models",
        "must be a mapping, got a list",
    ),
    (
        "extra_args not a list",
        "models:\n  a:\n" + VLLM + "    extra_args: --enforce-eager\n",
        "5:17",
        "models.a.extra_args",
        "must be a list",
    ),
    (
        "both api_key and file",
        "models:\n  a:\n" + VLLM + "    api_key: k\n    api_key_file: /etc/hostname\n",
        "2:3",
        "models.a",
        "set api_key or api_key_file, not both",
    ),
    (
        "missing api_key_file",
        "models:\n  a:\n" + VLLM + "    api_key_file: /nonexistent/key\n",
        "5:19",
        "models.a.api_key_file",
        "no such file: /nonexistent/key",
    ),
    (
        "ollama keep_alive without unit",
        "models:\n  o:\n    backend: ollama\n    model: q\n    keep_alive: '-1'\n",
        "5:17",
        "models.o.keep_alive",
        "Go duration such as 5m, -1m",
    ),
    (
        "ollama bad kv_cache_type",
        "models:\n  o:\n    backend: ollama\n    model: q\n    kv_cache_type: fp8\n",
        "5:20",
        "models.o.kv_cache_type",
        "must be one of 'f16', 'q8_0' or 'q4_0'",
    ),
    (
        "command without port",
        "models:\n  c:\n    backend: command\n    command: [llama-server]\n",
        "2:3",
        "models.c",
        "missing required key 'port'",
    ),
    (
        "command empty argv",
        "models:\n  c:\n    backend: command\n    command: []\n    port: 8080\n",
        "4:14",
        "models.c.command",
        "must have at least 1 item",
    ),
    (
        "gateway without port",
        "gateway: {host: 0.0.0.0}\nmodels:\n  a:\n" + VLLM,
        "1:1",
        "gateway",
        "missing required key 'port'",
    ),
    # cross-model checks (plan.py)
    (
        "same port twice",
        "models:\n  a:\n" + VLLM + "    port: 8000\n  b:\n" + VLLM + "    port: 8000\n",
        "9:11",
        "models.b.port",
        "127.0.0.1:8000 is already used by model a",
    ),
    (
        "port of the gateway",
        "gateway: {port: 9000}\nmodels:\n  a:\n" + VLLM + "    port: 9000\n",
        "6:11",
        "models.a.port",
        "already used by the gateway",
    ),
    (
        "wildcard host collides",
        "models:\n  a:\n" + VLLM + "    host: 0.0.0.0\n  b:\n"
        "    backend: vllm\n    model: n\n    port: 8000\n",
        "9:11",
        "models.b.port",
        "already used by model a",
    ),
    (
        "same served name",
        "models:\n  a:\n" + VLLM + "    served_name: x\n  b:\n"
        "    backend: vllm\n    model: n\n    served_name: x\n    port: 8001\n",
        "9:18",
        "models.b.served_name",
        "served name 'x' is already served by a",
    ),
    (
        "tp differs from gpus",
        "models:\n  a:\n" + VLLM + "    gpus: [0, 1]\n    tensor_parallel_size: 4\n",
        "6:27",
        "models.a.tensor_parallel_size",
        "= 4 x 1 = 4, but 2 GPU(s) are listed",
    ),
    (
        "gpu listed twice",
        "models:\n  a:\n" + VLLM + "    gpus: [1, 1]\n",
        "5:15",
        "models.a.gpus[1]",
        "GPU 1 is listed twice",
    ),
    (
        "auto tool choice without parser",
        "models:\n  a:\n" + VLLM + "    extra_args: [--enable-auto-tool-choice]\n",
        "5:18",
        "models.a.extra_args[0]",
        "--enable-auto-tool-choice needs a parser",
    ),
    (
        "extra_args duplicates a field",
        "models:\n  a:\n" + VLLM + "    extra_args: ['-tp', '2']\n",
        "5:18",
        "models.a.extra_args[0]",
        "-tp duplicates the field `tensor_parallel_size`",
    ),
    (
        "api key on argv",
        "models:\n  a:\n" + VLLM + "    extra_args: ['--api-key=abc']\n",
        "5:18",
        "models.a.extra_args[0]",
        "would put a secret on the command line",
    ),
    (
        "CUDA_VISIBLE_DEVICES in env",
        "models:\n  a:\n" + VLLM + "    gpus: [0]\n    env: {CUDA_VISIBLE_DEVICES: '1'}\n",
        "6:33",
        "models.a.env.CUDA_VISIBLE_DEVICES",
        "set by llmsup from gpus",
    ),
    (
        "gpu overcommitted",
        "models:\n  a:\n" + VLLM + "    gpus: [0]\n    gpu_memory_utilization: 0.6\n"
        "  b:\n    backend: vllm\n    model: n\n    port: 8001\n    gpus: [0]\n"
        "    gpu_memory_utilization: 0.5\n",
        "12:29",
        "models.b.gpu_memory_utilization",
        "GPU 0 would be asked for 1.10 of its memory: a (0.6) + b (0.5)",
    ),
    (
        "ollama models disagree on a server setting",
        "models:\n  o1:\n    backend: ollama\n    model: a\n    num_parallel: 2\n"
        "  o2:\n    backend: ollama\n    model: b\n    num_parallel: 4\n",
        "9:19",
        "models.o2.num_parallel",
        "shares one `ollama serve` with o1",
    ),
    (
        "alias to nothing",
        "gateway:\n  port: 9000\n  aliases: {gpt-4: nope}\nmodels:\n  a:\n" + VLLM,
        "3:20",
        "gateway.aliases.gpt-4",
        "alias target 'nope' is no served name",
    ),
]


@pytest.mark.parametrize(
    ("text", "where", "path", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_manifest_is_located(text: str, where: str, path: str, message: str) -> None:
    found = [p for p in problems_of(text) if p.severity == "error"]
    rendered = "\n".join(str(p) for p in found)
    assert found, "expected an error"
    match = [p for p in found if message in p.message]
    assert match, f"no error says {message!r}:\n{rendered}"
    p = match[0]
    assert f"{p.line}:{p.column}" == where, rendered
    assert p.path == path, rendered
    assert str(p).startswith(f"models.yaml:{where}: "), rendered


def test_bad_manifests_are_many_and_distinct() -> None:
    assert len(BAD) >= 25
    assert len({b[1] for b in BAD}) == len(BAD)


def test_all_problems_of_a_file_are_reported_at_once() -> None:
    text = """\
    models:
      a:
        backend: vllm
        model: m
        port: nope
        gpu_memory_utilization: 2
        tensor_paralel_size: 2
      b:
        backend: ollama
    """
    found = problems_of(text)
    assert {p.path for p in found} == {
        "models.a.port",
        "models.a.gpu_memory_utilization",
        "models.a",
        "models.b",
    }
    assert [p.line for p in found] == sorted(p.line for p in found)


def test_secret_values_never_appear_in_errors() -> None:
    text = "models:\n  a:\n" + VLLM + "    api_key: [sk-secret-123]\n"
    found = problems_of(text)
    assert found
    assert all("sk-secret-123" not in str(p) for p in found)


def test_warnings_do_not_invalidate() -> None:
    text = """\
    models:
      a:
        backend: vllm
        model: m
        kv_cache_dtype: fp9
        tool_call_parser: nosuch
        extra_args: [--no-such-flag]
    """
    found = problems_of(text)
    assert {p.severity for p in found} == {"warning"}
    msgs = " | ".join(p.message for p in found)
    assert "vLLM 0.33 does not know kv_cache_dtype 'fp9'" in msgs
    assert "vLLM 0.33 does not know tool_call_parser 'nosuch'" in msgs
    assert "vLLM 0.33 has no flag --no-such-flag" in msgs


def test_gpu_share_near_full_is_a_warning() -> None:
    text = """\
    models:
      a: {backend: vllm, model: m, gpus: [0], gpu_memory_utilization: 0.5}
      b: {backend: vllm, model: n, gpus: [0], gpu_memory_utilization: 0.48, port: 8001}
    """
    (p,) = problems_of(text)
    assert p.severity == "warning"
    assert "GPU 0 is shared at 0.98" in p.message


def test_env_expansion_and_defaults() -> None:
    text = """\
    models:
      a:
        backend: vllm
        model: ${MODEL_DIR:-/srv/models}/qwen
        api_key: ${VLLM_API_KEY}
        env: {PRICE: "$$5"}
    """
    loaded = parse_manifest(textwrap.dedent(text), "m.yaml", ENV)
    spec = loaded.manifest.models["a"]
    assert isinstance(spec, VllmModel)
    assert spec.model == "/srv/models/qwen"
    assert spec.env == {"PRICE": "$5"}
    assert spec.api_key is not None and spec.api_key.get_secret_value() == "sk-secret-123"


def test_defaults_merge_field_by_field() -> None:
    text = """\
    defaults:
      host: 0.0.0.0
      health: {interval: 30s, failures: 5}
      restart: {policy: always, max_restarts: 2}
      stop_timeout: 1m
    models:
      a:
        backend: vllm
        model: m
        health: {interval: 500ms}
        restart: {window: 1h}
        stop_timeout: 2s
      b: {backend: vllm, model: n, port: 8001, host: 127.0.0.2}
    """
    m = parse_manifest(textwrap.dedent(text), "m.yaml", ENV).manifest
    assert m.health("a").interval == 0.5
    assert m.health("a").failures == 5
    assert m.health("a").startup_timeout == 1200.0
    assert m.health("b").interval == 30.0
    assert m.restart("a").policy == "always"
    assert m.restart("a").window == 3600.0
    assert m.restart("a").max_restarts == 2
    assert m.stop_timeout("a") == 2.0
    assert m.stop_timeout("b") == 60.0
    assert m.stop_timeout("gone") == 60.0  # a leftover of an earlier manifest: the default
    assert m.host("a") == "0.0.0.0"
    assert m.host("b") == "127.0.0.2"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10s", 10), ("5m", 300), ("1h", 3600), ("500ms", 0.5), (0.5, 0.5), ("1h30m", 5400), (3, 3)],
)
def test_durations(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "10", "-1s", "1 h", True, None, "5x"][2:])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError, match="must be a duration"):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "tokens"),
    [(27768, 27768), ("32k", 32000), ("32K", 32768), ("auto", -1), (-1, -1), ("1.5k", 1500)],
)
def test_model_len(text: str | int, tokens: int) -> None:
    assert parse_model_len(text) == tokens


def test_sizes() -> None:
    assert parse_size("10M") == 10 * 2**20
    assert parse_size("512KiB") == 512 * 1024
    assert parse_size(100) == 100
    with pytest.raises(ValueError):
        parse_size("lots")


ON_DEMAND = """\
gateway: {port: 9000}
models:
  base: {backend: vllm, model: b, gpus: [0], gpu_memory_utilization: 0.3}
  big1: {backend: vllm, model: x, gpus: [0], gpu_memory_utilization: 0.6, port: 8001,
         start: on_demand, idle_timeout: 5m}
  big2: {backend: vllm, model: y, gpus: [0], gpu_memory_utilization: 0.6, port: 8002,
         start: on_demand}
  chat1: {backend: vllm, model: c1, gpus: [1], gpu_memory_utilization: 0.2, port: 8003,
          start: on_demand, exclusive: chat}
  chat2: {backend: vllm, model: c2, gpus: [2], gpu_memory_utilization: 0.2, port: 8004,
          start: on_demand, exclusive: chat}
"""


def test_on_demand_models_that_do_not_fit_together_are_swapped_not_rejected() -> None:
    from llmsup.plan import conflicts

    loaded = parse_manifest(ON_DEMAND, "m.yaml", ENV)
    assert [p for p in make_plan(loaded).problems if p.severity == "error"] == []
    assert conflicts(loaded, "big1", "big2")  # 0.3 + 0.6 + 0.6 > 1 on GPU 0
    assert conflicts(loaded, "chat1", "chat2")  # one exclusive group
    assert not conflicts(loaded, "big1", "chat1")
    assert not conflicts(loaded, "big1", "big1")


def test_on_demand_model_that_never_fits_beside_the_always_on_ones() -> None:
    text = ON_DEMAND.replace(
        "gpu_memory_utilization: 0.6, port: 8002", "gpu_memory_utilization: 0.8, port: 8002"
    )
    found = [p for p in problems_of(text) if p.severity == "error"]
    assert len(found) == 1
    assert found[0].path == "models.big2.gpu_memory_utilization"
    assert "base (0.3) + big2 (0.8)" in found[0].message


@pytest.mark.parametrize(
    ("text", "path", "message"),
    [
        (
            "models:\n  a: {backend: vllm, model: m, start: on_demand}\n",
            "models.a.start",
            "add a `gateway:` section",
        ),
        (
            "models:\n  a: {backend: vllm, model: m, exclusive: g}\n",
            "models.a.exclusive",
            "only start: on_demand models can be swapped",
        ),
    ],
)
def test_on_demand_rules(text: str, path: str, message: str) -> None:
    found = [p for p in problems_of(text) if p.severity == "error"]
    assert [(p.path, message in p.message) for p in found] == [(path, True)]


def _schema_properties(node: object, where: str = "") -> list[tuple[str, dict[str, object]]]:
    """Every (key path, property schema) under `properties` anywhere in a JSON schema."""
    out: list[tuple[str, dict[str, object]]] = []
    if isinstance(node, dict):
        for key, prop in (node.get("properties") or {}).items():
            out.append((f"{where}.{key}", prop))
        for key, value in node.items():
            out += _schema_properties(value, f"{where}.{key}" if key != "properties" else where)
    elif isinstance(node, list):
        for value in node:
            out += _schema_properties(value, where)
    return out


def test_every_schema_property_has_its_own_description() -> None:
    schema = json_schema()
    props = _schema_properties(schema)
    assert len(props) > 60  # every class of the manifest is in the walk
    missing = [path for path, prop in props if not prop.get("description")]
    assert not missing, f"no description for: {missing}"
    # A type's own description (Duration's "10s, 5m, ...") does not describe the field.
    generic = [
        path for path, prop in props if prop["description"] == "10s, 5m, 1h, 500ms, or seconds"
    ]
    assert not generic, f"only the type's description for: {generic}"


def test_no_models_is_a_warning() -> None:
    (p,) = problems_of("models: {}\n")
    assert (p.severity, p.path, p.line) == ("warning", "models", 1)
    assert "would supervise nothing" in p.message


TWO_ON_GPU0 = """\
{gateway}models:
  a: {{backend: vllm, model: m, gpus: [0], gpu_memory_utilization: 0.6{a}}}
  b: {{backend: vllm, model: n, gpus: [0], gpu_memory_utilization: 0.6, port: 8001{b}}}
"""
ON = ", start: on_demand"


@pytest.mark.parametrize(
    ("gateway", "a", "b", "hint"),
    [
        ("", "", "", "make both of a and b start: on_demand"),
        ("gateway: {port: 9000}\n", "", "", "make both of a and b start: on_demand"),
        # Following half of that hint: the always-on one never makes way.
        ("gateway: {port: 9000}\n", "", ON, "make a start: on_demand too"),
        ("gateway: {port: 9000}\n", ON, "", "make b start: on_demand too"),
    ],
)
def test_gpu_conflict_says_what_resolves_it(gateway: str, a: str, b: str, hint: str) -> None:
    text = TWO_ON_GPU0.format(gateway=gateway, a=a, b=b)
    (err,) = [p for p in problems_of(text) if p.severity == "error"]
    assert err.path.endswith(".gpu_memory_utilization")
    assert "GPU 0 would be asked for 1.20" in err.message
    assert hint in err.message
    assert ("add a `gateway:` section" in err.message) == (not gateway)


def test_following_the_gpu_conflict_hint_resolves_it() -> None:
    text = TWO_ON_GPU0.format(gateway="gateway: {port: 9000}\n", a=ON, b=ON)
    loaded = parse_manifest(text, "models.yaml", ENV)
    plan = make_plan(loaded)
    assert [p for p in plan.problems if p.severity == "error"] == []
    # Swapped, never together: neither waits for the other to be ready.
    assert plan.after == {}


def test_models_that_share_a_gpu_but_are_not_swapped_start_in_order() -> None:
    text = """\
    gateway: {port: 9000}
    models:
      a: {backend: vllm, model: m, gpus: [0], gpu_memory_utilization: 0.4, start: on_demand}
      b: {backend: vllm, model: n, gpus: [0], gpu_memory_utilization: 0.4, port: 8001,
          start: on_demand}
    """
    plan = make_plan(parse_manifest(textwrap.dedent(text), "models.yaml", ENV))
    assert plan.after == {"b": ("a",)}  # they fit together: both may run, one after the other


OLLAMA_BESIDE_VLLM = """\
models:
  v: {{backend: vllm, model: m, gpus: [0], gpu_memory_utilization: {util}}}
  w: {{backend: vllm, model: n, gpus: [1], gpu_memory_utilization: {util}, port: 8001}}
  o: {{backend: ollama, model: "qwen2.5:7b"{gpus}}}
"""


@pytest.mark.parametrize(
    ("util", "gpus", "warned"),
    [
        (0.9, "", True),  # every GPU vLLM uses is nearly full
        (0.6, "", False),
        (0.9, ", gpus: [1]", True),
        (0.9, ", gpus: [1, 2]", False),  # GPU 2 has room
    ],
)
def test_ollama_without_room_beside_vllm_is_a_warning(util: float, gpus: str, warned: bool) -> None:
    found = problems_of(OLLAMA_BESIDE_VLLM.format(util=util, gpus=gpus))
    mine = [p for p in found if p.path.startswith("models.o")]
    assert [p.severity for p in mine] == (["warning"] if warned else [])
    if warned:
        assert "GPU 1 at 0.90 (w)" in mine[0].message
        assert "give this model gpus with room" in mine[0].message
        assert mine[0].line == 4


def test_check_warns_of_an_executable_not_on_path(tmp_path: Path) -> None:
    from tests.util import FAKES_DIR

    manifest = tmp_path / "models.yaml"
    manifest.write_text(
        "models:\n"
        "  a: {backend: vllm, model: m}\n"
        "  b: {backend: command, command: [no-such-server, --port, '9001'], port: 9001}\n"
    )
    check = [sys.executable, "-m", "llmsup.cli", "check", "-f", str(manifest)]
    env = {**os.environ, "PATH": f"{FAKES_DIR}:{tmp_path}"}
    r = subprocess.run(check, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "not on PATH" in ln]
    assert lines == [
        f"{manifest}:3:35: warning: models.b.command[0]: 'no-such-server' is not on PATH "
        f"(searched: {FAKES_DIR}:{tmp_path}): `up` would fail to start b; install it, or "
        "run llmsup with the PATH of the environment that has it "
        "(for systemd: `llmsup systemd install --path`)"
    ]
    assert "OK, 2 models in 2 servers, 1 warning" in r.stdout

    env["PATH"] = str(tmp_path)  # no vllm either
    r = subprocess.run(check, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"models.a.backend: 'vllm' is not on PATH (searched: {tmp_path})" in r.stderr
    assert "2 warnings" in r.stdout


def test_plan_says_swapped_not_after_for_models_that_never_run_together(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from llmsup.cli import main

    path = tmp_path / "models.yaml"
    path.write_text(TWO_ON_GPU0.format(gateway="gateway: {port: 9000}\n", a=ON, b=ON))
    r = CliRunner().invoke(main, ["plan", "-f", str(path)])
    assert r.exit_code == 0, r.output
    heads = [ln for ln in r.output.splitlines() if re.match(r"# \d+\. ", ln)]
    assert heads[0].endswith("on 127.0.0.1:8000, swapped with b (never together)"), heads
    assert heads[1].endswith("on 127.0.0.1:8001, swapped with a (never together)"), heads
    assert "is ready" not in r.output
    r = CliRunner().invoke(main, ["plan", "-f", str(path), "--json"])
    entries = json.loads(r.output)
    assert [(e["after"], e["swapped_with"]) for e in entries] == [([], ["b"]), ([], ["a"])]


def test_every_field_of_every_manifest_class_has_a_description() -> None:
    import inspect

    from pydantic import BaseModel

    import llmsup.fields
    import llmsup.manifest
    from llmsup.backends import REGISTRY

    # The top level, the fields every model shares, and each backend's own.
    modules = [
        llmsup.manifest,
        llmsup.fields,
        *(sys.modules[b.model.__module__] for b in REGISTRY.values()),
    ]
    classes = [
        cls
        for module in modules
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, BaseModel) and cls.__module__ == module.__name__
    ]
    assert {"Manifest", "VllmModel", "Health", "Restart"} <= {c.__name__ for c in classes}
    missing = [
        f"{cls.__name__}.{name}"
        for cls in classes
        for name, info in cls.model_fields.items()
        if not info.description
    ]
    assert not missing, f"fields without a description: {missing}"
