"""Every YAML under conf/ composes against the schema; bad values get one clear error."""

from __future__ import annotations

import pytest

from lora_lab.cli import compose
from lora_lab.config import conf_dir
from lora_lab.errors import ConfigError

GROUPS = ("model", "data", "train", "eval")


def _options(group: str):
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if group == "model" and option != "tiny":
        overrides.append("model.pretrained=/models/x.safetensors")
    if group == "data" and option != "demo":
        overrides.append("data.path=/data/x")
    cfg = compose(overrides)
    assert cfg.train.network_dim >= 1
    if group == "model":
        assert cfg.model.name == option


def test_default_is_the_toy_world_with_its_own_clip():
    cfg = compose()
    assert cfg.model.builtin == "toyworld" and cfg.data.builtin == "toyworld" and cfg.data.subject == "mox"
    assert cfg.data.token is None  # the subject's folder brings it (its suite.yaml)
    assert cfg.resolution == 32 and cfg.eval.suite == "data"
    assert cfg.eval.clip.model == "lora-lab-toyworld-clip" and cfg.eval.clip.pretrained == "toyworld"
    assert compose(["train.epochs=7"]).train.epochs == 7  # the command line still wins


def test_tiny_demo_keeps_cpu_sized_settings():
    cfg = compose(["model=tiny", "data=demo"])
    assert cfg.model.builtin == "tiny" and cfg.data.builtin == "demo"
    assert cfg.resolution == 64 and cfg.train.epochs == 3
    assert cfg.eval.clip.model == "lora-lab-tiny-clip" and cfg.eval.face.pretrained is None


def test_smoke_sweep_runs_on_tiny_unless_told_otherwise():
    cfg = compose(["+sweep=smoke"])
    assert cfg.model.builtin == "tiny" and cfg.data.builtin == "demo" and cfg.sweep.name == "smoke"
    cfg = compose(["+sweep=smoke", "model=toyworld", "data=toyworld"])
    assert cfg.model.builtin == "toyworld" and cfg.data.builtin == "toyworld"


def test_real_models_keep_kohya_defaults_and_real_scorers():
    cfg = compose(["model=sd15", "model.pretrained=/m.safetensors"])
    assert cfg.train.network_alpha == 1 and cfg.train.network_dim == 8  # kohya: scale alpha/dim
    assert cfg.eval.clip.model == "ViT-L-14" and cfg.eval.face.pretrained == "vggface2"
    assert cfg.resolution == 512


def test_sd21_preset_is_v_prediction():
    cfg = compose(["model=sd21", "model.pretrained=/m.safetensors"])
    assert cfg.model.prediction_type == "v_prediction" and cfg.resolution == 768


@pytest.mark.parametrize(
    "override,needle",
    [
        ("train.lr_scheduler=cosine_annealing", "train.lr_scheduler: unknown value 'cosine_annealing'; allowed: constant"),
        ("train.optimizer=sgd", "train.optimizer: unknown value 'sgd'; allowed: adamw, adamw8bit"),
        ("train.network_dim=0", "train.network_dim: must be a whole number >= 1, got 0"),
        ("train.network_dim=-4", "train.network_dim: must be a whole number >= 1, got -4"),
        ("train.network_alpha=0", "train.network_alpha: must be a number > 0"),
        ("train.network_alpha=-1", "train.network_alpha: must be a number > 0"),
        ("train.epochs=0", "train.epochs: must be a whole number >= 1"),
        ("train.mixed_precision=fp8", "train.mixed_precision: unknown value 'fp8'"),
        ("train.resolution=100", "train.resolution: must be a multiple of 8"),
        ("data=folder", "data.path"),
        ("eval.strengths=[0.5,abc]", "eval.strengths"),
        ("device=tpu", "device: unknown value 'tpu'"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as info:
        compose([override])
    assert needle in str(info.value)


def test_missing_model_path_for_real_preset():
    with pytest.raises(ConfigError, match="model.pretrained"):
        compose(["model=sd15"])


def test_adaptive_optimizer_warnings():
    cfg = compose(["train.optimizer=prodigy", "train.learning_rate=1e-4", "train.lr_scheduler=cosine"])
    text = "\n".join(cfg.train.warnings())
    assert "expects train.learning_rate about 1.0" in text
    assert "expects a constant schedule" in text
    assert compose(["train.optimizer=prodigy", "train.learning_rate=1.0", "train.text_encoder_lr=1.0"]).train.warnings() == []
    assert "expects train.text_encoder_lr about 1.0 (got 0.001)" in "\n".join(
        compose(["train.optimizer=prodigy", "train.learning_rate=1.0"]).train.warnings())  # the toy world trains it
    assert compose().train.warnings() == []
