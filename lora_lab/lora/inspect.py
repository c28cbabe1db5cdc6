"""``python -m lora_lab.inspect FILE [--base MODEL]``: what a LoRA file is and who will use it.

It prints the format (detected from the keys), rank and alpha per block, the base model the
file was made for, its training metadata as kohya's ``ss_*`` fields and the model-spec keys say
it, which of its keys A1111, ComfyUI and diffusers would apply or ignore (by the formats each
tool reads; with ``--base``, also by whether each key names a layer of that model), and the
warnings a user needs: alpha missing, base model version mismatch, NaN or all-zero weights.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import torch

from lora_lab.errors import LoraLabError
from lora_lab.lora import formats as lora_formats
from lora_lab.lora import kohya as kohya_io

# The formats each tool reads, from their documentation and loaders: A1111's built-in Lora
# extension (1.5+) and ComfyUI read kohya LoRA / LoCon and LyCORIS LoHa / LoKr (and DoRA);
# diffusers' load_lora_weights reads kohya LoRA / LoCon and its own PEFT files, not LoHa or
# LoKr, and drops DoRA's magnitude vectors.
TOOLS = {
    "A1111": {"kohya", "diffusers", "loha", "lokr", "dora"},
    "ComfyUI": {"kohya", "diffusers", "loha", "lokr", "dora"},
    "diffusers": {"kohya", "diffusers"},
}
SS_FIELDS = ("ss_output_name", "ss_sd_model_name", "ss_base_model_version", "ss_network_module", "ss_network_dim",
             "ss_network_alpha", "ss_network_args", "ss_epoch", "ss_num_epochs", "ss_steps", "ss_max_train_steps",
             "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_lr_scheduler", "ss_optimizer",
             "ss_resolution", "ss_num_train_images", "ss_batch_size_per_device", "ss_mixed_precision", "ss_seed",
             "ss_clip_skip", "ss_training_started_at", "ss_training_finished_at")
_CROSS_DIM = {768: "sd_v1", 1024: "sd_v2", 2048: "sdxl_base_v1-0"}


def _module(key: str) -> str:
    return key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0]


def _block(module: str) -> str:
    """A readable block name: lora_unet_down_blocks_1 ..., lora_te, lora_te1 ..."""
    m = re.match(r"^(lora_unet_(?:down_blocks|up_blocks|input_blocks|output_blocks)_\d+|lora_unet_mid_block|"
                 r"lora_unet_middle_block|lora_te\d?|lora_unet)", module)
    if m:
        return m.group(1)
    return module.split(".")[0] if "." in module else module


def base_version(tensors: Dict[str, torch.Tensor], meta: Dict[str, str]) -> Optional[str]:
    """The base model the file was made for: its metadata, else the cross-attention width of a
    ``to_k`` layer (768 SD 1.x, 1024 SD 2.x, 2048 SDXL) or SDXL's two text encoders."""
    if meta.get("ss_base_model_version"):
        return meta["ss_base_model_version"]
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in tensors):
        return "sdxl_base_v1-0"
    for key, value in tensors.items():
        if "attn2_to_k" in key.replace(".", "_") and key.endswith((".lora_down.weight", ".lora_A.weight")):
            return _CROSS_DIM.get(value.shape[1])
    return None


def inspect(path: Path, base=None) -> dict:
    """Everything ``lora_lab.inspect`` prints, as a dict (``base``: a loaded BaseModel or None)."""
    tensors, meta = kohya_io.read_kohya(path)
    fmt = lora_formats.detect(tensors)
    modules: Dict[str, Dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in tensors.items():
        modules[_module(key)][key[len(_module(key)) + 1:]] = value
    blocks: Dict[str, dict] = defaultdict(lambda: {"modules": 0, "ranks": set(), "alphas": set()})
    no_alpha = []
    for name, fields in modules.items():
        b = blocks[_block(name)]
        b["modules"] += 1
        rank = _rank(fields)
        if rank is not None:
            b["ranks"].add(rank)
        if "alpha" in fields:
            b["alphas"].add(float(fields["alpha"]))
        elif fmt in ("kohya", "loha", "lokr", "dora"):
            no_alpha.append(name)
    warnings: List[str] = []
    if no_alpha:
        warnings.append(f"{len(no_alpha)} modules have no alpha (first: {no_alpha[0]}): every tool then uses "
                        "alpha = rank (scale 1), which may not be what it was trained with")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        warnings.append(f"{len(bad)} tensors hold NaN or infinite values (first: {bad[0]}): the file is broken")
    zero = [k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1 and not v.any()]
    if zero and len(zero) * 2 >= len([k for k in tensors if not k.endswith(".alpha")]):
        warnings.append(f"{len(zero)} weight tensors are all zero (first: {zero[0]}): the LoRA changes little or "
                        "nothing (an untrained or failed run?)")
    version = base_version(tensors, meta)
    tools = {tool: {"applies": len(modules) if fmt in formats else 0,
                    "ignores": 0 if fmt in formats else len(modules)} for tool, formats in TOOLS.items()}
    if fmt == "dora":
        tools["diffusers"] = {"applies": len(modules), "ignores": 0,
                              "note": "loads the LoRA part and drops every dora_scale (the magnitude)"}
    unmatched: List[str] = []
    if base is not None:
        if version and base.base_version and not _same_family(version, base.base_version):
            warnings.append(f"made for {version}, but the base model is {base.base_version}")
        try:
            kohya, _ = lora_formats.to_kohya(tensors, meta, str(path))
        except LoraLabError:
            kohya = tensors
        index = kohya_io.module_index(base.unet, base.text_encoders)
        for key in kohya:
            if key.endswith(".lora_down.weight"):
                name = key[: -len(".lora_down.weight")]
                if kohya_io.lookup(name, index) not in index:
                    unmatched.append(name)
        if unmatched:
            warnings.append(f"{len(unmatched)} modules name no layer of this base model (first: {unmatched[0]}): "
                            "every tool skips them")
            for t in tools.values():
                moved = min(t["applies"], len(unmatched))
                t["applies"] -= moved
                t["ignores"] += moved
    training = {k: meta[k] for k in SS_FIELDS if k in meta}
    training.update({k: v for k, v in meta.items() if k.startswith("modelspec.") and k != "modelspec.thumbnail"})
    return {"file": str(path), "format": fmt, "network": network_of(fmt, modules, meta),
            "modules": len(modules), "tensors": len(tensors),
            "base_model_version": version,
            "blocks": {name: {"modules": b["modules"], "rank": sorted(b["ranks"]), "alpha": sorted(b["alphas"])}
                       for name, b in sorted(blocks.items())},
            "training": training, "tools": tools, "unmatched": unmatched, "warnings": warnings}


def network_of(fmt: str, modules: Dict[str, Dict[str, torch.Tensor]], meta: Dict[str, str]) -> dict:
    """The network type, read from the keys (lora, locon, loha, lokr, dora), what trained it and
    its settings: ``ss_network_args`` as written, else what the tensors show (conv layers, LoKr's
    Kronecker split)."""
    from lora_lab.lora.lycoris_net import recorded_args

    conv = any(v.dim() == 4 and v.shape[-1] > 1 for f in modules.values() for k, v in f.items()
               if k in ("lora_down.weight", "hada_w1_b", "lokr_w2", "lora_A.weight"))
    kind = {"loha": "loha", "lokr": "lokr", "dora": "dora"}.get(fmt, "locon" if conv else "lora")
    settings = recorded_args(meta)
    for key in ("ss_network_dim", "ss_network_alpha"):
        if key in meta:
            settings.setdefault(key[len("ss_network_"):], meta[key])
    if kind == "lokr" and "factor" not in settings:
        splits = sorted({tuple(f["lokr_w1"].shape) if "lokr_w1" in f else (f["lokr_w1_a"].shape[0], f["lokr_w1_b"].shape[1])
                         for f in modules.values() if "lokr_w1" in f or "lokr_w1_a" in f})
        settings["w1 shapes"] = ", ".join(f"{a}x{b}" for a, b in splits[:4])
    trainer = meta.get("ss_network_module") or "unknown (no ss_network_module)"
    return {"type": kind, "trained_with": trainer, "settings": settings}


def _rank(fields: Dict[str, torch.Tensor]) -> Optional[int]:
    for key in ("lora_down.weight", "lora_A.weight", "hada_w1_b", "lokr_w2_b", "lokr_w1_b", "lora.down.weight"):
        if key in fields:
            return int(fields[key].shape[0])
    return None


def _same_family(a: str, b: str) -> bool:
    def family(v: str) -> str:
        return "sdxl" if "xl" in v else "sd_v2" if "v2" in v else "sd_v1"

    return family(a) == family(b)


def render(info: dict) -> str:
    """The printed form."""
    net = info["network"]
    settings = "; " + ", ".join(f"{k} {v}" for k, v in net["settings"].items()) if net["settings"] else ""
    lines = [f"{info['file']}", f"format: {info['format']}, {info['modules']} modules, {info['tensors']} tensors",
             f"network: {net['type']}, trained with {net['trained_with']}{settings}",
             f"made for: {info['base_model_version'] or 'unknown (no metadata, no cross-attention layer)'}", "blocks:"]
    for name, b in info["blocks"].items():
        ranks = ", ".join(map(str, b["rank"])) or "-"
        alphas = ", ".join(f"{a:g}" for a in b["alpha"]) or "none"
        lines.append(f"  {name:<34} {b['modules']:>4} modules  rank {ranks:<8} alpha {alphas}")
    if info["training"]:
        lines.append("training (from the file's metadata):")
        lines += [f"  {k} = {v if len(v) < 120 else v[:117] + '...'}" for k, v in info["training"].items()]
    lines.append("tools:")
    for tool, t in info["tools"].items():
        note = f" ({t['note']})" if t.get("note") else ""
        lines.append(f"  {tool:<10} applies {t['applies']} modules, ignores {t['ignores']}{note}")
    lines += [f"warning: {w}" for w in info["warnings"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_lab.inspect", description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, help="a LoRA .safetensors file")
    parser.add_argument("--base", help="a base model to check the keys against: model=NAME style config name "
                                       "(sd15, tiny ...) or a path, as model.pretrained takes it")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    parser.add_argument("--cache-dir", default="sweeps/.cache")
    args = parser.parse_args(argv)
    try:
        base = _load_base(args.base, Path(args.cache_dir)) if args.base else None
        info = inspect(args.file, base)
    except LoraLabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0


def _load_base(spec: str, cache_dir: Path):
    import torch as _torch

    from lora_lab.cli import compose
    from lora_lab.config import conf_dir
    from lora_lab.models.base import load_base

    config_names = {p.stem for p in (conf_dir() / "model").glob("*.yaml")}
    if spec in config_names:
        overrides = [f"model={spec}"]
    else:  # a single file says its architecture in its keys; a folder or hub id: SD 1.x unless XL
        from lora_lab.models.sdxl import single_file_arch

        path = Path(spec).expanduser()
        arch = single_file_arch(path) if path.is_file() and path.suffix == ".safetensors" else None
        index = path / "model_index.json"
        if arch is None and index.is_file() and "XL" in index.read_text(encoding="utf-8"):
            arch = "sdxl"
        model = {"sdxl": "sdxl", "sd2": "sd21"}.get(arch, "sd15")
        overrides = [f"model={model}", f"model.pretrained={spec}"]
    cfg = compose(overrides + [f"cache_dir={cache_dir}"])
    return load_base(cfg.model, cache_dir, _torch.device("cpu"))


if __name__ == "__main__":
    sys.exit(main())
