"""Typed configuration: one dataclass per concern, validated once at the entry point.

Hydra composes YAML from ``conf/`` on top of these schemas; :func:`to_config` turns the
resulting ``DictConfig`` into plain dataclasses (running every ``__post_init__`` check), so
inner code never sees a ``DictConfig``. No torch import here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from lora_lab import plugins
from lora_lab.config.checks import choice, positive, require
from lora_lab.config.evaluation import EvalConfig
from lora_lab.config.sweep import SweepConfig
from lora_lab.config.training import TrainConfig
from lora_lab.errors import ConfigError

log = logging.getLogger(__name__)

PRESETS = ("sd15", "sd21", "sd21_base", "sdxl")
# Made by lora_lab itself; packages register more (lora_lab.plugins: the toy world's).


def explicit_keys(overrides) -> List[str]:
    """The keys a command line sets (``train.batch_size=4`` -> ``train.batch_size``), sorted."""
    keys = {str(item).split("=", 1)[0].lstrip("+~") for item in overrides}
    return sorted(key for key in keys if key)


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
        require(
            bool(self.pretrained) or bool(self.builtin),
            "model.pretrained",
            "no base model given; set model.pretrained to a hub id, a diffusers folder or a "
            ".safetensors file, or use model=tiny",
        )
        if self.builtin and not self.pretrained:
            choice(self.builtin, "model.builtin", BUILTIN_MODELS + plugins.names("model"))
        if self.preset is not None:
            choice(self.preset, "model.preset", PRESETS)
        if self.prediction_type is not None:
            choice(self.prediction_type, "model.prediction_type", PREDICTION_TYPES)
        positive(self.resolution, "model.resolution")


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
        require(
            bool(self.path) or bool(self.builtin),
            "data.path",
            "no training data given; set data.path to a kohya folder, a folder with "
            "metadata.jsonl, or a dataset_config.toml (or use data=demo)",
        )
        if self.builtin and not self.path:
            choice(self.builtin, "data.builtin", BUILTIN_DATA + plugins.names("data"))
        if self.repeats is not None:
            require(
                isinstance(self.repeats, int) and self.repeats >= 1,
                "data.repeats",
                f"must be a whole number >= 1, got {self.repeats!r}",
            )
        positive(self.prior_loss_weight, "data.prior_loss_weight", allow_zero=True)
        require(self.keep_tokens >= 0, "data.keep_tokens", "must be >= 0")
        for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            value = getattr(self, key)
            require(isinstance(value, (int, float)) and 0 <= value < 1, f"data.{key}",
                     f"must be a fraction in [0, 1), got {value!r}")
        for key in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
            value = getattr(self, key)
            require(value is None or (isinstance(value, int) and value >= 8 and value % 8 == 0), f"data.{key}",
                     f"must be a multiple of 8 (pixels), or null for the default; got {value!r}")
        if self.min_bucket_reso and self.max_bucket_reso:
            require(self.min_bucket_reso <= self.max_bucket_reso, "data.min_bucket_reso",
                     f"{self.min_bucket_reso} is above data.max_bucket_reso {self.max_bucket_reso}")
        require(0 <= self.validation_split < 1, "data.validation_split",
                 f"must be a fraction in [0, 1), got {self.validation_split!r}")
        require(
            self.caption_extension.startswith("."),
            "data.caption_extension",
            f"must start with a dot, like '.txt', got {self.caption_extension!r}",
        )


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
        explicit: The keys the command line set (``data.shuffle_caption``); a file's own settings
            (a kohya dataset_config.toml) give way to them. Filled by :func:`to_config`, not
            written to ``config.yaml``.
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
    explicit: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        require(
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


def to_config(cfg: DictConfig | dict, explicit: Sequence[str] = ()) -> Config:
    """Validate a composed config and return plain dataclasses.

    Args:
        cfg: The composed config.
        explicit: The keys the command line set (:func:`explicit_keys`), kept as ``Config.explicit``.

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
    obj.explicit = list(explicit)
    return obj


def _omegaconf_message(exc: Exception) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    first = str(exc).splitlines()[0]
    return f"{key}: {first}" if key else first


def to_yaml(config: Config) -> str:
    """The resolved config as YAML (written beside every run)."""
    return OmegaConf.to_yaml(as_dict(config))


def as_dict(config: Config) -> dict:
    """The config's keys and values, without the command line's bookkeeping (``explicit``)."""
    out = OmegaConf.to_container(OmegaConf.structured(config))
    out.pop("explicit", None)
    return out


def conf_dir() -> Path:
    """The top-level ``conf/`` folder of this checkout."""
    return Path(__file__).resolve().parents[2] / "conf"
