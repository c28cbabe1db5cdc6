"""The pretraining's shared parts: the plan (steps, batches, rates of each stage), batches drawn
from generators seeded by (seed, stage, step) so a resumed stage sees the batches an unbroken
one would, and one resumable training loop with checkpoints and an EMA."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

import torch

from lora_lab.files import atomic_write_bytes
from lora_lab.toyworld import nets, world

log = logging.getLogger("lora_lab.toyworld.pretrain")

TEXT_TOKENS = 48  # captions of the world fit in 48 tokens; the causal mask makes a shorter run exact


@dataclass(frozen=True)
class Plan:
    seed: int = 0
    vae_steps: int = 2500
    vae_batch: int = 64
    vae_lr: float = 1e-3
    clip_steps: int = 4500
    clip_batch: int = 64
    clip_lr: float = 1e-3
    clip_negatives: int = 6
    readout_steps: int = 4000
    readout_batch: int = 64
    readout_lr: float = 2e-3
    unet_steps: int = 10000
    unet_batch: int = 32
    unet_lr: float = 4e-4
    unet_uncond: float = 0.1
    ema: float = 0.999
    every: int = 250


SMOKE = Plan(vae_steps=3, vae_batch=4, clip_steps=3, clip_batch=4, clip_negatives=2, readout_steps=3, readout_batch=4,
             unet_steps=4, unet_batch=4, every=2)


def stage_rng(plan: Plan, stage: str, step: int) -> random.Random:
    return random.Random(f"{plan.seed}/{stage}/{step}")


def stage_gen(plan: Plan, stage: str, step: int) -> torch.Generator:
    digest = hashlib.sha256(f"{plan.seed}/{stage}/{step}/torch".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def draw_records(rng: random.Random, n: int) -> List[world.Attributes]:
    return [world.sample(rng) for _ in range(n)]


def draw_pixels(records) -> torch.Tensor:
    return nets.to_tensor([world.draw(a, nets.RESOLUTION) for a in records])


def lr_at(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_stage(stage: str, work: Path, model: torch.nn.Module, steps: int, lr: float, loss_fn: Callable,
           every: int, ema_decay: float = 0.0) -> Dict[str, torch.Tensor]:
    """Run one stage from its checkpoint; returns the final (EMA where kept) state dict."""
    from tqdm import tqdm

    ckpt = work / f"{stage}.ckpt.pt"
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()} if ema_decay else None
    start, losses = 0, []
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        ema = state.get("ema") or ema
        start, losses = state["step"], state["losses"]
        log.info("%s: resuming at step %d of %d", stage, start, steps)
    model.train()
    bar = tqdm(range(start, steps), desc=stage, initial=start, total=steps, leave=False, file=sys.stderr)
    recent: List[float] = []
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        loss = loss_fn(step)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{stage}: loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    if v.dtype.is_floating_point:
                        ema[k].mul_(ema_decay).add_(v.detach(), alpha=1 - ema_decay)
                    else:
                        ema[k].copy_(v)
        recent.append(loss.item())
        if (step + 1) % every == 0 or step + 1 == steps:
            losses.append([step + 1, sum(recent) / len(recent)])
            bar.set_postfix(loss=f"{losses[-1][1]:.4f}")
            log.info("%s: step %d/%d loss %.4f", stage, step + 1, steps, losses[-1][1])
            recent = []
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema, "step": step + 1,
                        "losses": losses}, buf)
            atomic_write_bytes(ckpt, buf.getvalue())
    model.eval()
    (work / f"{stage}.losses.json").write_text(json.dumps(losses), encoding="utf-8")
    return ema if ema is not None else model.state_dict()


def save_state(state: Dict[str, torch.Tensor], path: Path, half: bool = True) -> None:
    from safetensors.torch import save

    tensors = {k: (v.half() if half and v.dtype == torch.float32 else v).contiguous() for k, v in state.items()}
    atomic_write_bytes(path, save(tensors))


def load_state(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.float() if v.dtype == torch.float16 else v for k, v in load_file(str(path)).items()}
