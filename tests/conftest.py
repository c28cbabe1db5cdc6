"""Shared fixtures: one cache folder (tiny model, demo data) and one loaded tiny base model per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_dir(cache_dir) -> Path:
    from lora_lab.models.builtin import tiny_folder

    return tiny_folder(cache_dir)


@pytest.fixture(scope="session")
def base(cache_dir, tiny_dir):
    import torch

    from lora_lab.config import ModelConfig
    from lora_lab.models.base import load_base

    return load_base(ModelConfig(), cache_dir, torch.device("cpu"))


@pytest.fixture(scope="session")
def demo_dir(cache_dir) -> Path:
    from lora_lab.data.demo import demo_folder

    return demo_folder(cache_dir)


def make_config(cache_dir: Path, output_dir: Path, **train):
    """A fast tiny-model config for tests."""
    from lora_lab.config import Config, DataConfig, ModelConfig, TrainConfig

    t = dict(network_dim=4, network_alpha=2.0, learning_rate=1e-3, epochs=2, batch_size=2, resolution=32)
    t.update(train)
    return Config(
        model=ModelConfig(),
        data=DataConfig(token="sks", repeats=1),
        train=TrainConfig(**t),
        output_dir=str(output_dir),
        cache_dir=str(cache_dir),
        device="cpu",
    )


@pytest.fixture(scope="session")
def script_study(tmp_path_factory, cache_dir, demo_dir):
    """A finished smoke sweep on demo faces whose captions and token carry HTML."""
    import shutil

    from lora_lab.cli import compose
    from lora_lab.sweep import run as sweep

    root = tmp_path_factory.mktemp("study")
    data = root / "data" / "2_sks"
    shutil.copytree(demo_dir / "10_sks woman", data)
    (data / "00.txt").write_text("photo of sks woman, <script>alert(1)</script>", encoding="utf-8")
    cfg = compose(["+sweep=smoke", f"sweep.root={root / 'sweeps'}", f"sweep.reports={root / 'reports'}",
                   f"cache_dir={cache_dir}", "data=folder", f"data.path={root / 'data'}",
                   "data.token='<b>sks</b> woman'", "eval.seeds=[1,2]"])
    sweep.run(cfg)
    return root / "sweeps" / "smoke", root / "reports" / "smoke"


@pytest.fixture(scope="session")
def xl_dir(cache_dir) -> Path:
    """The tiny SDXL-shaped model as a diffusers folder."""
    from lora_lab.models.builtin import tiny_folder

    return tiny_folder(cache_dir, "tiny-sdxl")


@pytest.fixture(scope="session")
def xl_base(cache_dir, xl_dir):
    import torch

    from lora_lab.config import ModelConfig
    from lora_lab.models.base import load_base

    cfg = ModelConfig(name="tiny-sdxl", builtin="tiny-sdxl", base_version="sdxl_base_v1-0")
    return load_base(cfg, cache_dir, torch.device("cpu"))
