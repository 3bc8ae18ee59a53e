"""Markers of this test suite, and the runtime directory its daemons register in."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def _runtime_dir_of_the_tests(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Daemons the tests start register here, not in the host's runtime directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMSUP_RUNTIME_DIR", str(tmp_path_factory.mktemp("run")))
        yield


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "container: boots a Debian container under a real systemd (root, systemd-nspawn, "
        "debootstrap); deselect with -m 'not container'",
    )
    config.addinivalue_line(
        "markers",
        "vllm: runs the real vLLM CPU build (installed once into a cache; five server starts, "
        "about 5 minutes); deselect with -m 'not vllm'",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest modules first (real vLLM, then the container), so that with
    several workers they run beside the many short ones instead of after them."""

    def weight(item: pytest.Item) -> int:
        if item.get_closest_marker("vllm"):
            return 0
        return 1 if item.get_closest_marker("container") else 2

    items.sort(key=weight)  # stable: each module's own order is kept
