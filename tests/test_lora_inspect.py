"""lora_lab.inspect: format, ranks per block, who applies what, and the warnings users need."""

from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import save_file

from conftest import run_cli
from lora_lab.config import TrainConfig
from lora_lab.lora import adapters as lora_io
from lora_lab.lora import kohya as kohya_io
from lora_lab.lora.inspect import inspect, render


def _kohya_file(base, path, **meta):
    lora_io.attach(base.unet, base.text_encoder, TrainConfig(network_dim=4, network_alpha=2.0, text_encoder_lr=1e-4))
    with torch.no_grad():
        for name, p in base.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    tensors = kohya_io.kohya_state_dict(base.unet, base.text_encoder)
    lora_io.detach(base.unet, base.text_encoder)
    save_file(tensors, str(path), metadata={"ss_network_dim": "4", "ss_network_alpha": "2.0", **meta})
    return tensors


def test_a_kohya_file_on_its_base(base, tmp_path):
    tensors = _kohya_file(base, tmp_path / "mine.safetensors", ss_base_model_version="sd_v1")
    info = inspect(tmp_path / "mine.safetensors", base)
    modules = len([k for k in tensors if k.endswith(".alpha")])
    assert info["format"] == "kohya" and info["modules"] == modules and info["base_model_version"] == "sd_v1"
    assert info["blocks"]["lora_unet_down_blocks_0"]["rank"] == [4]
    assert info["blocks"]["lora_unet_down_blocks_0"]["alpha"] == [2.0] and "lora_te" in info["blocks"]
    assert info["tools"] == {t: {"applies": modules, "ignores": 0} for t in ("A1111", "ComfyUI", "diffusers")}
    assert info["warnings"] == [] and info["training"]["ss_network_dim"] == "4"
    text = render(info)
    assert "format: kohya" in text and "diffusers  applies" in text


def test_warnings_alpha_missing_nan_zero_and_a_foreign_base(base, tmp_path):
    tensors = _kohya_file(base, tmp_path / "a.safetensors")
    broken = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}  # no alpha anywhere
    first_up = next(k for k in broken if k.endswith("lora_up.weight"))
    broken[first_up] = torch.full_like(broken[first_up], float("nan"))
    broken["lora_unet_input_blocks_4_1_proj_in.lora_down.weight"] = torch.zeros(4, 640)  # an SDXL module
    broken["lora_unet_input_blocks_4_1_proj_in.lora_up.weight"] = torch.zeros(640, 4)
    save_file(broken, str(tmp_path / "b.safetensors"), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    info = inspect(tmp_path / "b.safetensors", base)
    text = " | ".join(info["warnings"])
    assert "have no alpha" in text and "alpha = rank" in text
    assert "NaN or infinite values (first: " + first_up in text
    assert "made for sdxl_base_v1-0, but the base model is sd_v1" in text
    assert "1 modules name no layer of this base model (first: lora_unet_input_blocks_4_1_proj_in)" in text
    assert info["tools"]["ComfyUI"]["ignores"] == 1
    zeros = {k: torch.zeros_like(v) if not k.endswith(".alpha") else v for k, v in tensors.items()}
    save_file(zeros, str(tmp_path / "z.safetensors"))
    assert any("all zero" in w for w in inspect(tmp_path / "z.safetensors")["warnings"])


def test_loha_and_dora_per_tool(tmp_path):
    loha = {"lora_unet_x.hada_w1_a": torch.ones(8, 2), "lora_unet_x.hada_w1_b": torch.ones(2, 8),
            "lora_unet_x.hada_w2_a": torch.ones(8, 2), "lora_unet_x.hada_w2_b": torch.ones(2, 8),
            "lora_unet_x.alpha": torch.tensor(1.0)}
    save_file(loha, str(tmp_path / "loha.safetensors"))
    info = inspect(tmp_path / "loha.safetensors")
    assert info["format"] == "loha" and info["blocks"]["lora_unet"]["rank"] == [2]
    assert info["tools"]["diffusers"] == {"applies": 0, "ignores": 1} and info["tools"]["A1111"]["applies"] == 1
    dora = {"lora_unet_x.lora_down.weight": torch.ones(2, 8), "lora_unet_x.lora_up.weight": torch.ones(8, 2),
            "lora_unet_x.alpha": torch.tensor(2.0), "lora_unet_x.dora_scale": torch.ones(1, 8)}
    save_file(dora, str(tmp_path / "dora.safetensors"))
    assert "drops every dora_scale" in inspect(tmp_path / "dora.safetensors")["tools"]["diffusers"]["note"]


def test_inspect_command(base, tmp_path, cache_dir):
    _kohya_file(base, tmp_path / "mine.safetensors")
    proc = run_cli([sys.executable, "-m", "lora_lab.inspect", str(tmp_path / "mine.safetensors"), "--json",
                    "--base", "tiny", "--cache-dir", str(cache_dir)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout)
    assert info["base_model_version"] is None  # no metadata, and the tiny model's cross-attention (32) is no SD's
    assert info["unmatched"] == [] and info["tools"]["diffusers"]["ignores"] == 0
    (tmp_path / "x.ckpt").write_bytes(b"pickle")
    proc = run_cli([sys.executable, "-m", "lora_lab.inspect", str(tmp_path / "x.ckpt")])
    assert proc.returncode == 2 and "only .safetensors LoRA files are read" in proc.stderr


def test_base_model_from_the_keys_when_metadata_is_missing():
    from lora_lab.lora.inspect import base_version

    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    assert base_version({key: torch.zeros(4, 768)}, {}) == "sd_v1"
    assert base_version({key: torch.zeros(4, 1024)}, {}) == "sd_v2"
    assert base_version({"lora_te2_text_model_x.lora_down.weight": torch.zeros(4, 8)}, {}) == "sdxl_base_v1-0"
    assert base_version({key: torch.zeros(4, 768)}, {"ss_base_model_version": "sd_v2_768_v"}) == "sd_v2_768_v"
