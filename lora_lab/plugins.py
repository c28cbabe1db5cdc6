"""Built-in names that packages provide: base models, data sets and CLIP scorer weights.

A package offers them as entry points in its ``pyproject.toml``, so lora_lab never imports it
by name; the toy world registers itself this way::

    [project.entry-points."lora_lab.models"]
    toyworld = "lora_lab.toyworld.provide:model_folder"      # (cache_dir) -> diffusers folder

    [project.entry-points."lora_lab.data"]
    toyworld = "lora_lab.toyworld.provide:data_folder"       # (cache_dir, subject) -> data folder

    [project.entry-points."lora_lab.clip_weights"]
    toyworld = "lora_lab.toyworld.provide:clip_weights"      # (model name) -> .safetensors file

What a provider returns goes through the same loading code as a user's own folder or file.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.metadata import entry_points
from typing import Callable, Tuple

from lora_lab.errors import ConfigError

GROUPS = {"model": "lora_lab.models", "data": "lora_lab.data", "clip": "lora_lab.clip_weights"}


@lru_cache(maxsize=None)
def names(kind: str) -> Tuple[str, ...]:
    """The registered names of one kind (``model``, ``data``, ``clip``), without importing them."""
    return tuple(sorted(ep.name for ep in entry_points(group=GROUPS[kind])))


def provider(kind: str, name: str) -> Callable:
    """The function registered under ``name``.

    Raises:
        ConfigError: when nothing is registered under that name.
    """
    for ep in entry_points(group=GROUPS[kind]):
        if ep.name == name:
            return ep.load()
    known = ", ".join(names(kind)) or "none installed"
    raise ConfigError(f"no {kind} is registered as {name!r} (registered: {known}); "
                      "reinstall lora_lab (`pip install -e .`) if a built-in one is missing")
