"""Test helper: write a diffusers SD or SDXL pipeline as an original (LDM / SGM, A1111) single-file
checkpoint.

Only used to make a tiny ``.safetensors`` like the ones A1111 users have, so the real
single-file loading path can be tested offline.
"""

from __future__ import annotations

import re

import torch

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _unet_key(key: str, layers: int) -> str:
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    for src, dst in fixed.items():
        if key.startswith(src + "."):
            return dst + key[len(src):]

    def resnet(rest: str) -> str:
        name, tail = rest.split(".", 1)
        return f"{_RESNET[name]}.{tail}"

    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = 1 + i * (layers + 1) + j
        return f"input_blocks.{idx}.0.{resnet(rest)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * (layers + 1)}.0.op.{m[2]}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        if m[1] == "attentions":
            return f"middle_block.1.{m[3]}"
        return f"middle_block.{2 * int(m[2])}.{resnet(m[3])}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = i * (layers + 1) + j
        return f"output_blocks.{idx}.0.{resnet(rest)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
    raise KeyError(key)


def _unet(unet) -> dict:
    layers = unet.config.layers_per_block
    out = {}
    has_attn = {i: ("CrossAttn" in t) for i, t in enumerate(unet.config.up_block_types)}
    for key, value in unet.state_dict().items():
        m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key)
        if m:
            i = int(m[1])
            new = f"output_blocks.{i * (layers + 1) + layers}.{2 if has_attn[i] else 1}.conv.{m[2]}"
        else:
            new = _unet_key(key, layers)
        out["model.diffusion_model." + new] = value
    return out


def _vae(vae) -> dict:
    n = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        new = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)",
                     lambda m: f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
                     lambda m: f"decoder.up.{n - 1 - int(m[1])}.upsample", new)
        new = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m[1]) + 1}", new)
        if "mid_block.attentions.0" in new:
            new = new.replace("mid_block.attentions.0", "mid.attn_1")
            for src, dst in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                             ("to_out.0", "proj_out")):
                new = new.replace(f".{src}.", f".{dst}.")
            if value.dim() == 2:
                value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


def _text(text_encoder) -> dict:
    out = {}
    for key, value in text_encoder.state_dict().items():
        name = key if key.startswith("text_model.") else "text_model." + key
        out["cond_stage_model.transformer." + name] = value
    return out


def to_ldm(pipe) -> dict:
    """The pipeline's weights under the original Stable Diffusion checkpoint's key names."""
    sd = {**_unet(pipe.unet), **_vae(pipe.vae), **_text(pipe.text_encoder)}
    return {k: v.contiguous() for k, v in sd.items()}


def _open_clip(text_encoder) -> dict:
    """A CLIPTextModelWithProjection under OpenCLIP's names (SDXL's second encoder): fused
    q/k/v as ``in_proj``, ``c_fc`` / ``c_proj``, and the projection transposed."""
    sd = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
          for k, v in text_encoder.state_dict().items()}
    out = {"text_projection": sd.pop("text_projection.weight").T,
           "token_embedding.weight": sd.pop("text_model.embeddings.token_embedding.weight"),
           "positional_embedding": sd.pop("text_model.embeddings.position_embedding.weight"),
           "ln_final.weight": sd.pop("text_model.final_layer_norm.weight"),
           "ln_final.bias": sd.pop("text_model.final_layer_norm.bias")}
    layers = text_encoder.config.num_hidden_layers
    for i in range(layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat([sd.pop(src + f"self_attn.{x}_proj.{kind}") for x in "qkv"])
            for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[dst + f"{b}.{kind}"] = sd.pop(src + f"{a}.{kind}")
    leftover = [k for k in sd if not k.endswith("position_ids")]
    assert not leftover, leftover
    return out


def to_sgm_xl(pipe) -> dict:
    """An SDXL pipeline's weights under the original SDXL checkpoint's key names."""
    sd = {**_unet(pipe.unet), **_vae(pipe.vae)}
    for key, value in _text(pipe.text_encoder).items():
        sd["conditioner.embedders.0.transformer." + key[len("cond_stage_model.transformer."):]] = value
    for key, value in _open_clip(pipe.text_encoder_2).items():
        sd["conditioner.embedders.1.model." + key] = value
    return {k: v.contiguous() for k, v in sd.items()}
