"""The optimizer of a run by its kohya name, the warm-up length, and the check that this
machine can run the run's settings (a CUDA-only optimizer or precision on a CPU is refused)."""

from __future__ import annotations

from typing import List

import torch

from lora_lab.config import TrainConfig
from lora_lab.errors import TrainingError


def check_environment(cfg: TrainConfig, device: torch.device) -> None:
    """Refuse settings this machine cannot run, before any data or model is touched."""
    if cfg.mixed_precision != "no" and device.type != "cuda":
        raise TrainingError(
            f"train.mixed_precision={cfg.mixed_precision} needs a CUDA GPU, but this run is on "
            f"{device.type}; use train.mixed_precision=no on a CPU"
        )
    if cfg.mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainingError("train.mixed_precision=bf16: this GPU has no bf16 support; use fp16")
    optimizer_class(cfg.optimizer, device)


def optimizer_class(name: str, device: torch.device):
    if name == "adamw":
        return torch.optim.AdamW
    if name == "adamw8bit":
        if device.type != "cuda":
            raise TrainingError(
                "train.optimizer=adamw8bit (bitsandbytes) needs a CUDA GPU; use train.optimizer=adamw on a CPU"
            )
        module, attr, package = "bitsandbytes.optim", "AdamW8bit", "bitsandbytes"
    elif name == "adafactor":
        module, attr, package = "transformers.optimization", "Adafactor", "transformers"
    elif name == "prodigy":
        module, attr, package = "prodigyopt", "Prodigy", "prodigyopt"
    elif name == "dadaptation":
        module, attr, package = "dadaptation", "DAdaptAdam", "dadaptation"
    elif name == "lion":
        module, attr, package = "lion_pytorch", "Lion", "lion-pytorch"
    else:  # config validation already refused it
        raise TrainingError(f"train.optimizer: unknown value {name!r}")
    import importlib

    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError:
        raise TrainingError(
            f"train.optimizer={name} needs the package {package}: pip install {package}"
        ) from None


def make_optimizer(cfg: TrainConfig, groups: List[dict], device: torch.device) -> torch.optim.Optimizer:
    cls = optimizer_class(cfg.optimizer, device)
    args = {**optimizer_kwargs(cfg), **_fused(cfg, groups, device)}
    try:
        return cls(groups, lr=groups[0]["lr"], **args)
    except TypeError as exc:
        raise TrainingError(f"train.optimizer_args for {cfg.optimizer}: {exc}") from None


def _fused(cfg: TrainConfig, groups: List[dict], device: torch.device) -> dict:
    """torch's fused AdamW (one kernel for every tensor) where it runs: on a CPU or a CUDA GPU,
    every trained tensor a float on that device, and the user chose no implementation
    (``foreach`` / ``fused`` in optimizer_args). torch's default on a CPU is one tensor at a
    time: about 9 ms a step for a LoRA's 200-odd tensors on 2 cores, against 3 ms fused. The
    update is AdamW's either way; the arithmetic's order differs in the last bits."""
    if cfg.optimizer != "adamw" or {"fused", "foreach"} & set(cfg.optimizer_args):
        return {}
    params = [p for g in groups for p in g["params"]]
    ok = device.type in ("cpu", "cuda") and all(
        p.device.type == device.type and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)
    return {"fused": True} if ok else {}


def optimizer_kwargs(cfg: TrainConfig) -> dict:
    """The optimizer's arguments besides the learning rate: the user's, over our defaults."""
    args = dict(cfg.optimizer_args)
    if cfg.optimizer == "adafactor":
        # A fixed learning rate, as kohya recommends for LoRA: no relative step or scaling.
        args = {"scale_parameter": False, "relative_step": False, "warmup_init": False, **args}
    return args


def warmup_steps(cfg: TrainConfig, steps: int) -> int:
    return int(cfg.lr_warmup_steps * steps) if cfg.lr_warmup_steps < 1 else int(cfg.lr_warmup_steps)
