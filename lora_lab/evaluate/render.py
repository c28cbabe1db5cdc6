"""Render epochs x strengths x prompts x seeds with one pipeline, and draw A1111-style X/Y grids.

The base pipeline is loaded once; each epoch's LoRA is swapped into it, and all of that
epoch's cells (every strength, prompt and seed) render together, with as many other epochs as
a batch holds, each image at its own strength from its own file on every LoRA layer (one
stacked low-rank product per layer, :class:`SampleStrengths`). Every cell uses the same prompts, seeds, sampler, steps, CFG and
size, so the differences come from the LoRA alone. Each image carries A1111 infotext in its
``parameters`` PNG chunk, so PNG Info in A1111 reproduces it.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from tqdm.auto import tqdm

from lora_lab.data.suites import Prompt
from lora_lab.device import PeakMemory, free_memory
from lora_lab.errors import LoraLabError
from lora_lab.evaluate.infotext import RenderSettings, infotext, make_scheduler, save_png
from lora_lab.lora import adapters as lora_io
from lora_lab.lora import formats as lora_formats
from lora_lab.lora import kohya as kohya_io
from lora_lab.lora.strengths import SampleStrengths


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


AUTO_MAX_BATCH = 32  # past this, a bigger batch stops paying on the CPUs and GPUs we measured
MEMORY_SHARE = 0.7  # of the free memory a batch may use


def auto_batch_size(per_image: Optional[int], free: int) -> int:
    """Images per pipeline call that fit in ``MEMORY_SHARE`` of ``free`` bytes, at most
    ``AUTO_MAX_BATCH``; 8 when the cost of an image could not be measured."""
    if not per_image or per_image <= 0:
        return 8
    return max(1, min(AUTO_MAX_BATCH, int(free * MEMORY_SHARE // per_image)))


def label_of(path: Path, meta: dict) -> str:
    """A LoRA file's name in ``<lora:name:w>`` and in the grids: its stem, or the folder of a
    diffusers ``checkpoint-N``."""
    return meta.get("lora_lab_label") or path.stem


# A full-rank file (LoHa, LoKr, DoRA read back as their exact change) is the size of the layers
# it touches; side by side they are held at once, up to this many bytes.
FULL_RANK_STACK_BYTES = 2 << 30


def _within_stack_budget(group: list) -> list:
    """The first files of ``group`` whose full-rank tensors fit the stacking budget (at least one)."""
    total = 0
    for i, (_, _, tensors, meta) in enumerate(group):
        if meta.get("lora_lab_format") in lora_formats.FULL_RANK:
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            if total > FULL_RANK_STACK_BYTES and i:
                return group[:i]
    return group


def _plan_key(settings: RenderSettings, unet) -> tuple:
    return ("batch", settings.size, unet.device.type)


Job = Tuple  # (prompt, seed, LoRA strength[, adapter name]): the adapter defaults to the first


@torch.no_grad()
def generate(pipe, jobs: Sequence[Job], settings: RenderSettings, strengths=None, on_batch=None,
              plan: Optional[dict] = None) -> Dict[Job, Image.Image]:
    """Render ``jobs`` in as few pipeline calls as memory allows; each image has its own
    generator (so it depends on its own seed only) and, through ``strengths`` (a
    :class:`SampleStrengths`), its own LoRA strength.

    ``plan`` (a worker's memory) keeps the batch size: ``settings.batch_size`` when set, else
    chosen once from the free memory and one image's measured cost (the first call renders one
    image and measures it).
    """
    device = pipe.unet.device
    plan = {} if plan is None else plan
    key = _plan_key(settings, pipe.unet)
    if settings.batch_size:
        plan[key] = settings.batch_size
    out: Dict[Job, Image.Image] = {}
    i = 0
    while i < len(jobs):
        size = plan.get(key, 1)
        chunk = list(jobs[i : i + size])
        if strengths is not None:
            strengths.set([job[2] for job in chunk], [job[3] for job in chunk] if len(chunk[0]) > 3 else None)
        # On a GPU with mixed precision, render in it too, as A1111 renders SD 1.x / 2.x in fp16
        # (their VAEs decode fine in fp16); a CPU renders in fp32.
        half = settings.mixed_precision if device.type == "cuda" else None
        autocast = torch.autocast("cuda", dtype=torch.bfloat16 if half == "bf16" else torch.float16, enabled=bool(half))
        # SDXL's own VAE overflows in fp16 (its config says force_upcast): the UNet renders in
        # mixed precision, the VAE decodes in fp32 outside it. An fp16-safe VAE (model.vae) says
        # force_upcast false and decodes inside.
        fp32_vae = bool(half) and bool(getattr(pipe.vae.config, "force_upcast", False))
        with PeakMemory(device, plan) as peak, autocast:
            result = pipe(
                prompt=[job[0].text for job in chunk],
                negative_prompt=[settings.negative_prompt] * len(chunk),
                num_inference_steps=settings.steps,
                guidance_scale=settings.cfg_scale,
                height=settings.size,
                width=settings.size,
                generator=[torch.Generator(device=device).manual_seed(job[1]) for job in chunk],
                clip_skip=settings.clip_skip - 1 if settings.clip_skip > 1 else None,  # diffusers counts skipped layers
                output_type="latent" if fp32_vae else "pil",
            )
            images = decode_fp32(pipe, result.images) if fp32_vae else result.images
        if key not in plan:
            plan[key] = auto_batch_size(peak.bytes, free_memory(device))
            plan["per_image_bytes"] = peak.bytes
        out.update(zip(chunk, images))
        if on_batch is not None:
            on_batch(len(chunk))
        i += len(chunk)
    return out


def text_encoders(pipe) -> tuple:
    """The pipeline's text encoders: one, or SDXL's two."""
    second = getattr(pipe, "text_encoder_2", None)
    return (pipe.text_encoder, second) if second is not None else (pipe.text_encoder,)


@torch.no_grad()
def decode_fp32(pipe, latents: torch.Tensor) -> List[Image.Image]:
    """Decode latents with the VAE in fp32, outside autocast; NaN stops with the VAE named."""
    vae = pipe.vae
    with torch.autocast(latents.device.type, enabled=False):
        pixels = vae.decode(latents.to(torch.float32) / vae.config.scaling_factor).sample
    if not torch.isfinite(pixels).all():
        raise LoraLabError("the VAE decoded NaN even in fp32; the LoRA or the base model is broken "
                           "(try a lower strength, or check model.vae)")
    return pipe.image_processor.postprocess(pixels, output_type="pil")


def render(pipe, lora_files: Sequence[Tuple[int, Path, Dict[str, torch.Tensor], Dict[str, str]]],
           strengths: Sequence[float], prompts: Sequence[Prompt], settings: RenderSettings,
           out_dir: Path, progress: bool = True, timing: Optional[dict] = None,
           base_renders: Optional[dict] = None, plan: Optional[dict] = None) -> List[Cell]:
    """Render every cell: all strengths, prompts and seeds of as many LoRA files (epochs) as a
    batch holds, loaded side by side, each image of a batch at its own strength from its own
    file; the base model's images (strength 0) once, in the first batches.

    Args:
        pipe: The loaded base pipeline (its scheduler is replaced by the chosen sampler).
        lora_files: (epoch, path, tensors, metadata) per LoRA file, in X-axis order.
        strengths: Y-axis values; 0 renders the base model.
        prompts: The suite's prompts.
        settings: Sampler, steps, CFG, size, seeds, negative prompt, batch size (None: auto).
        out_dir: Cell images go to ``out_dir/cells/``.
        timing: Filled with render_s, attach_s (placing the first file's weights on the
            layers), switch_s (the later files, and stacking a batch's files per layer), png_s (writing
            the PNG files, inside render_s), images and batch_size.
        base_renders: A worker's memory of base-model images (same prompt and settings give
            the same pixels), shared by its trials.
        plan: A worker's memory of the chosen batch size.

    Returns:
        One Cell per (epoch, strength, prompt, seed).
    """
    timing = {} if timing is None else timing
    plan = {} if plan is None else plan
    if settings.batch_size:
        plan[_plan_key(settings, pipe.unet)] = settings.batch_size
    pipe.scheduler = make_scheduler(settings.sampler, dict(pipe.scheduler.config))
    unet, text_encoder = pipe.unet, text_encoders(pipe)
    settings = dataclasses.replace(settings, noise_device=unet.device.type)  # what the infotext says
    lora_strengths = [float(s) for s in strengths if s != 0]
    total = len(prompts) * (1 + len(lora_files) * len(lora_strengths)) * len(settings.seeds)
    bar = tqdm(total=total, desc="rendering", unit="img", disable=not progress, mininterval=1.0)
    cells: List[Cell] = []
    timing.update(switch_s=0.0, attach_s=0.0, png_s=0.0)
    attached = False
    started = time.perf_counter()
    rendered = 0
    key = (tuple(p.text for p in prompts), settings.negative_prompt, settings.sampler, settings.steps,
           settings.cfg_scale, settings.size, settings.clip_skip, tuple(settings.seeds))
    base_paths = {(p.index, seed): out_dir / "cells" / "base" / f"p{p.index:02d}_seed{seed}.png"
                  for p in prompts for seed in settings.seeds}
    base_jobs = [(p, seed, 0.0) for p in prompts for seed in settings.seeds]
    known = base_renders.get(key) if base_renders is not None else None
    need_base, base_rendered = True, False
    if known and all(Path(src).exists() for src in known.values()):
        # The base model's images for the same prompts and settings, rendered earlier by this
        # worker (another trial): the same pixels, so copy instead of rendering again.
        for k, dst in base_paths.items():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(known[k], dst)
        bar.update(len(base_paths))
        need_base = False

    def save(images: Dict[Job, Image.Image], label: Optional[str], meta: dict) -> None:
        t = time.perf_counter()
        for (prompt, seed, strength), image in images.items():
            if strength == 0:
                save_png(image, base_paths[(prompt.index, seed)], infotext(prompt.text, settings, seed, None, 0.0, None))
            else:
                path = out_dir / "cells" / label / f"s{strength:g}" / f"p{prompt.index:02d}_seed{seed}.png"
                save_png(image, path, infotext(prompt.text, settings, seed, label, strength,
                                                meta.get("sshs_model_hash")))
        timing["png_s"] += time.perf_counter() - t

    try:
        if need_base and not lora_files:
            with lora_io.adapters_disabled(unet, text_encoder):  # the base model, even mid-training
                save(generate(pipe, base_jobs, settings, on_batch=bar.update, plan=plan), None, {})
            rendered += len(base_jobs)
            need_base, base_rendered = False, True
        per_file = len(lora_strengths) * len(prompts) * len(settings.seeds)
        done = 0
        while done < len(lora_files):
            # As many epochs side by side as one batch holds (one until the batch size is known).
            batch = plan.get(_plan_key(settings, unet))
            group = lora_files[done : done + (max(1, batch // max(per_file, 1)) if batch else 1)]
            group = _within_stack_budget(group)
            adapters = [lora_io.eval_adapter(j) for j in range(len(group))]
            jobs, labels, placed = [], {}, []
            try:
                for adapter, (epoch, lora_path, tensors, meta) in zip(adapters, group):
                    switch = time.perf_counter()
                    placed.append(kohya_io.placed_layers(unet, text_encoder, tensors, source=str(lora_path)))
                    # The first file of a trial counts as attaching, later ones as switching epochs.
                    timing["switch_s" if attached else "attach_s"] += time.perf_counter() - switch
                    attached = True
                    labels[adapter] = (label_of(lora_path, meta), meta)
                    jobs += [(p, seed, s, adapter) for s in lora_strengths for p in prompts for seed in settings.seeds]
                if need_base:
                    jobs = [(p, seed, 0.0, adapters[0]) for p, seed, _ in base_jobs] + jobs
                switch = time.perf_counter()
                # the files stacked per layer on the model's own layers; no peft adapter is added
                with SampleStrengths(unet, text_encoder, adapters, files=placed) as per_sample:
                    timing["switch_s"] += time.perf_counter() - switch
                    images = generate(pipe, jobs, settings, per_sample, on_batch=bar.update, plan=plan)
            except LoraLabError:
                raise
            except Exception as exc:
                exc.add_note(f"while rendering {', '.join(str(f[1]) for f in group)}")
                raise
            for adapter in adapters:
                label, meta = labels[adapter]
                save({job[:3]: im for job, im in images.items() if job[3] == adapter}, label, meta)
            rendered += len(jobs)
            base_rendered = base_rendered or need_base
            need_base = False
            for epoch, lora_path, _, meta in group:
                label = label_of(lora_path, meta)
                for strength in [float(s) for s in strengths]:
                    if strength == 0:
                        cells += [Cell(epoch, label, 0.0, p, seed, base_paths[(p.index, seed)], lora_path)
                                  for p in prompts for seed in settings.seeds]
                    else:
                        cells += [Cell(epoch, label, strength, p, seed,
                                       out_dir / "cells" / label / f"s{strength:g}" / f"p{p.index:02d}_seed{seed}.png",
                                       lora_path) for p in prompts for seed in settings.seeds]
            done += len(group)
    finally:
        lora_io.unload_all(unet, text_encoder)
        bar.close()
    if base_renders is not None and base_rendered:
        base_renders[key] = dict(base_paths)
    timing["render_s"] = time.perf_counter() - started
    timing["images"] = rendered
    timing["batch_size"] = plan.get(_plan_key(settings, unet))
    return cells
