"""Typed configuration: one dataclass per concern, validated once at the entry point.

Hydra composes YAML from ``conf/`` on top of these schemas; :func:`to_config` turns the
resulting ``DictConfig`` into plain dataclasses (running every ``__post_init__`` check), so
inner code never sees a ``DictConfig``. No torch import here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from lora_lab import plugins
from lora_lab.config_checks import _choice, _positive, _require
from lora_lab.config_eval import (
    _NOT_SWEEPABLE, OBJECTIVES, PRUNERS, SAMPLERS, SWEEP_SAMPLERS, ClipScorerConfig, EvalConfig,
    FaceScorerConfig, JudgeConfig, PruneEvalConfig, SweepConfig,
)
from lora_lab.errors import ConfigError

# The evaluation and sweep schemas live in config_eval; importers find them here too.
_REEXPORTED = (_NOT_SWEEPABLE, OBJECTIVES, PRUNERS, SAMPLERS, SWEEP_SAMPLERS, ClipScorerConfig, EvalConfig,
               FaceScorerConfig, JudgeConfig, PruneEvalConfig, SweepConfig)

log = logging.getLogger(__name__)

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
PRESETS = ("sd15", "sd21", "sd21_base", "sdxl")
# Made by lora_lab itself; packages register more (lora_lab.plugins: the toy world's).
_EXPLICIT: set = set()  # config keys the command line (or the composing caller) set


def set_explicit_keys(overrides) -> None:
    """Remember which keys the command line set (``train.batch_size=4`` -> ``train.batch_size``):
    a file's own settings (a kohya dataset_config.toml) give way to them."""
    _EXPLICIT.clear()
    for item in overrides:
        key = str(item).split("=", 1)[0].lstrip("+~")
        if key:
            _EXPLICIT.add(key)


def explicit_keys() -> set:
    return set(_EXPLICIT)


BUILTIN_MODELS = ("tiny", "tiny-sdxl", "bench", "sd15-random")
BUILTIN_DATA = ("demo",)
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class ModelConfig:
    """Which base model to train on.

    Attributes:
        name: Short name recorded in LoRA metadata (``ss_sd_model_name``) and reports.
        pretrained: A hub id (``org/name``), a local diffusers folder, or a single-file
            ``.safetensors`` checkpoint (the files A1111 users have). Pickle files are refused.
        builtin: ``tiny`` builds a small SD-shaped model in code (saved to the cache folder
            and loaded back like any local folder); ``bench`` a larger one for benchmarks;
            or a name a package registers (lora_lab.plugins), e.g. ``toyworld``.
            Ignored when ``pretrained`` is set.
        preset: Architecture of a single-file checkpoint: sd15, sd21 (v-prediction, 768 px),
            sd21_base (epsilon, 512 px) or sdxl (SDXL base 1.0 and its derivatives: Pony,
            Illustrious, Juggernaut ...). Its config files ship with lora_lab; a single file
            of another architecture is refused.
        config_dir: A local diffusers-style folder to use instead of ``preset`` for a
            single-file checkpoint.
        prediction_type: Override the scheduler's prediction type (epsilon, v_prediction).
        resolution: The model's native resolution, used when ``train.resolution`` is unset.
        base_version: Written as ``ss_base_model_version`` (sd_v1, sd_v2, sd_v2_768_v,
            sdxl_base_v1-0 ...).
        vae: Another VAE to use instead of the model's own: a diffusers folder, a hub id or a
            single ``.safetensors`` file (e.g. an fp16-safe SDXL VAE). SDXL's own VAE overflows
            in fp16, so it always runs in fp32; a VAE whose config says ``force_upcast: false``
            runs in the run's mixed precision.
    """

    name: str = "tiny"
    pretrained: Optional[str] = None
    builtin: Optional[str] = "tiny"
    preset: Optional[str] = None
    config_dir: Optional[str] = None
    prediction_type: Optional[str] = None
    resolution: int = 64
    base_version: str = "sd_v1"
    vae: Optional[str] = None

    def __post_init__(self) -> None:
        _require(
            bool(self.pretrained) or bool(self.builtin),
            "model.pretrained",
            "no base model given; set model.pretrained to a hub id, a diffusers folder or a "
            ".safetensors file, or use model=tiny",
        )
        if self.builtin and not self.pretrained:
            _choice(self.builtin, "model.builtin", BUILTIN_MODELS + plugins.names("model"))
        if self.preset is not None:
            _choice(self.preset, "model.preset", PRESETS)
        if self.prediction_type is not None:
            _choice(self.prediction_type, "model.prediction_type", PREDICTION_TYPES)
        _positive(self.resolution, "model.resolution")


@dataclass
class DataConfig:
    """Where the training images and captions are.

    Attributes:
        path: A kohya parent folder (``<path>/<repeats>_<token>/`` with images and same-stem
            caption files), a folder with a diffusers ``metadata.jsonl``, or a kohya
            ``dataset_config.toml`` file.
        builtin: ``demo`` generates a small face data set offline, or a name a package
            registers (lora_lab.plugins), e.g. ``toyworld`` (ignored when path is set).
        subject: Which subject a registered data set draws (``toyworld``: a file in
            ``lora_lab/toyworld/subjects/``); null for its default.
        token: The trigger word (``anantn``); evaluation prompts use it. Defaults to the
            class tokens of the first kohya folder.
        caption_column: Caption field of ``metadata.jsonl`` lines.
        caption_extension: Caption file suffix in kohya folders.
        repeats: Overrides every subset's repeats (the sweep grid uses this).
        reg_path: A kohya folder of regularization images (``<repeats>_<class>/``).
        prior_loss_weight: Loss weight of regularization images (kohya's meaning).
        shuffle_caption: Shuffle comma-separated tags each step (text embeddings are then
            computed per step, not cached).
        keep_tokens: With shuffle_caption, keep the first N tags in place.
        keep_tokens_separator: Instead of keep_tokens: tags before this separator stay in
            front (and those after a second one at the end), kohya's ``|||``.
        caption_dropout_rate: Share of steps an image trains with an empty caption.
        caption_tag_dropout_rate: Share of (movable) tags dropped each step.
        caption_prefix / caption_suffix: Text put before / after every caption read.
        flip_aug: Mirror each image left-right on half the steps (not for asymmetric subjects).
        enable_bucket: Aspect-ratio buckets (kohya's meaning; :mod:`lora_lab.buckets`): off,
            every image is centre-cropped to a square.
        min_bucket_reso / max_bucket_reso / bucket_reso_steps: The buckets' sides (null: half
            and twice the resolution, in steps of an eighth of it: kohya's 256 / 1024 / 64 at 512).
        bucket_no_upscale: Never enlarge an image; small ones train at their own size.
        doctor: Check the set (:mod:`lora_lab.doctor`) before training and show it in the report.
        validation_split: Fraction of the training images held out for the validation loss
            (kohya's ``validation_split``; 0: none). Chosen by ``validation_seed``.
        validation_seed: Seed of the held-out choice and of the validation noise.
    """

    path: Optional[str] = None
    builtin: Optional[str] = "demo"
    subject: Optional[str] = None
    token: Optional[str] = None
    caption_column: str = "text"
    caption_extension: str = ".txt"
    repeats: Optional[int] = None
    reg_path: Optional[str] = None
    prior_loss_weight: float = 1.0
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    caption_prefix: str = ""
    caption_suffix: str = ""
    flip_aug: bool = False
    enable_bucket: bool = True
    min_bucket_reso: Optional[int] = None
    max_bucket_reso: Optional[int] = None
    bucket_reso_steps: Optional[int] = None
    bucket_no_upscale: bool = False
    doctor: bool = True
    validation_split: float = 0.0
    validation_seed: int = 0

    def __post_init__(self) -> None:
        _require(
            bool(self.path) or bool(self.builtin),
            "data.path",
            "no training data given; set data.path to a kohya folder, a folder with "
            "metadata.jsonl, or a dataset_config.toml (or use data=demo)",
        )
        if self.builtin and not self.path:
            _choice(self.builtin, "data.builtin", BUILTIN_DATA + plugins.names("data"))
        if self.repeats is not None:
            _require(
                isinstance(self.repeats, int) and self.repeats >= 1,
                "data.repeats",
                f"must be a whole number >= 1, got {self.repeats!r}",
            )
        _positive(self.prior_loss_weight, "data.prior_loss_weight", allow_zero=True)
        _require(self.keep_tokens >= 0, "data.keep_tokens", "must be >= 0")
        for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            value = getattr(self, key)
            _require(isinstance(value, (int, float)) and 0 <= value < 1, f"data.{key}",
                     f"must be a fraction in [0, 1), got {value!r}")
        for key in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
            value = getattr(self, key)
            _require(value is None or (isinstance(value, int) and value >= 8 and value % 8 == 0), f"data.{key}",
                     f"must be a multiple of 8 (pixels), or null for the default; got {value!r}")
        if self.min_bucket_reso and self.max_bucket_reso:
            _require(self.min_bucket_reso <= self.max_bucket_reso, "data.min_bucket_reso",
                     f"{self.min_bucket_reso} is above data.max_bucket_reso {self.max_bucket_reso}")
        _require(0 <= self.validation_split < 1, "data.validation_split",
                 f"must be a fraction in [0, 1), got {self.validation_split!r}")
        _require(
            self.caption_extension.startswith("."),
            "data.caption_extension",
            f"must start with a dot, like '.txt', got {self.caption_extension!r}",
        )


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
    ``cache_latents`` / ``cache_text_embeddings`` (kohya: cache_latents,
    cache_text_encoder_outputs) encode each image and caption once, on disk, by content; off,
    the VAE and text encoder run every step (what a plain diffusers script does).
    """

    network_dim: int = 8
    network_alpha: float = 1.0
    conv_dim: int = 0
    conv_alpha: float = 1.0
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
            _require(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"train.{key}",
                f"must be a whole number >= 1, got {value!r}",
            )
        _positive(self.network_alpha, "train.network_alpha")
        _require(
            isinstance(self.conv_dim, int) and self.conv_dim >= 0,
            "train.conv_dim",
            f"must be a whole number >= 0 (0 = no conv LoRA), got {self.conv_dim!r}",
        )
        _positive(self.conv_alpha, "train.conv_alpha")
        _positive(self.learning_rate, "train.learning_rate")
        if self.unet_lr is not None:
            _positive(self.unet_lr, "train.unet_lr")
        if self.text_encoder_lr is not None:
            _positive(self.text_encoder_lr, "train.text_encoder_lr", allow_zero=True)
        if self.text_encoder_2_lr is not None:
            _positive(self.text_encoder_2_lr, "train.text_encoder_2_lr", allow_zero=True)
        _choice(self.lr_scheduler, "train.lr_scheduler", LR_SCHEDULERS)
        _choice(self.optimizer, "train.optimizer", OPTIMIZERS)
        _choice(self.mixed_precision, "train.mixed_precision", MIXED_PRECISION)
        _positive(self.lr_warmup_steps, "train.lr_warmup_steps", allow_zero=True)
        _positive(self.lr_scheduler_power, "train.lr_scheduler_power")
        _positive(self.max_grad_norm, "train.max_grad_norm", allow_zero=True)
        _positive(self.noise_offset, "train.noise_offset", allow_zero=True)
        if self.min_snr_gamma is not None:
            _positive(self.min_snr_gamma, "train.min_snr_gamma")
        if self.resolution is not None:
            _require(
                isinstance(self.resolution, int) and self.resolution >= 8 and self.resolution % 8 == 0,
                "train.resolution",
                f"must be a multiple of 8, got {self.resolution!r}",
            )
        _require(
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


@dataclass
class Config:
    """The whole run: model, data, training, evaluation and where outputs go.

    Attributes:
        output_dir: Run folder: ``config.yaml``, ``lora/``, ``tb/``.
        cache_dir: Shared cache of built-in models, latents and text embeddings.
        lora_dir: A folder of LoRA files to evaluate (``python -m lora_lab.evaluate``).
        worker: Index of a sweep worker started by a launcher (``worker=range(8)`` with ``-m``);
            it only labels the worker, every worker runs the same study.
        device: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "sweeps/runs/default"
    cache_dir: str = "sweeps/.cache"
    device: str = "auto"
    lora_dir: Optional[str] = None
    sweep: Optional[SweepConfig] = None
    worker: Optional[int] = None

    def __post_init__(self) -> None:
        _require(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            "device",
            f"unknown value {self.device!r}; allowed: auto, cpu, cuda, cuda:N",
        )

    @property
    def resolution(self) -> int:
        return self.train.resolution or self.model.resolution


def register() -> None:
    """Register the schema with Hydra's ConfigStore as ``base_config``."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=Config)


def to_config(cfg: DictConfig | dict) -> Config:
    """Validate a composed config and return plain dataclasses.

    Raises:
        ConfigError: naming the key and what is allowed.
    """
    from omegaconf.errors import OmegaConfBaseException

    try:
        node = OmegaConf.merge(OmegaConf.structured(Config), cfg)
        obj = OmegaConf.to_object(node)
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, ConfigError) else None
        if cause is not None:
            raise cause from None
        raise ConfigError(_omegaconf_message(exc)) from None
    return obj


def _omegaconf_message(exc: Exception) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    first = str(exc).splitlines()[0]
    return f"{key}: {first}" if key else first


def to_yaml(config: Config) -> str:
    """The resolved config as YAML (written beside every run)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def conf_dir() -> Path:
    """The top-level ``conf/`` folder of this checkout."""
    return Path(__file__).resolve().parent.parent / "conf"
