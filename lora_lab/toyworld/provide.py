"""What the toy world registers with lora_lab (entry points in pyproject.toml): a model
folder, a data folder per subject and the CLIP scorer's weights. lora_lab loads each through
the same code as a user's own folder or file; it never imports the toy world by name."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from lora_lab.errors import ConfigError


def model_folder(cache_dir: Path) -> Path:
    """The toy world's miniature Stable Diffusion as a diffusers folder."""
    from lora_lab.toyworld import assets

    return assets.model_folder(Path(cache_dir))


def data_folder(cache_dir: Path, subject: Optional[str] = None) -> Path:
    """A kohya parent folder of one subject's drawings, with its ``suite.yaml``."""
    from lora_lab.toyworld import subjects

    return subjects.data_folder(Path(cache_dir), subject)


def clip_weights(model: str) -> Path:
    """The open_clip checkpoint of ``lora-lab-toyworld-clip``."""
    from lora_lab.toyworld import assets, nets

    if model != nets.CLIP_NAME:
        raise ConfigError(f"eval.clip.pretrained: 'toyworld' weights exist only for {nets.CLIP_NAME}, not {model!r}")
    return assets.clip_checkpoint()
