"""Validation loss on held-out images, as kohya sd-scripts' validation split computes it.

The same images, timesteps and noise every epoch (fixed by ``data.validation_seed``), so the
number moves only because the LoRA changed. Peers offer it to pick an epoch; ``bench truth``
measures how often its pick is the right one.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F

from lora_lab import cache
from lora_lab.data import Sample

# Timesteps across the schedule, as fractions of num_train_timesteps (kohya samples a fixed set).
TIMESTEP_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)


class ValidationLoss:
    """Fixed noised latents of the held-out images; :meth:`__call__` gives the mean loss."""

    def __init__(self, samples: List[Sample], latent_params: Dict[str, torch.Tensor], base, seed: int):
        scheduler = base.noise_scheduler
        vae = base.vae
        steps = scheduler.config.num_train_timesteps
        generator = torch.Generator().manual_seed(seed)
        scaling = vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents, noise, timesteps, captions = [], [], [], []
        for s in samples:
            mean = latent_params[s.id].chunk(2, dim=0)[0]  # the posterior mean: no sampling noise
            for frac in TIMESTEP_FRACTIONS:
                latents.append((mean - shift) * scaling)
                noise.append(torch.randn(mean.shape, generator=generator))
                timesteps.append(int(frac * (steps - 1)))
                captions.append(s.caption)
        device = base.device
        self.latents = torch.stack(latents).to(device)
        self.noise = torch.stack(noise).to(device)
        self.timesteps = torch.tensor(timesteps, device=device)
        self.noisy = scheduler.add_noise(self.latents, self.noise, self.timesteps)
        self.target = scheduler.get_velocity(self.latents, self.noise, self.timesteps) \
            if base.prediction_type == "v_prediction" else self.noise
        self.captions = captions
        self.base = base

    @torch.no_grad()
    def __call__(self, clip_skip: int, batch_size: int = 16) -> float:
        b = self.base
        was_training = b.unet.training, b.text_encoder.training
        b.unet.eval()
        b.text_encoder.eval()
        total, n = 0.0, 0
        try:
            for i in range(0, len(self.captions), batch_size):
                hidden = cache.encode_text(self.captions[i : i + batch_size], b.tokenizer, b.text_encoder, clip_skip)
                pred = b.unet(self.noisy[i : i + batch_size], self.timesteps[i : i + batch_size],
                              hidden.to(b.unet.dtype)).sample
                loss = F.mse_loss(pred.float(), self.target[i : i + batch_size].float(), reduction="sum")
                total += loss.item()
                n += pred.numel()
        finally:
            b.unet.train(was_training[0])
            b.text_encoder.train(was_training[1])
        return total / n
