"""llmsup's NvmlSource on a simulated GPU host, in the test process.

The fake pynvml of tests/fakes/nvml (see _fakegpu.py for the host file) stands
in for the real module: loaded afresh for each test, so that no NVML state
(the count of nvmlInit calls) leaks from one test to the next. Subprocesses
(a daemon, the CLI) get the same through `_fakegpu.nvml_env`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

import _fakegpu
from llmsup.gpu import NvmlSource


def fake_pynvml(monkeypatch: pytest.MonkeyPatch, host: str | os.PathLike[str]) -> ModuleType:
    """A fresh fake pynvml playing `host`, which `import pynvml` gives until the test ends."""
    spec = importlib.util.spec_from_file_location("pynvml", Path(_fakegpu.NVML_DIR, "pynvml.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    monkeypatch.setenv(_fakegpu.HOST_ENV, os.fspath(host))
    return module


def nvml_source(monkeypatch: pytest.MonkeyPatch, host: str | os.PathLike[str]) -> NvmlSource:
    """The source llmsup uses, reading `host` through the fake pynvml."""
    fake_pynvml(monkeypatch, host)
    return NvmlSource()
