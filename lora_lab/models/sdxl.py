"""What SDXL needs beyond SD 1.x / 2.x: the original (SGM) names kohya's SDXL LoRA files use for
UNet layers, the architecture of a single-file checkpoint, and the per-image size conditioning.

kohya trains SDXL on its own copy of Stability AI's UNet, so an SDXL LoRA names UNet layers by
their SGM paths (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), not by
diffusers' (``down_blocks_1_attentions_0_...``); A1111 finds them by replacing ``lora_unet`` with
``diffusion_model``, and diffusers' ``load_lora_weights`` maps them back to its own blocks. The
text encoders are ``lora_te1_`` (CLIP ViT-L) and ``lora_te2_`` (OpenCLIP ViT-bigG), both under
``text_model``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

# ss_base_model_version as kohya writes it for SDXL base 1.0 and its derivatives.
BASE_VERSION = "sdxl_base_v1-0"
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def is_sdxl_unet(unet) -> bool:
    """SDXL's UNet takes the pooled text embedding and the size/crop ids (``text_time``)."""
    return getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"


def _prefixes(config) -> Dict[str, str]:
    """diffusers module prefix -> SGM module prefix, for a UNet of SDXL's layout."""
    per = config.layers_per_block + 1  # SGM numbers resnets (and the resampler) of a block in one run
    n = len(config.block_out_channels)
    out = {"conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
           "time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
           "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
           "mid_block.attentions.0.": "middle_block.1.", "mid_block.resnets.0.": "middle_block.0.",
           "mid_block.resnets.1.": "middle_block.2."}
    for i in range(n):
        for j in range(per - 1):
            out[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{per * i + j + 1}.0."
            out[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{per * i + j + 1}.1."
        for j in range(per):
            out[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{per * i + j}.0."
            out[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{per * i + j}.1."
        if i < n - 1:
            out[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{per * (i + 1)}.0.op."
            slot = 2 if "CrossAttn" in config.up_block_types[i] else 1
            out[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{per * i + per - 1}.{slot}."
    return out


_TABLES: Dict[str, Dict[str, str]] = {}  # cache: the prefix table of each UNet layout, built once


def sgm_name(path: str, config) -> str:
    """The SGM (Stability AI / kohya SDXL) path of a diffusers SDXL UNet module path.

    Raises:
        KeyError: for a path outside the UNet's blocks.
    """
    key = json.dumps([config.layers_per_block, list(config.block_out_channels), list(config.up_block_types)])
    table = _TABLES.setdefault(key, _prefixes(config))
    parts = (path + ".").split(".")[:-1]
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut]) + "."
        if prefix in table:
            rest = parts[cut:]
            if ".resnets." in prefix and rest:
                rest = _RESNET.get(rest[0], rest[0]).split(".") + rest[1:]
            return (table[prefix] + ".".join(rest)).rstrip(".")
    raise KeyError(path)


def single_file_arch(path: Path) -> Optional[str]:
    """``sdxl``, ``sd2`` or ``sd1`` for an original-layout checkpoint, read from the safetensors
    header alone (no tensor is loaded); None when the keys say neither."""
    with open(path, "rb") as fh:
        size = struct.unpack("<Q", fh.read(8))[0]
        keys = json.loads(fh.read(size)).keys()
    if any(k.startswith("conditioner.embedders.1.model.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    return None


ARCH_NAMES = {"sdxl": "SDXL", "sd2": "SD 2.x", "sd1": "SD 1.x"}
PRESET_ARCH = {"sd15": "sd1", "sd21": "sd2", "sd21_base": "sd2", "sdxl": "sdxl"}


def time_ids(original: Sequence[Tuple[int, int]], crops: Sequence[Tuple[int, int]], target: Tuple[int, int],
             device, dtype=torch.float32) -> torch.Tensor:
    """SDXL's micro-conditioning per image: (original height, width, crop top, left, target
    height, width), as SDXL was trained and kohya and diffusers' scripts pass it."""
    rows = [[oh, ow, top, left, target[0], target[1]] for (oh, ow), (top, left) in zip(original, crops)]
    return torch.tensor(rows, device=device, dtype=dtype)
