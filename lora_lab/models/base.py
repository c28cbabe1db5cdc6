"""Load a base model: a hub id, a local diffusers folder, a single-file ``.safetensors``
checkpoint, or the built-in tiny model (which is saved to a folder and loaded back as one).

Weights we did not make are only read from safetensors; pickle checkpoints are refused.
Device and dtype are chosen here, once, and passed down.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch

from lora_lab import plugins
from lora_lab.config import BUILTIN_MODELS, ModelConfig
from lora_lab.errors import ModelError
from lora_lab.files import file_sha256
from lora_lab.models import sdxl
from lora_lab.models.builtin import preset_folder, tiny_folder

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class BaseModel:
    """A loaded base pipeline plus what training and metadata need to know about it."""

    pipe: "object"  # diffusers.StableDiffusionPipeline
    noise_scheduler: "object"  # diffusers.DDPMScheduler with the model's training schedule
    name: str
    source: str
    base_version: str
    prediction_type: str
    device: torch.device

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def text_encoder(self):
        return self.pipe.text_encoder

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    def is_sdxl(self) -> bool:
        return getattr(self.pipe, "text_encoder_2", None) is not None

    @property
    def text_encoders(self) -> tuple:
        """Every text encoder: SD 1.x / 2.x's one, or SDXL's CLIP ViT-L and OpenCLIP ViT-bigG."""
        return (self.pipe.text_encoder, self.pipe.text_encoder_2) if self.is_sdxl else (self.pipe.text_encoder,)

    @property
    def tokenizers(self) -> tuple:
        return (self.pipe.tokenizer, self.pipe.tokenizer_2) if self.is_sdxl else (self.pipe.tokenizer,)


def resolve_source(cfg: ModelConfig, cache_dir: Path) -> tuple[str, str]:
    """Classify ``model.pretrained`` as ('folder' | 'single_file' | 'hub', location).

    Raises:
        ModelError: for a pickle checkpoint, a missing path, or an unrecognised folder.
    """
    if not cfg.pretrained and cfg.builtin in BUILTIN_MODELS:
        return "folder", str(tiny_folder(cache_dir, cfg.builtin))
    if not cfg.pretrained:  # a model a package registers (lora_lab.plugins), e.g. the toy world's
        return "folder", str(plugins.provider("model", cfg.builtin)(cache_dir))
    raw = cfg.pretrained
    path = Path(raw).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelError(
            f"model.pretrained: {raw} is a pickle checkpoint ({path.suffix}); lora_lab only loads "
            "weights from .safetensors files, since a pickle file can run arbitrary code when "
            "loaded. Convert it to .safetensors first, or use the .safetensors release of the model."
        )
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ModelError(
                f"model.pretrained: folder {raw} has no model_index.json; expected a diffusers "
                "folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
            )
        _check_folder_arch(cfg, path)
        return "folder", str(path)
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise ModelError(
                f"model.pretrained: {raw} is not a .safetensors file; allowed: a hub id, "
                "a diffusers folder, or a single-file .safetensors checkpoint"
            )
        _check_file_arch(cfg, path)
        return "single_file", str(path)
    if path.suffix.lower() == ".safetensors" or raw.startswith((".", "/", "~")) or not _HUB_ID.match(raw):
        raise ModelError(f"model.pretrained: {raw} does not exist")
    return "hub", raw


def wants_sdxl(cfg: ModelConfig) -> bool:
    """Whether the chosen ``model`` is SDXL (model=sdxl, preset sdxl, or an SDXL base version)."""
    return cfg.preset == "sdxl" or cfg.base_version.startswith("sdxl")


def _expected(cfg: ModelConfig) -> Optional[str]:
    if cfg.preset:
        return sdxl.PRESET_ARCH[cfg.preset]
    return "sdxl" if wants_sdxl(cfg) else None


def _refuse(cfg: ModelConfig, what: str, found: str) -> None:
    choose = "model=sdxl" if found == "sdxl" else "model=sd21 or model=sd21_base" if found == "sd2" else "model=sd15"
    raise ModelError(
        f"model.pretrained: {what} is an {sdxl.ARCH_NAMES[found]} checkpoint, but model={cfg.name} "
        f"expects {sdxl.ARCH_NAMES.get(_expected(cfg), 'SD 1.x / 2.x')}; use {choose}"
    )


def _check_file_arch(cfg: ModelConfig, path: Path) -> None:
    """Refuse a single file of another architecture than the chosen model's, naming it."""
    try:
        found = sdxl.single_file_arch(path)
    except (OSError, ValueError, UnicodeDecodeError):
        raise ModelError(f"model.pretrained: {path} is not a readable .safetensors file") from None
    expected = _expected(cfg)
    if found and expected and found != expected:
        _refuse(cfg, str(path), found)


def _check_folder_arch(cfg: ModelConfig, path: Path) -> None:
    import json

    try:
        cls = json.loads((path / "model_index.json").read_text(encoding="utf-8")).get("_class_name", "")
    except (OSError, ValueError):
        raise ModelError(f"model.pretrained: {path / 'model_index.json'} is not readable JSON") from None
    found = "sdxl" if "XL" in cls else None
    expected = _expected(cfg)
    if found == "sdxl" and expected != "sdxl":
        _refuse(cfg, f"folder {path}", "sdxl")
    if expected == "sdxl" and "XL" not in cls:
        raise ModelError(f"model.pretrained: folder {path} holds a {cls or 'pipeline'}, not an SDXL pipeline; "
                         "use model=sd15, sd21 or sd21_base for it")


def load_base(cfg: ModelConfig, cache_dir: Path, device: torch.device,
              dtype: torch.dtype = torch.float32) -> BaseModel:
    """Load the base pipeline once per process; LoRA adapters are attached later.

    Raises:
        ModelError: with the source and the reason, when loading fails.
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    kind, location = resolve_source(cfg, Path(cache_dir))
    if wants_sdxl(cfg):
        pipeline, common = StableDiffusionXLPipeline, dict(dtype=dtype)
    else:
        pipeline, common = StableDiffusionPipeline, dict(dtype=dtype, safety_checker=None, requires_safety_checker=False)
    try:
        if kind == "single_file":
            config = _single_file_config(cfg, Path(cache_dir))
            pipe = pipeline.from_single_file(location, config=str(config), **common)
        else:
            pipe = pipeline.from_pretrained(location, use_safetensors=True, **common)
        if cfg.vae:
            pipe.vae = load_vae(cfg, Path(cache_dir), dtype)
    except (OSError, ValueError, EnvironmentError) as exc:
        hint = ""
        if kind == "hub":
            hint = (" (is it in the local Hugging Face cache? This machine may be offline: "
                    "download it once, or pass a local folder or .safetensors file)")
        raise ModelError(f"model.pretrained: could not load {location}{hint}: {_first_line(exc)}") from None
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    scheduler_config = dict(pipe.scheduler.config)
    if cfg.prediction_type:
        scheduler_config["prediction_type"] = cfg.prediction_type
        pipe.scheduler.register_to_config(prediction_type=cfg.prediction_type)
    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    return BaseModel(
        pipe=pipe,
        noise_scheduler=noise_scheduler,
        name=cfg.name,
        source=location,
        base_version=cfg.base_version,
        prediction_type=noise_scheduler.config.prediction_type,
        device=device,
    )


def load_vae(cfg: ModelConfig, cache_dir: Path, dtype: torch.dtype):
    """``model.vae``: a diffusers VAE folder, a hub id, or a single ``.safetensors`` file (read
    with the chosen architecture's VAE config). Pickle files are refused."""
    from diffusers import AutoencoderKL

    raw = cfg.vae
    path = Path(raw).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelError(f"model.vae: {raw} is a pickle file ({path.suffix}); only .safetensors VAE files are loaded")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"model.vae: folder {raw} has no config.json; expected a diffusers VAE folder")
        return AutoencoderKL.from_pretrained(path, torch_dtype=dtype, use_safetensors=True)
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise ModelError(f"model.vae: {raw} is not a .safetensors file")
        config = _single_file_config(cfg, cache_dir) / "vae"
        return AutoencoderKL.from_single_file(str(path), config=str(config), torch_dtype=dtype)
    if path.suffix.lower() == ".safetensors" or raw.startswith((".", "/", "~")) or not _HUB_ID.match(raw):
        raise ModelError(f"model.vae: {raw} does not exist")
    return AutoencoderKL.from_pretrained(raw, torch_dtype=dtype, use_safetensors=True)


def _single_file_config(cfg: ModelConfig, cache_dir: Path) -> Path:
    if cfg.config_dir:
        folder = Path(cfg.config_dir).expanduser()
        if not (folder / "model_index.json").exists():
            raise ModelError(f"model.config_dir: {folder} has no model_index.json")
        return folder
    if not cfg.preset:
        raise ModelError(
            "model.preset: a single-file checkpoint needs its architecture; use model=sd15, "
            "model=sd21, model=sd21_base or model=sdxl (or set model.config_dir to a diffusers config folder)"
        )
    return preset_folder(cfg.preset, cache_dir)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


def checkpoint_identity(source: str) -> Tuple[str, Optional[str]]:
    """(A1111's "Model" name, its "Model hash" or None) for a base model's source: a single
    file's stem and the first 10 characters of its sha256; a folder's or hub id's last part."""
    path = Path(source)
    if path.is_file():
        return path.stem, file_sha256(path)[:10]
    return (path.name if path.exists() else source.rstrip("/").rsplit("/", 1)[-1]), None


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over a module's parameters and buffers: the model identity cache keys use."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
