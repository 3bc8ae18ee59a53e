"""Removing a dead tree's /dev/shm litter must spare what live processes use.

The cleanup removes entries made since a launch that no process maps. A
multiprocessing semaphore (`sem.mp-*`) is mapped under glibc's temporary name,
so a live one looks unused: removing it made a real vLLM, starting beside a
server that had just ended, fail in its Worker ("SemLock._rebuild:
FileNotFoundError").
"""

from __future__ import annotations

import multiprocessing
import time
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

from llmsup.process import litter

SHM = Path("/dev/shm")


def test_a_live_semaphore_survives_and_an_unused_segment_goes() -> None:
    since = time.time()
    lock = multiprocessing.get_context("spawn").Lock()  # lives until the tracker unlinks it
    sem = SHM / ("sem." + lock._semlock.name.lstrip("/"))  # type: ignore[attr-defined]
    assert sem.exists()
    unused = SharedMemory(create=True, size=4096)
    unused.close()  # made since `since`, mapped by nobody: litter
    segment = SHM / unused.name.lstrip("/")
    try:
        removed = litter.remove_shm([], since)
        assert str(segment) in removed
        assert sem.exists(), f"removed a live semaphore: {removed}"
        with lock:  # and it still works
            pass
    finally:
        if segment.exists():
            unused.unlink()
