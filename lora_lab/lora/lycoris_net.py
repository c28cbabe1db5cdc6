"""LoHa, LoKr and DoRA training through LyCORIS itself (the ``lycoris-lora`` package, what kohya
users train them with: ``--network_module lycoris.kohya``), on the same layers as lora_lab's
LoRA, and their files in LyCORIS' own layout.

Why LyCORIS and not peft's ``LoHaConfig`` / ``LoKrConfig`` / ``use_dora``: A1111 and ComfyUI were
written against LyCORIS' files, and only LyCORIS trains DoRA with the magnitude per input
column (``wd_on_output=False``, ``dora_scale`` of shape (1, in)), the one DoRA file A1111 v1.10,
ComfyUI and LyCORIS all merge the same way (A1111 reads only that axis; ComfyUI normalises a
per-output ``dora_scale`` by the base weight's norm, LyCORIS and peft by the merged weight's).
Rendering never runs these modules: the saved file is read back like any other
(:mod:`lora_lab.lora.formats`), so the library only trains.

LyCORIS replaces each wrapped layer's ``forward``; the layer stays where it is in the model, its
weight untouched, and the trainable tensors live in a network beside the model, kept here per
wrapped module (:func:`networks_of`).
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import contextmanager
from typing import Dict, Iterator, List

import torch

from lora_lab.errors import TrainingError

LYCORIS_TYPES = ("loha", "lokr", "dora")
_ALGO = {"loha": "loha", "lokr": "lokr", "dora": "lora"}  # dora: LyCORIS' LoRA with weight decomposition
# A wrapped module (a UNet, a text encoder) holds (its LyCORIS network, {LyCORIS module name:
# module path}) under this attribute: a plain attribute, not a submodule, so the model's own
# parameters and state dict stay the base model's.
_ATTR = "_lora_lab_lycoris"


def _network_class():
    from lycoris import LycorisNetwork

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)  # its per-module INFO lines flood a sweep
    return LycorisNetwork


def network_args(cfg) -> Dict[str, str]:
    """``ss_network_args`` as LyCORIS' kohya wrapper records them: the ``--network_args``
    strings (algo, conv settings, factor, DoRA's flags)."""
    args = {"algo": _ALGO[cfg.network_type]}
    if cfg.conv_dim:
        args.update(conv_dim=str(cfg.conv_dim), conv_alpha=f"{cfg.conv_alpha:g}")
    if cfg.network_type == "lokr":
        args["factor"] = str(cfg.factor)
    if cfg.network_type == "dora":
        args.update(dora_wd="True", wd_on_output="False")
    return args


def check_factor(module: torch.nn.Module, names: List[str], factor: int, part: str) -> None:
    """LoKr splits each layer's input and output sizes into two factors; LyCORIS silently picks
    another split when ``factor`` does not divide a size, so that is refused here, naming the layer."""
    if factor == -1:
        return
    for name in names:
        layer = module.get_submodule(name)
        sizes = (layer.in_features, layer.out_features) if isinstance(layer, torch.nn.Linear) \
            else (layer.in_channels // layer.groups, layer.out_channels)
        bad = [s for s in sizes if s % factor]
        if bad:
            raise TrainingError(
                f"train.factor={factor} does not divide {part} layer {name} (in {sizes[0]}, out {sizes[1]}); "
                "allowed: -1 (LyCORIS' balanced split) or a number that divides every trained layer's "
                f"input and output size (here: {', '.join(map(str, _common_divisors(module, names)))})")


def _common_divisors(module, names) -> List[int]:
    sizes = []
    for name in names:
        layer = module.get_submodule(name)
        sizes += [layer.in_features, layer.out_features] if isinstance(layer, torch.nn.Linear) \
            else [layer.in_channels // layer.groups, layer.out_channels]
    smallest = min(sizes)
    return [-1] + [d for d in range(2, smallest + 1) if all(s % d == 0 for s in sizes)]


def attach(module: torch.nn.Module, names: List[str], cfg, *, conv: bool, prefix: str) -> List[torch.nn.Parameter]:
    """Wrap the layers ``names`` of ``module`` with a fresh LyCORIS network of ``cfg.network_type``
    (fp32, on the module's device) and return its trainable parameters."""
    Network = _network_class()
    Network.apply_preset({
        "enable_conv": conv, "target_module": [], "target_name": [f"^{re.escape(n)}$" for n in names],
        "module_algo_map": {}, "name_algo_map": {}, "lora_prefix": prefix, "use_fnmatch": False,
        "exclude_name": [],
    })
    net = Network(
        module, multiplier=1.0, lora_dim=cfg.network_dim, alpha=cfg.network_alpha,
        conv_lora_dim=cfg.conv_dim if conv else 0, conv_alpha=cfg.conv_alpha,
        network_module=_ALGO[cfg.network_type], factor=cfg.factor,
        weight_decompose=cfg.network_type == "dora", wd_on_out=False,
        warn_on_unmatched=False,
    )
    by_layer = {id(module.get_submodule(n)): n for n in names}
    paths = {lora.lora_name: by_layer[id(lora.org_module[0])] for lora in net.loras}
    if len(paths) != len(names):
        missing = sorted(set(names) - set(paths.values()))
        raise TrainingError(f"LyCORIS wrapped {len(paths)} of {len(names)} layers (first left out: {missing[0]})")
    net.apply_to()
    weight = next(module.parameters())
    net.to(device=weight.device, dtype=torch.float32)
    module.__dict__[_ATTR] = (net, paths)
    params = list(net.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def networks_of(module: torch.nn.Module):
    return None if module is None else module.__dict__.get(_ATTR)


def detach(module: torch.nn.Module) -> None:
    """Unwrap every layer: the module runs its own forward again."""
    found = module.__dict__.pop(_ATTR, None)
    if found is not None:
        found[0].restore()


@contextmanager
def paused(modules) -> Iterator[None]:
    """The LyCORIS networks on ``modules`` unwrapped (the base model's own forward), then rewrapped."""
    nets = [found[0] for m in modules for found in [networks_of(m)] if found is not None]
    for net in nets:
        net.restore()
    try:
        yield
    finally:
        for net in nets:
            for lora in net.loras:
                lora.apply_to()


def state_dict(module: torch.nn.Module, kohya_name) -> Dict[str, torch.Tensor]:
    """The network on ``module`` in LyCORIS' file layout, each layer under ``kohya_name(path)``
    (kohya's name for the layer: SDXL's SGM paths, ``text_model`` kept): ``hada_w1_a`` ...,
    ``lokr_w1`` ..., or ``lora_down`` / ``lora_up`` with ``dora_scale``, and ``alpha``."""
    found = networks_of(module)
    if found is None:
        return {}
    net, paths = found
    out: Dict[str, torch.Tensor] = {}
    for key, value in net.state_dict().items():
        lora_name, _, field = key.partition(".")
        out[f"{kohya_name(paths[lora_name])}.{field}"] = value.detach().float().cpu().clone()
    return out


def recorded_args(meta: Dict[str, str]) -> Dict[str, str]:
    """A file's ``ss_network_args`` (kohya's and LyCORIS' JSON of strings); {} when absent or unreadable."""
    raw = meta.get("ss_network_args")
    try:
        args = json.loads(raw) if raw and raw != "None" else {}
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in args.items()} if isinstance(args, dict) else {}
