"""SDXL at its real size, with random weights built from the shipped sdxl configs: written as the
original-layout single file A1111 users have, loaded through model=sdxl, refused under
model=sd15, and trained into a kohya SDXL file. Slow (about 3 minutes on 2 cores) and needs
about 15 GB of memory and 7 GB of disk, so it runs only when asked:

    LORA_LAB_FULL_SDXL=1 .venv/bin/python -m pytest -q tests/test_sdxl_full.py
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import make_config
from lora_lab.config import ModelConfig
from lora_lab.data.dataset import load_dataset
from lora_lab.errors import ModelError
from lora_lab.lora import kohya as kohya_io
from lora_lab.models.base import load_base
from lora_lab.train.loop import train

sys.path.insert(0, str(Path(__file__).parent))
from ldm_export import to_sgm_xl  # noqa: E402

pytestmark = pytest.mark.skipif(not os.environ.get("LORA_LAB_FULL_SDXL"),
                                reason="full-size SDXL check: set LORA_LAB_FULL_SDXL=1 (15 GB of memory, ~3 min)")
CPU = torch.device("cpu")


def _random(build):
    """A module of the given architecture with small random fp16 weights, without the cost of
    its own initialisation."""
    with torch.device("meta"):
        module = build()
    module = module.to_empty(device="cpu").to(torch.float16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_((torch.rand(p.shape, generator=g) - 0.5).mul_(0.02).to(torch.float16))
        for name, b in module.named_buffers():
            if "position_ids" in name:
                b.copy_(torch.arange(b.shape[-1]).expand_as(b))
    return module


@pytest.fixture(scope="module")
def full_file(tmp_path_factory):
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lora_lab.models.builtin import PRESETS_DIR

    preset = PRESETS_DIR / "sdxl"
    pipe = SimpleNamespace(
        unet=_random(lambda: UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(preset / "unet"))),
        vae=_random(lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(preset / "vae"))),
        text_encoder=_random(lambda: CLIPTextModel(CLIPTextConfig.from_pretrained(preset / "text_encoder"))),
        text_encoder_2=_random(lambda: CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(preset / "text_encoder_2"))))
    assert round(sum(p.numel() for p in pipe.unet.parameters()) / 1e6, 1) == 2567.5  # SDXL base's UNet
    ref = {"conv_in": pipe.unet.conv_in.weight.clone(),
           "proj": pipe.text_encoder_2.text_projection.weight.clone(),
           "q31": pipe.text_encoder_2.text_model.encoder.layers[31].self_attn.q_proj.weight.clone()}
    path = tmp_path_factory.mktemp("sdxl_full") / "sd_xl_random.safetensors"
    save_file(to_sgm_xl(pipe), str(path))
    del pipe
    gc.collect()
    return path, ref


def test_a_full_size_sdxl_file_loads_refuses_and_trains(full_file, cache_dir, tmp_path):
    path, ref = full_file
    cfg = ModelConfig(name="sdxl", pretrained=str(path), builtin=None, preset="sdxl", resolution=1024,
                      base_version="sdxl_base_v1-0")
    with pytest.raises(ModelError, match="is an SDXL checkpoint, but model=sd15 expects SD 1.x; use model=sdxl"):
        load_base(ModelConfig(name="sd15", pretrained=str(path), builtin=None, preset="sd15"), tmp_path, CPU)
    base = load_base(cfg, tmp_path, CPU)  # fp32, as training on a CPU runs
    assert torch.equal(base.unet.conv_in.weight, ref["conv_in"].float())
    assert torch.equal(base.text_encoders[1].text_projection.weight, ref["proj"].float())
    assert torch.equal(base.text_encoders[1].text_model.encoder.layers[31].self_attn.q_proj.weight, ref["q31"].float())
    run = make_config(cache_dir, tmp_path / "run", epochs=1, batch_size=4, resolution=128, network_dim=4)
    run.model = cfg
    result = train(run, base, load_dataset(run.data, cache_dir), tmp_path / "run")
    with safe_open(str(result.lora_files[1]), framework="pt") as fh:
        names = {k[: -len(".lora_down.weight")] for k in fh.keys() if k.endswith(".lora_down.weight")}
        meta = fh.metadata()
    # kohya's UNet LoRA on SDXL: 70 transformer blocks x 10 linear layers (q, k, v, out of two
    # attentions; two feed-forward layers) + proj_in / proj_out of 11 transformer models = 722.
    assert len(names) == 722 and all(n.startswith("lora_unet_") for n in names)
    assert "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2" in names
    assert "lora_unet_output_blocks_2_1_transformer_blocks_9_attn2_to_out_0" in names
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_resolution"] == "(128, 128)"
    index = kohya_io.module_index(base.unet, base.text_encoders)
    assert "lora_te2_text_model_encoder_layers_31_mlp_fc2" in index
