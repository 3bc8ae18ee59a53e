"""The images pods run, and what vLLM flags an image's vLLM accepts.

vLLM's image follows the flag table the manifest is checked against (the newest
llmsup has, unless `--image vllm=IMG` names another version in its tag); Ollama's
is pinned; llmsup's own runs the gateway.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from llmsup import __version__
from llmsup.backends.vllm_flags import FlagTable, Installed, choose, release, table, versions

VLLM_REPOSITORY = "vllm/vllm-openai"
# Ollama 0.32.7: the newest stable release when this was written (0.33 was at rc2).
OLLAMA_IMAGE = "ollama/ollama:0.32.7"
LLMSUP_IMAGE = f"ghcr.io/llmsup/llmsup:{__version__}"
# `--image NAME=IMG` names one of these, or a model.
KINDS = ("vllm", "ollama", "llmsup")


def tag_of(image: str) -> str:
    """`repo/name:v0.33.0` -> `v0.33.0`; '' without a tag (or with a digest only)."""
    last = image.split("@", 1)[0].rsplit("/", 1)[-1]
    return last.partition(":")[2]


def vllm_table(image: str | None) -> FlagTable:
    """The flags of the vLLM in `image` (by its tag's version); None: the default image,
    the newest table's own release."""
    known = versions()
    if image is None:
        newest = "{}.{}".format(*known[-1])
        why = f"vllm {release(newest)}, the default image's ({default_vllm_image(newest)})"
        return table(newest, True, why)
    m = re.match(r"v?(\d+\.\d+(?:\.\d+)?)", tag_of(image))
    found = Installed(image, m[1] if m else None, "" if m else "its tag names no vLLM version")
    return table(*choose(found, known))


def default_vllm_image(version: str) -> str:
    """vLLM's own image of the release a flag table was read from."""
    return f"{VLLM_REPOSITORY}:v{release(version)}"


def image_for(
    images: Mapping[str, str], models: Sequence[str], backend: str, vllm_version: str
) -> str | None:
    """The image of the server of `models`: its own (`--image MODEL=IMG`, for any of
    them), else its backend's, else the default (none for a `command` server)."""
    for model in models:
        if model in images:
            return images[model]
    if backend in images:
        return images[backend]
    if backend == "vllm":
        return default_vllm_image(vllm_version)
    if backend == "ollama":
        return OLLAMA_IMAGE
    return None
