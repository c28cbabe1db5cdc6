"""Render epochs x strengths x prompts x seeds with one pipeline, and draw A1111-style X/Y grids.

The base pipeline is loaded once; each epoch's LoRA is swapped into it and scaled to each
strength on every LoRA layer. Every cell uses the same prompts, seeds, sampler, steps, CFG and
size, so the differences come from the LoRA alone. Each image carries A1111 infotext in its
``parameters`` PNG chunk, so PNG Info in A1111 reproduces it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from lora_lab import lora_io
from lora_lab.errors import ConfigError
from lora_lab.suite import Prompt

# A1111 sampler name -> (diffusers scheduler class, extra config); from diffusers' scheduler docs.
SAMPLERS: Dict[str, Tuple[str, dict]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler",
                            {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    "DPM++ SDE": ("DPMSolverSinglestepScheduler", {}),
    "DPM++ SDE Karras": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}


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
    batch_size: int = 8


@dataclass
class Cell:
    """One rendered image and where it sits in the grid."""

    epoch: int  # 0 for the base model
    label: str  # the LoRA file stem (A1111's <lora:label:strength>), "base" for strength 0
    strength: float
    prompt: Prompt
    seed: int
    path: Path
    lora_file: Optional[Path]


def infotext(prompt: str, settings: RenderSettings, seed: int, label: Optional[str], strength: float,
             lora_hash: Optional[str]) -> str:
    """A1111's ``parameters`` text: prompt (with ``<lora:name:strength>``), negative, settings."""
    text = prompt if label is None else f"{prompt} <lora:{label}:{strength:g}>"
    fields = [
        f"Steps: {settings.steps}",
        f"Sampler: {settings.sampler}",
        f"CFG scale: {settings.cfg_scale:g}",
        f"Seed: {seed}",
        f"Size: {settings.size}x{settings.size}",
        f"Model: {settings.model_name}",
    ]
    if settings.clip_skip > 1:
        fields.append(f"Clip skip: {settings.clip_skip}")
    if label is not None and lora_hash:
        fields.append(f'Lora hashes: "{label}: {lora_hash[:12]}"')
    return f"{text}\nNegative prompt: {settings.negative_prompt}\n{', '.join(fields)}"


def _save_png(image: Image.Image, path: Path, parameters: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text("parameters", parameters)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@torch.no_grad()
def _generate(pipe, prompts: Sequence[Prompt], settings: RenderSettings) -> Dict[Tuple[int, int], Image.Image]:
    """Every prompt x seed, in batches of ``settings.batch_size`` (one generator per image, so
    each image depends on its own seed only). Returns {(prompt index, seed): image}."""
    jobs = [(p, seed) for p in prompts for seed in settings.seeds]
    device = pipe.unet.device
    out: Dict[Tuple[int, int], Image.Image] = {}
    for i in range(0, len(jobs), settings.batch_size):
        chunk = jobs[i : i + settings.batch_size]
        result = pipe(
            prompt=[p.text for p, _ in chunk],
            negative_prompt=[settings.negative_prompt] * len(chunk),
            num_inference_steps=settings.steps,
            guidance_scale=settings.cfg_scale,
            height=settings.size,
            width=settings.size,
            generator=[torch.Generator(device=device).manual_seed(seed) for _, seed in chunk],
            clip_skip=settings.clip_skip - 1 if settings.clip_skip > 1 else None,  # diffusers counts skipped layers
            output_type="pil",
        )
        out.update({(p.index, seed): im for (p, seed), im in zip(chunk, result.images)})
    return out


def render(pipe, lora_files: Sequence[Tuple[int, Path, Dict[str, torch.Tensor], Dict[str, str]]],
           strengths: Sequence[float], prompts: Sequence[Prompt], settings: RenderSettings,
           out_dir: Path, progress: bool = True, timing: Optional[dict] = None,
           base_renders: Optional[dict] = None) -> List[Cell]:
    """Render every cell; the strength-0 row (the base model) is rendered once and shared.

    Args:
        pipe: The loaded base pipeline (its scheduler is replaced by the chosen sampler).
        lora_files: (epoch, path, tensors, metadata) per LoRA file, in X-axis order.
        strengths: Y-axis values; 0 renders the base model.
        prompts: The suite's prompts.
        settings: Sampler, steps, CFG, size, seeds, negative prompt.
        out_dir: Cell images go to ``out_dir/cells/``.
        timing: Filled with render_s, attach_s (adding the adapter layers for the first file),
            switch_s (later epoch swaps and strength changes) and images.
        base_renders: A worker's memory of base-model images (same prompt and settings give
            the same pixels), shared by its trials.

    Returns:
        One Cell per (epoch, strength, prompt, seed).
    """
    timing = {} if timing is None else timing
    pipe.scheduler = make_scheduler(settings.sampler, dict(pipe.scheduler.config))
    unet, text_encoder = pipe.unet, pipe.text_encoder
    lora_strengths = [s for s in strengths if s != 0]
    total = len(prompts) * (1 + len(lora_files) * len(lora_strengths)) * len(settings.seeds)
    bar = tqdm(total=total, desc="rendering", unit="img", disable=not progress, mininterval=1.0)
    cells: List[Cell] = []
    timing.update(switch_s=0.0, attach_s=0.0)
    attached = False
    started = time.perf_counter()
    base_cells: Dict[Tuple[int, int], Path] = {}
    rendered = 0
    key = (tuple(p.text for p in prompts), settings.negative_prompt, settings.sampler, settings.steps,
           settings.cfg_scale, settings.size, settings.clip_skip, tuple(settings.seeds))
    paths = {(p.index, seed): out_dir / "cells" / "base" / f"p{p.index:02d}_seed{seed}.png"
             for p in prompts for seed in settings.seeds}
    known = base_renders.get(key) if base_renders is not None else None
    if known and all(Path(src).exists() for src in known.values()):
        # The base model's images for the same prompts and settings, rendered earlier by this
        # worker (another trial): the same pixels, so copy instead of rendering again.
        for k, dst in paths.items():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(known[k], dst)
    else:
        with lora_io.adapters_disabled(unet, text_encoder):  # the base model, even mid-training
            images = _generate(pipe, prompts, settings)
        by_index = {p.index: p for p in prompts}
        for (index, seed), image in images.items():
            _save_png(image, paths[(index, seed)], infotext(by_index[index].text, settings, seed, None, 0.0, None))
        rendered += len(images)
        if base_renders is not None:
            base_renders[key] = dict(paths)
    base_cells.update(paths)
    bar.update(len(paths))
    try:
        for epoch, lora_path, tensors, meta in lora_files:
            label = lora_path.stem
            switch = time.perf_counter()
            lora_io.load_into(unet, text_encoder, tensors, source=str(lora_path))
            # The first file attaches the adapter layers; later ones only swap weights in place.
            timing["switch_s" if attached else "attach_s"] += time.perf_counter() - switch
            attached = True
            for strength in strengths:
                if strength == 0:
                    cells += [Cell(epoch, label, 0.0, p, seed, base_cells[(p.index, seed)], lora_path)
                              for p in prompts for seed in settings.seeds]
                    continue
                switch = time.perf_counter()
                lora_io.set_strength(unet, text_encoder, strength)
                timing["switch_s"] += time.perf_counter() - switch
                images = _generate(pipe, prompts, settings)
                for prompt in prompts:
                    for seed in settings.seeds:
                        path = out_dir / "cells" / label / f"s{strength:g}" / f"p{prompt.index:02d}_seed{seed}.png"
                        text = infotext(prompt.text, settings, seed, label, strength, meta.get("sshs_model_hash"))
                        _save_png(images[(prompt.index, seed)], path, text)
                        cells.append(Cell(epoch, label, float(strength), prompt, seed, path, lora_path))
                        rendered += 1
                        bar.update(1)
    finally:
        lora_io.unload(unet, text_encoder)
        bar.close()
    timing["render_s"] = time.perf_counter() - started
    timing["images"] = rendered
    return cells


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def draw_grid(images: List[List[Image.Image]], col_labels: List[str], row_labels: List[str],
              title: str = "") -> Image.Image:
    """An X/Y plot as A1111 draws it: column labels on top, row labels on the left."""
    font = _font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text: str) -> Tuple[int, int]:
        box = probe.textbbox((0, 0), text, font=font)
        return box[2] - box[0], box[3] - box[1]

    cell_w = max(im.width for row in images for im in row)
    cell_h = max(im.height for row in images for im in row)
    col_w = max([cell_w] + [text_size(t)[0] + 12 for t in col_labels])
    left = max(text_size(t)[0] for t in row_labels) + 16
    top = 28 + (24 if title else 0)
    grid = Image.new("RGB", (left + col_w * len(col_labels), top + cell_h * len(row_labels)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((8, 6), title, fill="black", font=font)
    for c, label in enumerate(col_labels):
        w, _ = text_size(label)
        draw.text((left + c * col_w + (col_w - w) // 2, top - 22), label, fill="black", font=font)
    for r, label in enumerate(row_labels):
        _, h = text_size(label)
        draw.text((8, top + r * cell_h + (cell_h - h) // 2), label, fill="black", font=font)
        for c, im in enumerate(images[r]):
            grid.paste(im, (left + c * col_w + (col_w - im.width) // 2, top + r * cell_h))
    return grid


def write_grids(cells: List[Cell], strengths: Sequence[float], out_dir: Path) -> List[Path]:
    """One grid PNG per prompt: X = epoch files, Y = strengths, seeds side by side in a cell."""
    paths = []
    labels = list(dict.fromkeys((c.epoch, c.label) for c in cells))
    prompts = list(dict.fromkeys(c.prompt for c in cells))
    by_key = {(c.label, c.strength, c.prompt.index, c.seed): c.path for c in cells}
    seeds = sorted({c.seed for c in cells}, key=[c.seed for c in cells].index)
    for prompt in prompts:
        rows = []
        for strength in strengths:
            row = []
            for _, label in labels:
                ims = [Image.open(by_key[(label, float(strength), prompt.index, s)]).convert("RGB") for s in seeds]
                strip = Image.new("RGB", (sum(i.width for i in ims), max(i.height for i in ims)), "white")
                x = 0
                for im in ims:
                    strip.paste(im, (x, 0))
                    x += im.width
                row.append(strip)
            rows.append(row)
        col_labels = [f"epoch {e} ({label})" for e, label in labels]
        grid = draw_grid(rows, col_labels, [f"strength {s:g}" for s in strengths], title=prompt.text)
        path = out_dir / "grids" / f"p{prompt.index:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        paths.append(path)
    return paths
