"""LoRA files from other tools, detected from their keys and turned into kohya LoRA tensors.

- kohya LoRA / LoCon (``lora_unet_...lora_down.weight``): as they are; a Tucker core
  (``lora_mid``) is folded into the down kernel.
- diffusers / PEFT (``unet.<module path>.lora_A.weight``, ``text_encoder....lora_B.weight``,
  diffusers' older ``...processor.to_q_lora.down.weight`` and ``....lora.down.weight``):
  renamed; alpha from diffusers' ``lora_adapter_metadata`` when present, else the rank (scale
  1, what diffusers' training scripts train with).
- LyCORIS LoHa (``hada_w1_a`` ...) and LoKr (``lokr_w1`` ...), with or without Tucker cores:
  the weight change is computed with the formula ComfyUI applies, then written as an exact
  full-rank LoRA (``down`` = the change, ``up`` = identity, alpha = rank), so every strength
  scales it exactly as the UIs do. Such files render at about the cost of a second copy of
  the layers they touch.
- DoRA (kohya / LyCORIS LoRA with ``dora_scale``): needs the base model's weights, so
  :func:`dora_to_kohya` runs once the base is loaded; the merged weight is ComfyUI's
  (``(W + dW) * dora_scale / norm``, norm per input column, or per output row of ``W`` when
  ``dora_scale`` runs along the output axis) and a strength s moves W by s times the
  difference, as ComfyUI and A1111 apply it: an exact full-rank change again.
"""

from __future__ import annotations

import json
import re
from typing import Dict, Tuple

import torch

from lora_lab.errors import LoraLabError

KOHYA, DIFFUSERS, LOHA, LOKR = "kohya", "diffusers", "loha", "lokr"
DORA = "dora"
FULL_RANK = (LOHA, LOKR, DORA)  # converted to a full-rank LoRA: rendered one file at a time


def detect(tensors: Dict[str, torch.Tensor]) -> str:
    """The format of a LoRA state dict, from its keys."""
    keys = list(tensors)
    if any(k.endswith(".dora_scale") for k in keys):
        return "dora"
    if any(".hada_w1_a" in k for k in keys):
        return LOHA
    if any(".lokr_w1" in k for k in keys):
        return LOKR
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) and k.endswith(".lora_down.weight")
           for k in keys):
        return KOHYA
    if any(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) and (".lora_A." in k or ".lora.down." in k or "_lora.down." in k
                                                          or ".lora_linear_layer.down." in k) for k in keys):
        return DIFFUSERS
    return "unknown"


def to_kohya(tensors: Dict[str, torch.Tensor], meta: Dict[str, str], source: str) -> Tuple[Dict[str, torch.Tensor], str]:
    """(kohya LoRA tensors, the format they came from) for any supported file."""
    fmt = detect(tensors)
    if fmt == KOHYA:
        return fold_tucker(tensors), fmt
    if fmt == DIFFUSERS:
        return _from_diffusers(tensors, meta), fmt
    if fmt == DORA:
        return tensors, fmt  # converted by dora_to_kohya once the base model's weights are at hand
    if fmt in (LOHA, LOKR):
        return _from_lycoris(tensors, fmt, source), fmt
    raise LoraLabError(f"{source}: no LoRA weights this tool knows (keys like {next(iter(tensors), 'none')}); "
                       "allowed: kohya LoRA / LoCon, diffusers / PEFT LoRA, LyCORIS LoHa and LoKr, DoRA")


def fold_tucker(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """kohya LoCon with a Tucker core (``lora_mid``: rank x rank x k x k between a 1x1 down and
    a 1x1 up) as a plain LoRA: the core folded into the down kernel, ``down'[a, i] = sum_b
    mid[a, b] * down[b, i]``, which gives the weight change ComfyUI computes, exactly."""
    mids = [k for k in tensors if k.endswith(".lora_mid.weight")]
    if not mids:
        return tensors
    out = dict(tensors)
    for key in mids:
        name = key[: -len(".lora_mid.weight")]
        mid, down = out.pop(key).float(), tensors[f"{name}.lora_down.weight"].float()
        out[f"{name}.lora_down.weight"] = torch.einsum("abhw,bi->aihw", mid, down.reshape(down.shape[0], -1))
    return out


# diffusers' older attention-processor names -> the module they wrap
_PROCESSOR = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}


def _from_diffusers(tensors: Dict[str, torch.Tensor], meta: Dict[str, str]) -> Dict[str, torch.Tensor]:
    alphas = _diffusers_alphas(meta)
    pairs: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = re.match(r"^(unet|text_encoder_2|text_encoder)\.(.+?)\.(?:lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down|"
                     r"lora_linear_layer\.up)\.weight$", key)
        m2 = re.match(r"^(unet)\.(.+)\.processor\.(to_q_lora|to_k_lora|to_v_lora|to_out_lora)\.(down|up)\.weight$", key)
        if m2:
            part, path, which = m2.group(1), f"{m2.group(2)}.{_PROCESSOR[m2.group(3)]}", m2.group(4)
        elif m:
            part, path = m.group(1), m.group(2)
            which = "down" if (".lora_A." in key or ".down." in key) else "up"
        else:  # nothing is dropped silently: a key we cannot place stops the evaluation
            raise LoraLabError(f"diffusers LoRA: key {key} names no UNet or text-encoder LoRA weight lora_lab "
                               "can place (another model's LoRA?)")
        pairs.setdefault(f"{part}.{path}", {})[which] = value
    out: Dict[str, torch.Tensor] = {}
    for name, pair in pairs.items():
        part, path = name.split(".", 1)
        if set(pair) != {"down", "up"}:
            raise LoraLabError(f"diffusers LoRA: {name} has {' and '.join(pair)} weights only")
        prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}[part]
        if part != "unet" and not path.startswith("text_model."):  # transformers 5 names CLIPTextModel's
            path = "text_model." + path  # layers without text_model; kohya's names keep it
        kohya = prefix + path.replace(".", "_")
        rank = pair["down"].shape[0]
        out[f"{kohya}.lora_down.weight"] = pair["down"]
        out[f"{kohya}.lora_up.weight"] = pair["up"]
        out[f"{kohya}.alpha"] = torch.tensor(float(_alpha_for(alphas, part, path, rank)))
    return out


def _diffusers_alphas(meta: Dict[str, str]) -> dict:
    raw = meta.get("lora_adapter_metadata")
    return json.loads(raw) if raw else {}


def _alpha_for(alphas: dict, part: str, path: str, rank: int) -> float:
    """peft's alpha for a module: its alpha_pattern entry, else lora_alpha, else the rank."""
    for pattern, value in (alphas.get(f"{part}.alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){re.escape(pattern)}$", path) or re.fullmatch(pattern, path):
            return float(value)
    return float(alphas.get(f"{part}.lora_alpha", rank))


def loha_delta(w: Dict[str, torch.Tensor], alpha) -> torch.Tensor:
    """LoHa's weight change: ((w1a w1b) * (w2a w2b)) * alpha / rank, with Tucker cores rebuilt
    as ComfyUI does; rank = w1b's first dimension; no alpha: scale 1."""
    w1a, w1b, w2a, w2b = (w[k].float() for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    scale = float(alpha) / w1b.shape[0] if alpha is not None else 1.0
    if "hada_t1" in w:
        m1 = torch.einsum("i j k l, j r, i p -> p r k l", w["hada_t1"].float(), w1b, w1a)
        m2 = torch.einsum("i j k l, j r, i p -> p r k l", w["hada_t2"].float(), w2b, w2a)
    else:
        m1, m2 = w1a @ w1b, w2a @ w2b
    return m1 * m2 * scale


def lokr_delta(w: Dict[str, torch.Tensor], alpha) -> torch.Tensor:
    """LoKr's weight change: kron(w1, w2) * alpha / rank, each factor whole or a product
    (w2 optionally with a Tucker core); rank from the factored one (w2's if both are); no alpha
    or no factored matrix: scale 1 (ComfyUI's rule)."""
    dim = None
    if "lokr_w1" in w:
        w1 = w["lokr_w1"].float()
    else:
        w1 = w["lokr_w1_a"].float() @ w["lokr_w1_b"].float()
        dim = w["lokr_w1_b"].shape[0]
    if "lokr_w2" in w:
        w2 = w["lokr_w2"].float()
    else:
        dim = w["lokr_w2_b"].shape[0]
        if "lokr_t2" in w:
            w2 = torch.einsum("i j k l, j r, i p -> p r k l", w["lokr_t2"].float(), w["lokr_w2_b"].float(),
                              w["lokr_w2_a"].float())
        else:
            w2 = w["lokr_w2_a"].float() @ w["lokr_w2_b"].float()
    if w2.dim() == 4 and w1.dim() == 2:
        w1 = w1[:, :, None, None]
    scale = float(alpha) / dim if alpha is not None and dim is not None else 1.0
    return torch.kron(w1, w2) * scale


def _from_lycoris(tensors: Dict[str, torch.Tensor], fmt: str, source: str) -> Dict[str, torch.Tensor]:
    modules: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, field = key.rpartition(".")
        modules.setdefault(name, {})[field] = value
    out: Dict[str, torch.Tensor] = {}
    for name, w in modules.items():
        alpha = w.get("alpha")
        try:
            delta = loha_delta(w, alpha) if fmt == LOHA else lokr_delta(w, alpha)
        except KeyError as exc:
            raise LoraLabError(f"{source}: {name} lacks {exc.args[0]} ({fmt} file)") from None
        out.update(full_rank(name, delta))
    return out


def full_rank(name: str, delta: torch.Tensor) -> Dict[str, torch.Tensor]:
    """A weight change as an exact kohya LoRA: down = the change (rank = output channels),
    up = identity, alpha = rank. A conv change keeps its kernel in ``down``; ``up`` is 1x1."""
    out_ch = delta.shape[0]
    eye = torch.eye(out_ch)
    up = eye if delta.dim() == 2 else eye[:, :, None, None]
    return {f"{name}.lora_down.weight": delta.contiguous(), f"{name}.lora_up.weight": up,
            f"{name}.alpha": torch.tensor(float(out_ch))}


def dora_delta(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, alpha, dora_scale: torch.Tensor):
    """DoRA's weight change at strength 1, as ComfyUI merges it: W' = (W + dW) * m / norm, where
    dW = up @ down * alpha / rank, m = dora_scale, and the norm is taken per input column of
    W + dW (kohya / LyCORIS' default), or per output row of W when m runs along the output axis."""
    w = weight.float()
    rank = down.shape[0]
    scale = float(alpha) / rank if alpha is not None else 1.0
    dw = (up.float().reshape(up.shape[0], -1) @ down.float().reshape(rank, -1)).reshape(w.shape) * scale
    merged = w + dw
    m = dora_scale.float()
    if m.shape[0] == w.shape[0] and m.shape[0] != 1:
        norm = w.reshape(w.shape[0], -1).norm(dim=1, keepdim=True).reshape(w.shape[0], *[1] * (w.dim() - 1))
    else:
        norm = (merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(merged.shape[1], *[1] * (merged.dim() - 1)).transpose(0, 1))
    norm = norm + torch.finfo(w.dtype).eps
    return merged * (m.reshape(norm.shape) if m.numel() == norm.numel() else m) / norm - w


def dora_to_kohya(tensors: Dict[str, torch.Tensor], weight_of, source: str) -> Dict[str, torch.Tensor]:
    """A DoRA file as kohya tensors: each ``dora_scale`` module as its exact full-rank change
    against the base weight ``weight_of(module name)`` (None: no such layer), others as they are."""
    out: Dict[str, torch.Tensor] = {}
    for key in tensors:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        down, up = tensors[key], tensors.get(f"{name}.lora_up.weight")
        alpha = tensors.get(f"{name}.alpha")
        if up is None:
            raise LoraLabError(f"{source}: {name} has lora_down but no lora_up weight")
        if f"{name}.dora_scale" not in tensors:
            out.update({key: down, f"{name}.lora_up.weight": up})
            if alpha is not None:
                out[f"{name}.alpha"] = alpha
            continue
        weight = weight_of(name)
        if weight is None:
            raise LoraLabError(f"{source}: 1 LoRA layers match no layer of this base model (first: {name})")
        out.update(full_rank(name, dora_delta(weight, down, up, alpha, tensors[f"{name}.dora_scale"])))
    return out
