"""Validation loss on held-out images, as kohya sd-scripts' validation split computes it.

The same images, timesteps and noise every epoch (fixed by ``data.validation_seed``), so the
number moves only because the LoRA changed. Peers offer it to pick an epoch; ``bench truth``
measures how often its pick is the right one.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F

from lora_lab.data.buckets import BucketSpec, place
from lora_lab.data.dataset import Sample
from lora_lab.models import sdxl
from lora_lab.train import cache

# Timesteps across the schedule, as fractions of num_train_timesteps (kohya samples a fixed set).
TIMESTEP_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)


class ValidationLoss:
    """Fixed noised latents of the held-out images; :meth:`__call__` gives the mean loss."""

    def __init__(self, samples: List[Sample], latent_params: Dict[str, torch.Tensor], base, seed: int,
                 resolution: int = 0):
        scheduler = base.noise_scheduler
        vae = base.vae
        steps = scheduler.config.num_train_timesteps
        generator = torch.Generator().manual_seed(seed)
        scaling = vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents, noise, timesteps, captions, sizes = [], [], [], [], []
        for s in samples:
            mean = latent_params[(s.id, False)].chunk(2, dim=0)[0]  # the posterior mean: no sampling noise
            for frac in TIMESTEP_FRACTIONS:
                latents.append((mean - shift) * scaling)
                noise.append(torch.randn(mean.shape, generator=generator))
                timesteps.append(int(frac * (steps - 1)))
                captions.append(s.caption)
                sizes.append(s.size)
        device = base.device
        self.latents = torch.stack(latents).to(device)
        self.noise = torch.stack(noise).to(device)
        self.timesteps = torch.tensor(timesteps, device=device)
        self.noisy = scheduler.add_noise(self.latents, self.noise, self.timesteps)
        self.target = scheduler.get_velocity(self.latents, self.noise, self.timesteps) \
            if base.prediction_type == "v_prediction" else self.noise
        self.captions = captions
        self.sizes = sizes
        self.resolution = resolution or self.latents.shape[-1] * 2 ** (len(vae.config.block_out_channels) - 1)
        self.base = base

    @torch.no_grad()
    def __call__(self, clip_skip: int, batch_size: int = 16) -> float:
        b = self.base
        modules = (b.unet, *b.text_encoders)
        was_training = [m.training for m in modules]
        for m in modules:
            m.eval()
        total, n = 0.0, 0
        res = self.resolution
        try:
            for i in range(0, len(self.captions), batch_size):
                hidden, pooled = cache.encode(self.captions[i : i + batch_size], b.tokenizers, b.text_encoders, clip_skip)
                added = None
                if pooled is not None:
                    sizes = self.sizes[i : i + batch_size]
                    added = {"text_embeds": pooled.to(b.unet.dtype), "time_ids": sdxl.time_ids(
                        [(h, w) for w, h in sizes], [place(size, BucketSpec(res)).crop for size in sizes], (res, res),
                        b.device, b.unet.dtype)}
                pred = b.unet(self.noisy[i : i + batch_size], self.timesteps[i : i + batch_size],
                              hidden.to(b.unet.dtype), added_cond_kwargs=added).sample
                loss = F.mse_loss(pred.float(), self.target[i : i + batch_size].float(), reduction="sum")
                total += loss.item()
                n += pred.numel()
        finally:
            for m, was in zip(modules, was_training):
                m.train(was)
        return total / n
