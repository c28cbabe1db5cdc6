"""Typed configuration (:mod:`lora_lab.config.schema`), its evaluation and sweep parts, and the
shared checks. Every public name is importable from here: ``from lora_lab.config import Config``."""

from lora_lab.config.evaluation import (  # noqa: F401
    ADHERENCE,
    SAMPLERS,
    ClipScorerConfig,
    EvalConfig,
    FaceScorerConfig,
    JudgeConfig,
    VqaScorerConfig,
)
from lora_lab.config.schema import (  # noqa: F401
    BUILTIN_DATA,
    BUILTIN_MODELS,
    PREDICTION_TYPES,
    PRESETS,
    Config,
    DataConfig,
    ModelConfig,
    as_dict,
    conf_dir,
    explicit_keys,
    register,
    to_config,
    to_yaml,
)
from lora_lab.config.sweep import (  # noqa: F401
    OBJECTIVES,
    PRUNERS,
    SWEEP_SAMPLERS,
    PruneEvalConfig,
    SweepConfig,
)
from lora_lab.config.training import (  # noqa: F401
    ADAPTIVE_OPTIMIZERS,
    LR_SCHEDULERS,
    MIXED_PRECISION,
    OPTIMIZERS,
    TrainConfig,
)
from lora_lab.errors import ConfigError  # noqa: F401
