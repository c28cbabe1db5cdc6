"""Base model loading: the tiny folder, a single-file checkpoint, a hub id from the local cache,
the shipped presets, and the refusals (pickle files, missing paths)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_cli
from lora_lab.config import ModelConfig
from lora_lab.errors import ModelError
from lora_lab.models.base import load_base, resolve_source
from lora_lab.models.builtin import preset_folder

CPU = torch.device("cpu")


def test_tokenizer_ids_match_sd(tiny_dir):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer")
    assert len(tok) == 49408
    ids = tok("a photo of", padding="max_length", max_length=77).input_ids
    assert ids[:5] == [49406, 320, 1125, 539, 49407] and ids[-1] == 49407 and len(ids) == 77


def test_tiny_model_loads_like_any_folder(base, tiny_dir):
    assert base.source == str(tiny_dir)
    assert base.unet.__class__.__name__ == "UNet2DConditionModel"
    assert base.prediction_type == "epsilon"
    assert not any(p.requires_grad for p in base.unet.parameters())


def test_single_file_checkpoint_loads_through_from_single_file(base, tiny_dir, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from ldm_export import to_ldm

    ckpt = tmp_path / "tiny-pruned.safetensors"
    save_file(to_ldm(base.pipe), str(ckpt))
    cfg = ModelConfig(name="tiny-file", pretrained=str(ckpt), builtin=None, config_dir=str(tiny_dir))
    assert resolve_source(cfg, tmp_path) == ("single_file", str(ckpt))
    loaded = load_base(cfg, tmp_path, CPU)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(base, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k].reshape(a[k].shape)) for k in a), name


def test_single_file_needs_an_architecture(tmp_path):
    ckpt = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(1)}, str(ckpt))
    with pytest.raises(ModelError, match="model.preset: a single-file checkpoint needs its architecture"):
        load_base(ModelConfig(pretrained=str(ckpt), builtin=None), tmp_path, CPU)


def test_hub_id_loads_from_the_local_hub_cache_offline(tiny_dir, tmp_path):
    snapshot = tmp_path / "hub" / "models--someone--tiny-sd" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_dir, snapshot)
    (tmp_path / "hub" / "models--someone--tiny-sd" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-sd" / "refs" / "main").write_text("a" * 40)
    code = (
        "import torch; from lora_lab.config import ModelConfig; from lora_lab.models.base import load_base;"
        f"b = load_base(ModelConfig(pretrained='someone/tiny-sd', builtin=None), {str(tmp_path)!r}, torch.device('cpu'));"
        "print('loaded', b.source, sum(p.numel() for p in b.unet.parameters()))"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    proc = run_cli([sys.executable, "-c", code], env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "loaded someone/tiny-sd" in proc.stdout


def test_hub_id_not_cached_offline_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="could not load nobody/no-such-model .*local Hugging Face cache"):
        load_base(ModelConfig(pretrained="nobody/no-such-model", builtin=None), tmp_path, CPU)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickle_checkpoints_are_refused(tmp_path, suffix):
    path = tmp_path / f"v1-5-pruned{suffix}"
    path.write_bytes(b"not loaded")
    with pytest.raises(ModelError, match="is a pickle checkpoint .* only loads weights from .safetensors"):
        resolve_source(ModelConfig(pretrained=str(path), builtin=None), tmp_path)


def test_missing_path_and_plain_folder(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_source(ModelConfig(pretrained=str(tmp_path / "nope.safetensors"), builtin=None), tmp_path)
    with pytest.raises(ModelError, match="has no model_index.json"):
        resolve_source(ModelConfig(pretrained=str(tmp_path), builtin=None), tmp_path)


# Parameter counts of the released models' components (SD 1.5; SD 2.x with OpenCLIP ViT-H/14).
PRESET_COUNTS = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd21": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
}


@pytest.mark.parametrize("preset", sorted(PRESET_COUNTS))
def test_preset_configs_describe_the_real_architectures(preset, tmp_path):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = preset_folder(preset, tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    counts = {n: sum(p.numel() for p in m.parameters()) for n, m in
              (("unet", unet), ("vae", vae), ("text_encoder", te))}
    assert counts == PRESET_COUNTS[preset]
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert tok.pad_token == ("!" if preset == "sd21" else "<|endoftext|>")
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == ("v_prediction" if preset == "sd21" else "epsilon")
