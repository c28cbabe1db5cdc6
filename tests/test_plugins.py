"""Built-in names through entry points: the toy world registers itself (that the product never
imports it is held by tests/test_layers.py)."""

from __future__ import annotations

import pytest

from lora_lab import plugins
from lora_lab.config import DataConfig, ModelConfig
from lora_lab.errors import ConfigError


def test_the_toy_world_depends_on_lora_lab_and_registers_itself():
    assert plugins.names("model") == ("toyworld",) and plugins.names("data") == ("toyworld",)
    assert plugins.names("clip") == ("toyworld",)
    provide = plugins.provider("model", "toyworld")
    assert provide.__module__ == "lora_lab.toyworld.provide"
    assert ModelConfig(builtin="toyworld").builtin == "toyworld"  # registered names validate


def test_the_registered_data_set_loads_through_the_users_path(cache_dir):
    from lora_lab.data.dataset import load_dataset

    folder = plugins.provider("data", "toyworld")(cache_dir, "vek")
    by_path = load_dataset(DataConfig(path=str(folder), builtin=None), cache_dir)  # the folder, as a user has it
    by_name = load_dataset(DataConfig(builtin="toyworld", subject="vek"), cache_dir)
    assert [s.id for s in by_path.samples] == [s.id for s in by_name.samples]
    assert by_path.token == by_name.token == "vek person" and by_path.suite == folder / "suite.yaml"


def test_an_unregistered_name_is_refused_with_the_registered_ones():
    with pytest.raises(ConfigError, match=r"model.builtin: .*'moonworld'.*tiny, tiny-sdxl, bench, sd15-random, toyworld"):
        ModelConfig(builtin="moonworld")
    with pytest.raises(ConfigError, match=r"no data is registered as 'moonworld' \(registered: toyworld\)"):
        plugins.provider("data", "moonworld")
