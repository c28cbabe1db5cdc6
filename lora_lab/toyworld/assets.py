"""The toy world's shipped weights (``lora_lab/toyworld/weights``) as things lora_lab loads:

- :func:`model_folder`: a diffusers folder (unet, vae, text_encoder, tokenizer, scheduler)
  built once under ``cache_dir/models`` and then loaded by the same code as any local folder;
- :func:`clip_checkpoint`: the open_clip checkpoint, the CLIP scorer's
  ``lora-lab-toyworld-clip`` / ``lora_lab`` weights;
- :func:`load_readout`: the attribute read-out; :func:`load_readout2`: a second one, built and
  trained apart, to check the first on renders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from lora_lab.errors import ModelError
from lora_lab.files import publish_dir
from lora_lab.toyworld import nets

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_ENV = "LORA_LAB_TOYWORLD_WEIGHTS"
CLIP_TAG = "toyworld"  # the name provide.clip_weights is registered under


def weights_dir() -> Path:
    """The shipped weights, or the folder named by $LORA_LAB_TOYWORLD_WEIGHTS (weights made
    with ``pretrain --weights DIR``)."""
    return Path(os.environ.get(WEIGHTS_ENV) or WEIGHTS_DIR)


def manifest(weights: Optional[Path] = None) -> dict:
    path = Path(weights or weights_dir()) / "manifest.json"
    if not path.exists():
        raise ModelError(f"toy world weights: {path} is missing; make them with "
                         "`python -m lora_lab.toyworld.pretrain` (about 90 minutes on 2 CPU cores)")
    return json.loads(path.read_text(encoding="utf-8"))


def load_state(name: str, weights: Optional[Path] = None) -> Dict[str, torch.Tensor]:
    """One shipped state dict (stored in float16), as float32."""
    from safetensors.torch import load_file

    manifest(weights)
    path = Path(weights or weights_dir()) / f"{name}.safetensors"
    return {k: v.float() if v.dtype == torch.float16 else v for k, v in load_file(str(path)).items()}


def clip_checkpoint(weights: Optional[Path] = None) -> Path:
    manifest(weights)
    return Path(weights or weights_dir()) / "clip.safetensors"


def model_folder(cache_dir: Path, weights: Optional[Path] = None) -> Path:
    """The toy world's SD-shaped model as a diffusers folder; rebuilt when the weights change."""
    info = manifest(weights)
    key = "".join(sorted(info["files"].values()))
    import hashlib

    digest = hashlib.sha256(key.encode()).hexdigest()[:12]

    def build(folder: Path) -> None:
        import shutil

        from diffusers import StableDiffusionPipeline
        from transformers import CLIPTokenizer

        from lora_lab.models.builtin import write_clip_tokenizer

        vae = nets.make_vae()
        vae.load_state_dict(load_state("vae", weights))
        vae.register_to_config(scaling_factor=info["vae_scaling_factor"])
        unet = nets.make_unet()
        unet.load_state_dict(load_state("unet", weights))
        text_encoder = nets.text_encoder_from_state(load_state("text_encoder", weights),
                                                    load_state("clip", weights)["token_embedding.weight"])
        write_clip_tokenizer(folder / "_tokenizer_src")
        tokenizer = CLIPTokenizer.from_pretrained(folder / "_tokenizer_src")
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=nets.make_scheduler(), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(folder, safe_serialization=True)
        shutil.rmtree(folder / "_tokenizer_src")

    return publish_dir(Path(cache_dir) / "models" / f"toyworld-{digest}", build, "model_index.json")


def load_readout(weights: Optional[Path] = None) -> nets.ReadOut:
    model = nets.ReadOut()
    model.load_state_dict(load_state("readout", weights))
    return model.eval()


def load_readout2(weights: Optional[Path] = None) -> nets.ReadOutB:
    """The second read-out, trained apart (:mod:`lora_lab.toyworld.pretrain_readout2`)."""
    path = Path(weights or weights_dir()) / "readout2.safetensors"
    if not path.exists():
        raise ModelError(f"toy world weights: {path} is missing; make it with "
                         "`python -m lora_lab.toyworld.pretrain_readout2` (about 12 minutes on 2 CPU cores)")
    from safetensors.torch import load_file

    model = nets.ReadOutB()
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval()


@torch.no_grad()
def read(model: nets.ReadOut, images: Sequence) -> List[dict]:
    """The attributes the read-out sees in each PIL image (values as in :mod:`world`)."""
    out = model(nets.to_tensor(images))
    picks = {name: logits.argmax(dim=-1).tolist() for name, logits in out.items()}
    return [{name: nets.HEADS[name][picks[name][i]] for name in nets.HEADS} for i in range(len(images))]
