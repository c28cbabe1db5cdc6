"""A1111's names and records: its sampler names mapped to diffusers schedulers, the render
settings every cell shares, and the infotext (the PNG ``parameters`` chunk) A1111's PNG Info
reads back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lora_lab.errors import ConfigError
from lora_lab.files import atomic_path

# A1111 sampler name -> (diffusers scheduler class, extra config); from diffusers' scheduler docs.
# Since A1111 1.9 a sampler's "Automatic" schedule is its own default: Karras sigmas for DPM++ 2M,
# DPM++ SDE, DPM2 and DPM2 a, exponential ones for DPM++ 2M SDE (sd_samplers_kdiffusion's
# table), so those names render with those sigmas here too, and "<name> Karras" is the old
# spelling of the same thing. Infotext writes A1111 1.9's form: the sampler, then "Schedule type".
_KARRAS, _EXPONENTIAL = {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}
_SDE = {"algorithm_type": "sde-dpmsolver++"}
SAMPLERS: Dict[str, Tuple[str, dict]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", _KARRAS),
    "DPM2": ("KDPM2DiscreteScheduler", _KARRAS),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", _KARRAS),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", _KARRAS),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", _KARRAS),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", _KARRAS),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", _KARRAS),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {**_SDE, **_EXPONENTIAL}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {**_SDE, **_KARRAS}),
    "DPM++ SDE": ("DPMSolverSinglestepScheduler", _KARRAS),
    "DPM++ SDE Karras": ("DPMSolverSinglestepScheduler", _KARRAS),
    "UniPC": ("UniPCMultistepScheduler", {}),
}


def a1111_sampler(sampler: str) -> Tuple[str, Optional[str]]:
    """(A1111 1.9's sampler name, its "Schedule type" or None) for one of :data:`SAMPLERS`."""
    extra = SAMPLERS[sampler][1]
    schedule = "Karras" if extra.get("use_karras_sigmas") else "Exponential" if extra.get("use_exponential_sigmas") else None
    return sampler.removesuffix(" Karras"), schedule


def make_scheduler(sampler: str, scheduler_config: dict):
    """A diffusers scheduler for an A1111 sampler name, keeping the model's noise schedule."""
    import diffusers

    if sampler not in SAMPLERS:
        raise ConfigError(f"eval.sampler: unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
    cls_name, extra = SAMPLERS[sampler]
    return getattr(diffusers, cls_name).from_config(scheduler_config, **extra)


@dataclass
class RenderSettings:
    sampler: str
    steps: int
    cfg_scale: float
    size: int
    seeds: List[int]
    negative_prompt: str
    model_name: str
    clip_skip: int = 1
    batch_size: Optional[int] = None
    model_hash: Optional[str] = None  # A1111's short hash (sha256[:10]) of a single-file checkpoint
    mixed_precision: Optional[str] = None  # fp16 / bf16: autocast the UNet and text encoder on a GPU
    noise_device: str = "cpu"  # where the seeds' noise is drawn (render sets it from the UNet's device)


def infotext(prompt: str, settings: RenderSettings, seed: int, label: Optional[str], strength: float,
             lora_hash: Optional[str]) -> str:
    """A1111's ``parameters`` text as A1111 1.9+ writes it: the prompt (with
    ``<lora:name:strength>``), the negative prompt's line only when there is one, then the
    settings, with ``Schedule type`` always (``Automatic``: the sampler's own) and
    ``RNG: CPU`` for noise drawn on the CPU (A1111 reads a missing RNG as GPU noise, which
    draws other images from the same seed)."""
    text = prompt if label is None else f"{prompt} <lora:{label}:{strength:g}>"
    sampler, schedule = a1111_sampler(settings.sampler)
    fields = [f"Steps: {settings.steps}", f"Sampler: {sampler}", f"Schedule type: {schedule or 'Automatic'}",
              f"CFG scale: {settings.cfg_scale:g}", f"Seed: {seed}", f"Size: {settings.size}x{settings.size}"]
    if settings.model_hash:
        fields.append(f"Model hash: {settings.model_hash}")
    fields.append(f"Model: {settings.model_name}")
    if settings.clip_skip > 1:
        fields.append(f"Clip skip: {settings.clip_skip}")
    if settings.noise_device == "cpu":
        fields.append("RNG: CPU")
    if label is not None and lora_hash:
        fields.append(f'Lora hashes: "{label}: {lora_hash[:12]}"')
    negative = f"\nNegative prompt: {settings.negative_prompt}" if settings.negative_prompt else ""
    return f"{text}{negative}\n{', '.join(fields)}"


def save_png(image: Image.Image, path: Path, parameters: str) -> None:
    info = PngInfo()
    info.add_text("parameters", parameters)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
