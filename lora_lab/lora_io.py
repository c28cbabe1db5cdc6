"""Attach and remove LoRA adapters (peft), and write / read kohya-format LoRA files.

kohya's format is what AUTOMATIC1111, ComfyUI and diffusers' ``load_lora_weights`` read:
``lora_unet_<module path, '.' -> '_'>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
(a 0-d tensor; the output is scaled by alpha / rank), ``lora_te_...`` for the text encoder,
and ``ss_*`` metadata strings in the safetensors header.

We write the keys ourselves from the peft layers: diffusers' ``convert_state_dict_to_kohya``
drops the ``lora_unet_`` prefix when given a UNet's own state dict and writes alpha = rank
whatever alpha was trained with (../shared/reference.md).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from lora_lab.cache import atomic_save
from lora_lab.config import TrainConfig
from lora_lab.errors import LoraLabError

ADAPTER = "lora_lab"
# kohya targets every Linear / 1x1 conv inside Transformer2DModel blocks ...
_UNET_ATTENTION = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
# ... and, with conv_dim (LoCon), the layers of ResNet and resampling blocks.
_UNET_CONV = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")
# CLIPAttention and CLIPMLP layers.
_TEXT = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _targets(module: torch.nn.Module, suffixes: Tuple[str, ...], within: Tuple[str, ...]) -> List[str]:
    out = []
    for name, m in module.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if any(name.endswith(s) for s in suffixes) and (not within or any(w in name for w in within)):
            out.append(name)
    return out


def unet_lora_config(unet: torch.nn.Module, cfg: TrainConfig):
    """peft LoraConfig for the UNet with kohya's target layers and alpha meaning."""
    from peft import LoraConfig

    targets = _targets(unet, _UNET_ATTENTION, ("attentions",))
    rank_pattern, alpha_pattern = {}, {}
    if cfg.conv_dim:
        conv = _targets(unet, _UNET_CONV, ("resnets", "downsamplers", "upsamplers"))
        targets += conv
        for name in conv:
            m = unet.get_submodule(name)
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1):
                rank_pattern[f"^{name}$"] = cfg.conv_dim
                alpha_pattern[f"^{name}$"] = cfg.conv_alpha
    return LoraConfig(
        r=cfg.network_dim,
        lora_alpha=cfg.network_alpha,
        target_modules=targets,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        init_lora_weights=True,
    )


def text_lora_config(text_encoder: torch.nn.Module, cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.network_dim,
        lora_alpha=cfg.network_alpha,
        target_modules=_targets(text_encoder, _TEXT, ("encoder.layers",)),
        init_lora_weights=True,
    )


def attach(unet, text_encoder, cfg: TrainConfig) -> List[torch.nn.Parameter]:
    """Add fresh LoRA adapters (fp32) and return the trainable parameters."""
    unet.add_adapter(unet_lora_config(unet, cfg), adapter_name=ADAPTER)
    modules = [unet]
    if cfg.trains_text_encoder:
        text_encoder.add_adapter(text_lora_config(text_encoder, cfg), adapter_name=ADAPTER)
        modules.append(text_encoder)
    params = []
    for module in modules:
        for name, p in module.named_parameters():
            if f".{ADAPTER}." in name and "lora_" in name:
                p.data = p.data.float()
                p.requires_grad_(True)
                params.append(p)
    return params


def detach(unet, text_encoder) -> None:
    """Remove every adapter and unwrap the peft layers: the modules are the base model's again."""
    from diffusers.utils import recurse_remove_peft_layers

    for module in (unet, text_encoder):
        if getattr(module, "peft_config", None) or any(hasattr(m, "base_layer") for m in module.modules()):
            recurse_remove_peft_layers(module)
            if hasattr(module, "peft_config"):
                del module.peft_config
            if hasattr(module, "_hf_peft_config_loaded"):
                module._hf_peft_config_loaded = False


def _lora_layers(module: torch.nn.Module):
    from peft.tuners.lora import LoraLayer

    for name, m in module.named_modules():
        if isinstance(m, LoraLayer) and ADAPTER in m.lora_A:
            yield name, m


def kohya_state_dict(unet, text_encoder=None) -> Dict[str, torch.Tensor]:
    """The attached adapters as kohya tensors (fp32, CPU)."""
    out: Dict[str, torch.Tensor] = {}
    parts = [("lora_unet_", unet)] + ([("lora_te_", text_encoder)] if text_encoder is not None else [])
    for prefix, module in parts:
        for name, layer in _lora_layers(module):
            key = prefix + _kohya_module_name(prefix, name)
            out[f"{key}.lora_down.weight"] = layer.lora_A[ADAPTER].weight.detach().float().cpu().clone()
            out[f"{key}.lora_up.weight"] = layer.lora_B[ADAPTER].weight.detach().float().cpu().clone()
            out[f"{key}.alpha"] = torch.tensor(float(layer.lora_alpha[ADAPTER]))
    return out


def _kohya_module_name(prefix: str, name: str) -> str:
    # kohya names text-encoder layers from CLIPTextModel's ``text_model`` child; transformers 5
    # flattened that level away, so put it back for the file to match A1111 / kohya / ComfyUI.
    if prefix == "lora_te_" and not name.startswith("text_model."):
        name = "text_model." + name
    return name.replace(".", "_")


def model_hashes(tensors: Dict[str, torch.Tensor]) -> Dict[str, str]:
    """kohya's ``sshs_model_hash`` (sha256 of the tensor payload after the header) and
    ``sshs_legacy_hash`` (A1111's old short hash: 64 KiB at offset 1 MiB of the file)."""
    blob = safetensors_bytes(tensors)
    header = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + header :]).hexdigest()
    legacy = hashlib.sha256(blob[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy}


def save_kohya(path: Path, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> None:
    """Write a kohya LoRA file atomically, with hashes added to the metadata."""
    meta = {k: str(v) for k, v in metadata.items()}
    meta.update(model_hashes(tensors))
    atomic_save(tensors, Path(path), metadata=meta)


def read_kohya(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Tensors and metadata of a kohya LoRA file (safetensors only)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise LoraLabError(f"LoRA file {path}: only .safetensors LoRA files are read")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise LoraLabError(f"LoRA file {path} cannot be read: {exc}") from None
    return tensors, meta


def kohya_metadata(**values) -> Dict[str, str]:
    """kohya ``ss_*`` metadata: every value a string, dicts and lists as JSON."""
    out = {}
    for key, value in values.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, ensure_ascii=False)
        elif value is None:
            value = "None"
        out[key] = str(value)
    return out
