"""kohya-format LoRA files: write them from the attached adapters, read them, and load them
into a model as an evaluation adapter.

kohya's format is what AUTOMATIC1111, ComfyUI and diffusers' ``load_lora_weights`` read:
``lora_unet_<module path, '.' -> '_'>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
(a 0-d tensor; the output is scaled by alpha / rank), ``lora_te_...`` for the text encoder,
and ``ss_*`` metadata strings in the safetensors header. SDXL files name UNet layers by their
original (SGM) paths and the two text encoders ``lora_te1_`` / ``lora_te2_`` (:mod:`lora_lab.models.sdxl`).

We write the keys ourselves from the peft layers: diffusers' ``convert_state_dict_to_kohya``
drops the ``lora_unet_`` prefix when given a UNet's own state dict and writes alpha = rank
whatever alpha was trained with (../shared/reference.md).
"""

from __future__ import annotations

import hashlib
import json
import weakref
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from lora_lab.errors import LoraLabError
from lora_lab.files import atomic_save
from lora_lab.lora import adapters
from lora_lab.models import sdxl


def kohya_state_dict(unet, text_encoder=None) -> Dict[str, torch.Tensor]:
    """The attached adapters as kohya tensors (fp32, CPU); ``text_encoder`` None: UNet only.
    A LyCORIS network (LoHa, LoKr, DoRA) is written in LyCORIS' layout on the same names."""
    from lora_lab.lora import lycoris_net

    out: Dict[str, torch.Tensor] = {}
    parts = [("lora_unet_", unet)] + [(prefix, m) for prefix, _, m in adapters.text_parts(text_encoder)]
    for prefix, module in parts:
        out.update(lycoris_net.state_dict(module, lambda path: prefix + _kohya_module_name(prefix, path, unet)))
        for name, layer in adapters.lora_layers(module):
            key = prefix + _kohya_module_name(prefix, name, unet)
            out[f"{key}.lora_down.weight"] = layer.lora_A[adapters.ADAPTER].weight.detach().float().cpu().clone()
            out[f"{key}.lora_up.weight"] = layer.lora_B[adapters.ADAPTER].weight.detach().float().cpu().clone()
            out[f"{key}.alpha"] = torch.tensor(float(layer.lora_alpha[adapters.ADAPTER]))
    return out


def _kohya_module_name(prefix: str, name: str, unet=None) -> str:
    # kohya names text-encoder layers from CLIPTextModel's ``text_model`` child; transformers 5
    # flattened that level away, so put it back for the file to match A1111 / kohya / ComfyUI.
    if prefix.startswith("lora_te") and not name.startswith("text_model."):
        name = "text_model." + name
    elif prefix == "lora_unet_" and unet is not None and sdxl.is_sdxl_unet(unet):
        name = sdxl.sgm_name(name, unet.config)
    return name.replace(".", "_")


def model_hashes(tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """kohya's ``sshs_model_hash`` (sha256 of the tensor payload after the header) and
    ``sshs_legacy_hash`` (the old short hash of sd-webui-additional-networks: 64 KiB at offset
    1 MiB), both over the file as kohya serializes it for hashing: the tensors with the
    ``ss_*`` metadata only (the training record, which later edits do not touch)."""
    kept = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}
    blob = safetensors_bytes(tensors, metadata=kept)
    header = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + header :]).hexdigest()
    legacy = hashlib.sha256(blob[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy}


def save_kohya(path: Path, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> None:
    """Write a kohya LoRA file atomically, with hashes added to the metadata."""
    meta = {k: str(v) for k, v in metadata.items()}
    meta.update(model_hashes(tensors, meta))
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


_INDEXES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # cache: one name index per UNet


def module_index(unet, text_encoder) -> Dict[str, Tuple[str, str]]:
    """kohya LoRA name -> (part, module path), walked once per UNet and text encoders (an
    adapter wraps a layer but never moves it, so the names and paths stay valid)."""
    per_unet = _INDEXES.setdefault(unet, {})
    key = tuple(id(m) for _, _, m in adapters.text_parts(text_encoder))
    if key not in per_unet:
        per_unet[key] = {k: (part, path) for k, (part, _, path) in _walk_modules(unet, text_encoder).items()}
    return per_unet[key]


def _walk_modules(unet, text_encoder) -> Dict[str, Tuple[str, torch.nn.Module, str]]:
    """kohya LoRA name -> (part, module, module path) for every Linear / Conv2d layer."""
    from peft.tuners.lora import LoraLayer

    index = {}
    for prefix, part, module in [("lora_unet_", "unet", unet)] + adapters.text_parts(text_encoder):
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


def lookup(name: str, index) -> str:
    """The index key of a file's module name: a ``lora_te1_`` name on a model with one text
    encoder is that encoder's (some SD 1.x files are written so), and a ``lora_te_`` name on
    SDXL is its first encoder's (files converted from diffusers' format)."""
    if name not in index and name.startswith("lora_te1_"):
        return "lora_te_" + name[len("lora_te1_"):]
    if name not in index and name.startswith("lora_te_"):
        return "lora_te1_" + name[len("lora_te_"):]
    return name


def _part_modules(unet, text_encoder) -> Dict[str, torch.nn.Module]:
    return {"unet": unet, **{part: m for _, part, m in adapters.text_parts(text_encoder)}}


def base_weight(unet, text_encoder, name: str) -> Optional[torch.Tensor]:
    """The base model's weight of the layer a kohya LoRA module name points at (None: none)."""
    index = module_index(unet, text_encoder)
    found = index.get(lookup(name, index))
    if found is None:
        return None
    part, path = found
    layer = _part_modules(unet, text_encoder)[part].get_submodule(path)
    return (layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer).weight.detach()


def place(unet, text_encoder, tensors: Dict[str, torch.Tensor], source: str = "LoRA file"
          ) -> Dict[str, Dict[str, tuple]]:
    """A kohya LoRA's layers by model part and module path: ``{part: {path: (down, up, alpha)}}``.

    Raises:
        LoraLabError: when keys match no layer of this base model (another architecture).
    """
    index = module_index(unet, text_encoder)
    entries: Dict[str, Dict[str, tuple]] = {part: {} for part in _part_modules(unet, text_encoder)}
    unknown = []
    for key in tensors:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        found = lookup(name, index)
        if found not in index:
            unknown.append(name)
            continue
        down, up = tensors[key], tensors.get(f"{name}.lora_up.weight")
        if up is None:
            raise LoraLabError(f"{source}: {name} has lora_down but no lora_up weight")
        alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else float(down.shape[0])
        part, path = index[found]
        entries[part][path] = (down, up, alpha)
    if unknown:
        raise LoraLabError(
            f"{source}: {len(unknown)} LoRA layers match no layer of this base model (first: {unknown[0]}); "
            f"{_arch_hint(unknown, unet)}"
        )
    if not any(entries.values()):
        raise LoraLabError(f"{source}: no kohya LoRA weights found (keys like lora_unet_....lora_down.weight)")
    return entries


def placed_layers(unet, text_encoder, tensors: Dict[str, torch.Tensor], source: str = "LoRA file"
                  ) -> Dict[torch.nn.Module, tuple]:
    """A kohya LoRA as ``{layer: (down, up, alpha / rank)}`` on the model's own layers (a peft
    wrapper where a training adapter sits), each weight shaped as the layer computes it: down
    ``(rank, in)`` or ``(rank, in, kh, kw)``, up ``(out, rank)`` or ``(out, rank, 1, 1)``; for
    :class:`lora_lab.lora.strengths.SampleStrengths` without any peft adapter."""
    modules = _part_modules(unet, text_encoder)
    out = {}
    for part, layers in place(unet, text_encoder, tensors, source).items():
        for path, (down, up, alpha) in layers.items():
            layer = modules[part].get_submodule(path)
            base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
            weight = base.weight
            dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype  # as peft keeps it
            rank = down.shape[0]
            if isinstance(base, torch.nn.Conv2d):
                down = down.reshape(rank, weight.shape[1], *base.kernel_size)
                up = up.reshape(weight.shape[0], rank, 1, 1)
            else:
                down, up = down.reshape(rank, weight.shape[1]), up.reshape(weight.shape[0], rank)
            out[layer] = (down.to(weight.device, dtype), up.to(weight.device, dtype), alpha / rank)
    return out


def load_into(unet, text_encoder, tensors: Dict[str, torch.Tensor], source: str = "LoRA file",
              adapter: str = adapters.EVAL_ADAPTER) -> None:
    """Put a kohya LoRA into the models as the only active peft adapter (strength 1), reusing
    the adapter already there when its layers, ranks and alphas match (a hot swap between
    epochs). A training adapter, if any, stays in place, inactive, until :func:`unload`.

    Raises:
        LoraLabError: when keys match no layer of this base model (another architecture).
    """
    entries = place(unet, text_encoder, tensors, source)
    for part, module in _part_modules(unet, text_encoder).items():
        wanted = entries[part]
        layers = dict(adapters.lora_layers(module, adapter))
        current = {name: (layer.r[adapter], float(layer.lora_alpha[adapter])) for name, layer in layers.items()}
        signature = {name: (d.shape[0], a) for name, (d, _, a) in wanted.items()}
        if current != signature:
            adapters.delete_adapter(module, adapter)
            if wanted:
                adapters.inject(module, adapters.config_for(wanted), adapter)
            layers = dict(adapters.lora_layers(module, adapter))
        adapters.activate(module, adapter)
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
