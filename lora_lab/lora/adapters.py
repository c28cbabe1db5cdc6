"""Attach and remove LoRA adapters (peft): training adapters, evaluation adapters loaded from
files (:mod:`lora_lab.lora.kohya`), their strengths and their removal.

Functions that take ``text_encoder`` accept one module or a tuple of them (SDXL's two).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Dict, List, Tuple

import torch

from lora_lab.config import TrainConfig

ADAPTER = "lora_lab"  # the adapter being trained
EVAL_ADAPTER = "lora_lab_eval"  # a LoRA file loaded for rendering, beside a training adapter if any
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


def text_parts(text_encoder) -> List[Tuple[str, str, torch.nn.Module]]:
    """(kohya prefix, part name, module) per text encoder: ``lora_te_`` for SD 1.x / 2.x's one,
    ``lora_te1_`` and ``lora_te2_`` for SDXL's two (as kohya names them)."""
    if text_encoder is None:
        return []
    encoders = [m for m in (text_encoder if isinstance(text_encoder, (list, tuple)) else (text_encoder,))
                if m is not None]
    if len(encoders) == 1:
        return [("lora_te_", "text_encoder", encoders[0])]
    return [(f"lora_te{i}_", "text_encoder" if i == 1 else f"text_encoder_{i}", m)
            for i, m in enumerate(encoders, start=1)]


def modules_of(unet, text_encoder) -> List[torch.nn.Module]:
    return [unet] + [m for _, _, m in text_parts(text_encoder)]


def inject(module: torch.nn.Module, config, adapter: str) -> None:
    """Add ``adapter`` to a model through peft itself and make it the active one.

    diffusers' and transformers' ``add_adapter`` are thin wrappers around the same peft call,
    but each checks peft's version against its own minimum first (transformers 5.24 refuses
    every released peft); going to peft directly keeps one library's check from breaking both.
    """
    from peft import inject_adapter_in_model

    with warnings.catch_warnings():  # a second adapter beside a first is intended
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, module, adapter_name=adapter)
    activate(module, adapter)


def check_network(unet, text_encoder, cfg: TrainConfig) -> None:
    """Refuse, before any work, a network setting the model's layers cannot take (one sentence
    naming the setting and what is allowed): a LoKr factor that does not divide a trained layer."""
    from lora_lab.lora import lycoris_net

    if cfg.network_type != "lokr":
        return
    lycoris_net.check_factor(unet, sorted(unet_lora_config(unet, cfg).target_modules), cfg.factor, "UNet")
    for index, (_, _, encoder) in enumerate(text_parts(text_encoder)):
        if cfg.text_encoder_lr_of(index):
            lycoris_net.check_factor(encoder, _targets(encoder, _TEXT, ("encoder.layers",)), cfg.factor,
                                     "text encoder")


def attach(unet, text_encoder, cfg: TrainConfig) -> List[List[torch.nn.Parameter]]:
    """Add a fresh network of ``cfg.network_type`` (fp32) and return its trainable parameters per
    module: the UNet's, then each text encoder's whose learning rate is set (SDXL's second:
    ``text_encoder_2_lr``), an empty list for a frozen one. lora / locon: peft adapters on the
    layers; loha / lokr / dora: LyCORIS networks on the same layers (:mod:`lora_lab.lora.lycoris_net`)."""
    from lora_lab.lora import lycoris_net

    out: List[List[torch.nn.Parameter]] = []
    check_network(unet, text_encoder, cfg)
    if cfg.network_type in lycoris_net.LYCORIS_TYPES:
        unet_targets = unet_lora_config(unet, cfg).target_modules
        out.append(lycoris_net.attach(unet, sorted(unet_targets), cfg, conv=bool(cfg.conv_dim), prefix="lora_unet"))
        for index, (prefix, _, encoder) in enumerate(text_parts(text_encoder)):
            if not cfg.text_encoder_lr_of(index):
                out.append([])
                continue
            names = _targets(encoder, _TEXT, ("encoder.layers",))
            out.append(lycoris_net.attach(encoder, names, cfg, conv=False, prefix=prefix.rstrip("_")))
        return out
    inject(unet, unet_lora_config(unet, cfg), ADAPTER)
    modules = [unet]
    for index, (_, _, encoder) in enumerate(text_parts(text_encoder)):
        if cfg.text_encoder_lr_of(index):
            inject(encoder, text_lora_config(encoder, cfg), ADAPTER)
        modules.append(encoder if cfg.text_encoder_lr_of(index) else None)
    for module in modules:
        params = []
        for name, p in (module.named_parameters() if module is not None else ()):
            if f".{ADAPTER}." in name and "lora_" in name:
                p.data = p.data.float()
                p.requires_grad_(True)
                params.append(p)
        out.append(params)
    return out


def detach(unet, text_encoder) -> None:
    """Remove every adapter (peft's and LyCORIS'): the modules are the base model's again."""
    from lora_lab.lora import lycoris_net

    for module in modules_of(unet, text_encoder):
        remove_one(module)
        lycoris_net.detach(module)


def lora_layers(module: torch.nn.Module, adapter: str = ADAPTER):
    from peft.tuners.lora import LoraLayer

    for name, m in module.named_modules():
        if isinstance(m, LoraLayer) and adapter in m.lora_A:
            yield name, m


def tuner_layers(module: torch.nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def activate(module: torch.nn.Module, adapter: str) -> None:
    """Make ``adapter`` the only active adapter on every LoRA layer (peft's layer API)."""
    for layer in tuner_layers(module):
        if layer.active_adapters != [adapter]:
            layer.set_adapter(adapter)
        if layer.disable_adapters:
            layer.enable_adapters(True)


@contextmanager
def adapters_disabled(*modules: torch.nn.Module):
    """Run the base model: every LoRA layer bypassed (and LyCORIS' training networks), then restored."""
    from lora_lab.lora import lycoris_net

    flat = [x for m in modules for x in (m if isinstance(m, (list, tuple)) else (m,)) if x is not None]
    layers = [layer for m in flat for layer in tuner_layers(m)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        with lycoris_net.paused(flat):
            yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def unload(unet, text_encoder, adapter: str = EVAL_ADAPTER) -> None:
    """Remove one adapter; a training adapter left behind becomes active again."""
    for module in modules_of(unet, text_encoder):
        delete_adapter(module, adapter)
        if any(True for _ in lora_layers(module, ADAPTER)):
            activate(module, ADAPTER)


def delete_adapter(module, adapter: str) -> None:
    names = set(getattr(module, "peft_config", None) or {})
    if adapter not in names:
        return
    if names == {adapter}:
        remove_one(module)  # the last adapter: unwrap, the modules are the base model's again
        return
    with warnings.catch_warnings():  # peft says which adapter becomes active: unload decides
        warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
        for layer in tuner_layers(module):
            if adapter in getattr(layer, "lora_A", {}):
                layer.delete_adapter(adapter)
    module.peft_config.pop(adapter)


def config_for(wanted: Dict[str, tuple]):
    from collections import Counter

    from peft import LoraConfig

    rank = Counter(d.shape[0] for d, _, _ in wanted.values()).most_common(1)[0][0]
    return LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(wanted),
        rank_pattern={f"^{n}$": d.shape[0] for n, (d, _, _) in wanted.items()},
        alpha_pattern={f"^{n}$": a for n, (_, _, a) in wanted.items()},
        init_lora_weights=False,
    )


def remove_one(module) -> None:
    from diffusers.utils import recurse_remove_peft_layers

    if getattr(module, "peft_config", None) or any(hasattr(m, "base_layer") for m in module.modules()):
        recurse_remove_peft_layers(module)
        if hasattr(module, "peft_config"):
            del module.peft_config
        if hasattr(module, "_hf_peft_config_loaded"):
            module._hf_peft_config_loaded = False


def set_strength(unet, text_encoder, strength: float, adapter: str = EVAL_ADAPTER) -> None:
    """Scale every LoRA layer (attention, conv, text encoder) to exactly ``strength`` x alpha / rank."""
    from peft.tuners.lora import LoraLayer

    for module in modules_of(unet, text_encoder):
        for layer in module.modules():  # no names needed: cheaper than named_modules
            if isinstance(layer, LoraLayer) and adapter in layer.lora_A:
                layer.set_scale(adapter, float(strength))


def eval_adapter(index: int) -> str:
    """The adapter name of the ``index``-th LoRA file loaded side by side for rendering."""
    return EVAL_ADAPTER if index == 0 else f"{EVAL_ADAPTER}_{index}"


def unload_all(unet, text_encoder) -> None:
    """Remove every rendering adapter (see :func:`eval_adapter`); a training adapter stays."""
    names = set()
    for module in modules_of(unet, text_encoder):
        names |= {n for n in (getattr(module, "peft_config", None) or {}) if n.startswith(EVAL_ADAPTER)}
    for name in sorted(names, reverse=True):
        unload(unet, text_encoder, adapter=name)
