"""The versions of the libraries that made a file: recorded in every LoRA file and trial."""

from __future__ import annotations

import platform
from functools import lru_cache
from importlib import metadata
from typing import Dict

PACKAGES = ("lora_lab", "torch", "diffusers", "transformers", "peft", "accelerate")


@lru_cache(maxsize=1)
def versions() -> Dict[str, str]:
    """``{"python": "3.11.7", "lora_lab": "0.1.0", "torch": "2.14.1", ...}``; "missing" when absent."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out
