"""Schema of one training run (``train.*``): network, optimizer, schedule, precision and the
tricks kohya users know (min-SNR, noise offset, clip skip ...)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from lora_lab.config.checks import choice, positive, require

LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy", "dadaptation", "lion")
# Optimizers that set their own step size: kohya's docs and the optimizers' authors ask for
# learning_rate ~ 1.0 and a constant schedule.
ADAPTIVE_OPTIMIZERS = ("prodigy", "dadaptation")
MIXED_PRECISION = ("no", "fp16", "bf16")
# lora and locon through peft (kohya's networks.lora files); loha, lokr and dora through
# LyCORIS (its lycoris.kohya files). locon = lora with the ResNet convolutions too.
NETWORK_TYPES = ("lora", "locon", "loha", "lokr", "dora")

@dataclass
class TrainConfig:
    """Training knobs, with kohya sd-scripts' names where they exist.

    ``network_alpha`` has kohya's meaning: the LoRA output is scaled by alpha / dim, and the
    default is 1 (diffusers' scripts use alpha = rank instead, a scale of 1).
    ``text_encoder_lr`` of 0 or null leaves the text encoder untouched (no text-encoder LoRA).
    ``text_encoder_2_lr``: SDXL's second text encoder (OpenCLIP ViT-bigG); null = the rate of
    ``text_encoder_lr``, 0 = not trained.
    ``lr_warmup_steps`` below 1 is a ratio of the total step count.
    ``conv_dim`` > 0 adds LoRA to ResNet and resampling convolutions (kohya's LoCon).
    ``network_type``: lora, locon (lora with ``conv_dim`` = ``network_dim`` when conv_dim is 0),
    loha, lokr or dora, with LyCORIS' meanings; ``factor`` is LoKr's Kronecker split (-1: the
    most balanced one, else a divisor of every trained layer's sizes).
    ``cache_latents`` / ``cache_text_embeddings`` (kohya: cache_latents,
    cache_text_encoder_outputs) encode each image and caption once, on disk, by content; off,
    the VAE and text encoder run every step (what a plain diffusers script does).
    """

    network_type: str = "lora"
    network_dim: int = 8
    network_alpha: float = 1.0
    conv_dim: int = 0
    conv_alpha: float = 1.0
    factor: int = -1
    learning_rate: float = 1e-4
    unet_lr: Optional[float] = None
    text_encoder_lr: Optional[float] = None
    text_encoder_2_lr: Optional[float] = None
    lr_scheduler: str = "constant"
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    lr_warmup_steps: float = 0
    optimizer: str = "adamw"
    optimizer_args: Dict[str, Any] = field(default_factory=dict)
    batch_size: int = 1
    gradient_accumulation: int = 1
    epochs: int = 10
    max_grad_norm: float = 1.0
    resolution: Optional[int] = None
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    noise_offset: float = 0.0
    min_snr_gamma: Optional[float] = None
    clip_skip: int = 1
    seed: int = 42
    save_every_n_epochs: int = 1
    output_name: str = "last"
    cache_latents: bool = True
    cache_text_embeddings: bool = True

    def __post_init__(self) -> None:
        for key in ("network_dim", "epochs", "batch_size", "gradient_accumulation",
                    "save_every_n_epochs", "lr_scheduler_num_cycles", "clip_skip"):
            value = getattr(self, key)
            require(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"train.{key}",
                f"must be a whole number >= 1, got {value!r}",
            )
        choice(self.network_type, "train.network_type", NETWORK_TYPES)
        positive(self.network_alpha, "train.network_alpha")
        require(
            isinstance(self.factor, int) and not isinstance(self.factor, bool) and (self.factor == -1 or self.factor >= 2),
            "train.factor",
            f"must be -1 (LyCORIS' balanced split) or a whole number >= 2, got {self.factor!r}",
        )
        require(
            self.factor == -1 or self.network_type == "lokr",
            "train.factor",
            f"is LoKr's setting; train.network_type={self.network_type} has no factor (leave it at -1)",
        )
        if self.network_type == "locon" and not self.conv_dim:
            self.conv_dim, self.conv_alpha = self.network_dim, self.network_alpha
        require(
            isinstance(self.conv_dim, int) and self.conv_dim >= 0,
            "train.conv_dim",
            f"must be a whole number >= 0 (0 = no conv LoRA), got {self.conv_dim!r}",
        )
        positive(self.conv_alpha, "train.conv_alpha")
        positive(self.learning_rate, "train.learning_rate")
        if self.unet_lr is not None:
            positive(self.unet_lr, "train.unet_lr")
        if self.text_encoder_lr is not None:
            positive(self.text_encoder_lr, "train.text_encoder_lr", allow_zero=True)
        if self.text_encoder_2_lr is not None:
            positive(self.text_encoder_2_lr, "train.text_encoder_2_lr", allow_zero=True)
        choice(self.lr_scheduler, "train.lr_scheduler", LR_SCHEDULERS)
        choice(self.optimizer, "train.optimizer", OPTIMIZERS)
        choice(self.mixed_precision, "train.mixed_precision", MIXED_PRECISION)
        positive(self.lr_warmup_steps, "train.lr_warmup_steps", allow_zero=True)
        positive(self.lr_scheduler_power, "train.lr_scheduler_power")
        positive(self.max_grad_norm, "train.max_grad_norm", allow_zero=True)
        positive(self.noise_offset, "train.noise_offset", allow_zero=True)
        if self.min_snr_gamma is not None:
            positive(self.min_snr_gamma, "train.min_snr_gamma")
        if self.resolution is not None:
            require(
                isinstance(self.resolution, int) and self.resolution >= 8 and self.resolution % 8 == 0,
                "train.resolution",
                f"must be a multiple of 8, got {self.resolution!r}",
            )
        require(
            bool(self.output_name) and all(c.isalnum() or c in "-_." for c in self.output_name),
            "train.output_name",
            f"must be a file name of letters, digits, '-', '_' or '.', got {self.output_name!r}",
        )

    @property
    def trains_text_encoder(self) -> bool:
        return bool(self.text_encoder_lr) or bool(self.text_encoder_2_lr)

    def text_encoder_lr_of(self, index: int) -> float:
        """The learning rate of text encoder ``index`` (0: the first; 1: SDXL's second); 0 = frozen."""
        if index == 1 and self.text_encoder_2_lr is not None:
            return self.text_encoder_2_lr
        return self.text_encoder_lr or 0.0

    @property
    def effective_unet_lr(self) -> float:
        return self.unet_lr if self.unet_lr is not None else self.learning_rate

    def warnings(self) -> List[str]:
        """Combinations that run but fight each other (kohya users hit these)."""
        out = []
        if self.optimizer in ADAPTIVE_OPTIMIZERS:
            lrs = {"learning_rate": self.learning_rate, "unet_lr": self.unet_lr,
                   "text_encoder_lr": self.text_encoder_lr or None}
            for key, value in lrs.items():
                if value is not None and not 0.1 <= value <= 10:
                    out.append(
                        f"train.optimizer={self.optimizer} sets its own step size and expects "
                        f"train.{key} about 1.0 (got {value:g}); training will barely move"
                    )
            if self.lr_scheduler not in ("constant", "constant_with_warmup"):
                out.append(
                    f"train.optimizer={self.optimizer} expects a constant schedule; "
                    f"train.lr_scheduler={self.lr_scheduler} scales its adapted step size"
                )
        if self.optimizer not in ADAPTIVE_OPTIMIZERS and self.effective_unet_lr >= 0.1:
            out.append(
                f"train.unet_lr {self.effective_unet_lr:g} is very high for {self.optimizer}; "
                "LoRA usually trains at 1e-4 (did you mean optimizer=prodigy?)"
            )
        return out
