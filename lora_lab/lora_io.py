"""Attach and remove LoRA adapters (peft), and write / read kohya-format LoRA files.

kohya's format is what AUTOMATIC1111, ComfyUI and diffusers' ``load_lora_weights`` read:
``lora_unet_<module path, '.' -> '_'>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
(a 0-d tensor; the output is scaled by alpha / rank), ``lora_te_...`` for the text encoder,
and ``ss_*`` metadata strings in the safetensors header. SDXL files name UNet layers by their
original (SGM) paths and the two text encoders ``lora_te1_`` / ``lora_te2_`` (:mod:`lora_lab.sdxl`).

Functions that take ``text_encoder`` accept one module or a tuple of them (SDXL's two).

We write the keys ourselves from the peft layers: diffusers' ``convert_state_dict_to_kohya``
drops the ``lora_unet_`` prefix when given a UNet's own state dict and writes alpha = rank
whatever alpha was trained with (../shared/reference.md).
"""

from __future__ import annotations

import hashlib
import json
import warnings
import weakref
from pathlib import Path
from contextlib import contextmanager
from typing import Dict, List, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from lora_lab import sdxl
from lora_lab.cache import atomic_save
from lora_lab.config import TrainConfig
from lora_lab.errors import LoraLabError

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


def _inject(module: torch.nn.Module, config, adapter: str) -> None:
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


def attach(unet, text_encoder, cfg: TrainConfig) -> List[torch.nn.Parameter]:
    """Add fresh LoRA adapters (fp32) and return the trainable parameters: the UNet's, and each
    text encoder's whose learning rate is set (SDXL's second: ``text_encoder_2_lr``)."""
    _inject(unet, unet_lora_config(unet, cfg), ADAPTER)
    modules = [unet]
    for index, (_, _, encoder) in enumerate(text_parts(text_encoder)):
        if cfg.text_encoder_lr_of(index):
            _inject(encoder, text_lora_config(encoder, cfg), ADAPTER)
            modules.append(encoder)
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
    for module in modules_of(unet, text_encoder):
        _remove_one(module)


def _lora_layers(module: torch.nn.Module, adapter: str = ADAPTER):
    from peft.tuners.lora import LoraLayer

    for name, m in module.named_modules():
        if isinstance(m, LoraLayer) and adapter in m.lora_A:
            yield name, m


def _tuner_layers(module: torch.nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def activate(module: torch.nn.Module, adapter: str) -> None:
    """Make ``adapter`` the only active adapter on every LoRA layer (peft's layer API)."""
    for layer in _tuner_layers(module):
        if layer.active_adapters != [adapter]:
            layer.set_adapter(adapter)
        if layer.disable_adapters:
            layer.enable_adapters(True)


@contextmanager
def adapters_disabled(*modules: torch.nn.Module):
    """Run the base model: every LoRA layer bypassed, then restored."""
    flat = [x for m in modules for x in (m if isinstance(m, (list, tuple)) else (m,)) if x is not None]
    layers = [layer for m in flat for layer in _tuner_layers(m)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def kohya_state_dict(unet, text_encoder=None) -> Dict[str, torch.Tensor]:
    """The attached adapters as kohya tensors (fp32, CPU); ``text_encoder`` None: UNet only."""
    out: Dict[str, torch.Tensor] = {}
    parts = [("lora_unet_", unet)] + [(prefix, m) for prefix, _, m in text_parts(text_encoder)]
    for prefix, module in parts:
        for name, layer in _lora_layers(module):
            key = prefix + _kohya_module_name(prefix, name, unet)
            out[f"{key}.lora_down.weight"] = layer.lora_A[ADAPTER].weight.detach().float().cpu().clone()
            out[f"{key}.lora_up.weight"] = layer.lora_B[ADAPTER].weight.detach().float().cpu().clone()
            out[f"{key}.alpha"] = torch.tensor(float(layer.lora_alpha[ADAPTER]))
    return out


def _kohya_module_name(prefix: str, name: str, unet=None) -> str:
    # kohya names text-encoder layers from CLIPTextModel's ``text_model`` child; transformers 5
    # flattened that level away, so put it back for the file to match A1111 / kohya / ComfyUI.
    if prefix.startswith("lora_te") and not name.startswith("text_model."):
        name = "text_model." + name
    elif prefix == "lora_unet_" and unet is not None and sdxl.is_sdxl_unet(unet):
        name = sdxl.sgm_name(name, unet.config)
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


_INDEXES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _module_index(unet, text_encoder) -> Dict[str, Tuple[str, str]]:
    """kohya LoRA name -> (part, module path), walked once per UNet and text encoders (an
    adapter wraps a layer but never moves it, so the names and paths stay valid)."""
    per_unet = _INDEXES.setdefault(unet, {})
    key = tuple(id(m) for _, _, m in text_parts(text_encoder))
    if key not in per_unet:
        per_unet[key] = {k: (part, path) for k, (part, _, path) in _walk_modules(unet, text_encoder).items()}
    return per_unet[key]


def _walk_modules(unet, text_encoder) -> Dict[str, Tuple[str, torch.nn.Module, str]]:
    """kohya LoRA name -> (part, module, module path) for every Linear / Conv2d layer."""
    from peft.tuners.lora import LoraLayer

    index = {}
    for prefix, part, module in [("lora_unet_", "unet", unet)] + text_parts(text_encoder):
        for name, m in module.named_modules():
            if isinstance(m, LoraLayer):
                m = m.get_base_layer()
            elif ".base_layer" in name or not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            try:
                index[prefix + _kohya_module_name(prefix, name, unet)] = (part, m, name)
            except KeyError:  # an SDXL UNet layer SGM has no name for: no LoRA can target it
                continue
            if part == "unet":  # SDXL files some tools write with diffusers' names (A1111 reads them too)
                index.setdefault(prefix + name.replace(".", "_"), (part, m, name))
    return index


def _lookup(name: str, index) -> str:
    """The index key of a file's module name: a ``lora_te1_`` name on a model with one text
    encoder is that encoder's (some SD 1.x files are written so), and a ``lora_te_`` name on
    SDXL is its first encoder's (files converted from diffusers' format)."""
    if name not in index and name.startswith("lora_te1_"):
        return "lora_te_" + name[len("lora_te1_"):]
    if name not in index and name.startswith("lora_te_"):
        return "lora_te1_" + name[len("lora_te_"):]
    return name


def _part_modules(unet, text_encoder) -> Dict[str, torch.nn.Module]:
    return {"unet": unet, **{part: m for _, part, m in text_parts(text_encoder)}}


def base_weight(unet, text_encoder, name: str) -> Optional[torch.Tensor]:
    """The base model's weight of the layer a kohya LoRA module name points at (None: none)."""
    index = _module_index(unet, text_encoder)
    found = index.get(_lookup(name, index))
    if found is None:
        return None
    part, path = found
    layer = _part_modules(unet, text_encoder)[part].get_submodule(path)
    return (layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer).weight.detach()


def load_into(unet, text_encoder, tensors: Dict[str, torch.Tensor], source: str = "LoRA file",
              adapter: str = EVAL_ADAPTER) -> None:
    """Put a kohya LoRA into the models as the only active peft adapter (strength 1), reusing
    the adapter already there when its layers, ranks and alphas match (a hot swap between
    epochs). A training adapter, if any, stays in place, inactive, until :func:`unload`.

    Raises:
        LoraLabError: when keys match no layer of this base model (another architecture).
    """
    index = _module_index(unet, text_encoder)
    modules = _part_modules(unet, text_encoder)
    entries: Dict[str, Dict[str, tuple]] = {part: {} for part in modules}
    unknown = []
    for key in tensors:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        lookup = _lookup(name, index)
        if lookup not in index:
            unknown.append(name)
            continue
        down, up = tensors[key], tensors.get(f"{name}.lora_up.weight")
        if up is None:
            raise LoraLabError(f"{source}: {name} has lora_down but no lora_up weight")
        alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else float(down.shape[0])
        part, path = index[lookup]
        entries[part][path] = (down, up, alpha)
    if unknown:
        raise LoraLabError(
            f"{source}: {len(unknown)} LoRA layers match no layer of this base model (first: {unknown[0]}); "
            f"{_arch_hint(unknown, unet)}"
        )
    if not any(entries.values()):
        raise LoraLabError(f"{source}: no kohya LoRA weights found (keys like lora_unet_....lora_down.weight)")
    for part, module in modules.items():
        wanted = entries[part]
        layers = dict(_lora_layers(module, adapter))
        current = {name: (layer.r[adapter], float(layer.lora_alpha[adapter])) for name, layer in layers.items()}
        signature = {name: (d.shape[0], a) for name, (d, _, a) in wanted.items()}
        if current != signature:
            _delete_adapter(module, adapter)
            if wanted:
                _inject(module, _config_for(wanted), adapter)
            layers = dict(_lora_layers(module, adapter))
        activate(module, adapter)
        with torch.no_grad():
            for name, (down, up, _) in wanted.items():
                layer = layers[name]
                w_a, w_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
                w_a.copy_(down.reshape(w_a.shape).to(w_a.device, w_a.dtype))
                w_b.copy_(up.reshape(w_b.shape).to(w_b.device, w_b.dtype))
                layer.set_scale(adapter, 1.0)


def _arch_hint(unknown: List[str], unet) -> str:
    """Which architecture a file's unplaceable names point at, in words."""
    xl_names = any(n.startswith(("lora_te2_", "lora_unet_input_blocks_", "lora_unet_output_blocks_",
                                 "lora_unet_middle_block_")) for n in unknown)
    if xl_names and not sdxl.is_sdxl_unet(unet):
        return "its layer names are SDXL's; use model=sdxl with an SDXL base model"
    if sdxl.is_sdxl_unet(unet) and any(n.startswith(("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_te_"))
                                       for n in unknown):
        return "its layer names are SD 1.x / 2.x's; this base model is SDXL"
    return "is it made for another architecture (SDXL, SD 2 vs 1.5)?"


def unload(unet, text_encoder, adapter: str = EVAL_ADAPTER) -> None:
    """Remove one adapter; a training adapter left behind becomes active again."""
    for module in modules_of(unet, text_encoder):
        _delete_adapter(module, adapter)
        if any(True for _ in _lora_layers(module, ADAPTER)):
            activate(module, ADAPTER)


def _delete_adapter(module, adapter: str) -> None:
    names = set(getattr(module, "peft_config", None) or {})
    if adapter not in names:
        return
    if names == {adapter}:
        _remove_one(module)  # the last adapter: unwrap, the modules are the base model's again
        return
    with warnings.catch_warnings():  # peft says which adapter becomes active: unload decides
        warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
        for layer in _tuner_layers(module):
            if adapter in getattr(layer, "lora_A", {}):
                layer.delete_adapter(adapter)
    module.peft_config.pop(adapter)


def _config_for(wanted: Dict[str, tuple]):
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


def _remove_one(module) -> None:
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
