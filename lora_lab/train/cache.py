"""Content-keyed caches of VAE latents and text embeddings, on disk, shared by every run.

A latent is keyed by (image bytes, bucket, resized size, crop, mirroring, VAE weights); a text embedding by
(caption, clip_skip, text-encoder weights, tokenizer). Keys never depend on loop position, so
a shuffled loader can never pair an image with another one's caption (diffusers #14430).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from lora_lab.data.buckets import Placement, Size
from lora_lab.data.dataset import Sample, load_image
from lora_lab.files import atomic_save

CROP_RULE = "cover-resize+center-crop/v2"  # the crop itself is in the key (bucket, size, offset)


def _key(*parts: object) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()


def _path(root: Path, kind: str, key: str) -> Path:
    return root / kind / key[:2] / f"{key}.safetensors"


def image_tensor(sample: Sample, target, flip: bool = False) -> torch.Tensor:
    """The image as a (3, H, W) tensor in [-1, 1], as the VAE expects (``target``: a
    :class:`lora_lab.buckets.Placement` or a square resolution)."""
    import numpy as np

    im = load_image(sample.path, target, flip)
    arr = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1)
    return arr / 127.5 - 1.0


def _latent_key(sample: Sample, p: Placement, flip: bool, vae_id: str) -> str:
    return _key(sample.id, p.bucket, p.resized, p.crop, CROP_RULE, flip, vae_id)


@torch.no_grad()
def cache_latents(samples: Iterable[Sample], vae, placements: Dict[str, Placement], vae_id: str, root: Path,
                  batch_size: int = 8, flips: bool = False) -> Dict[Tuple[str, bool], torch.Tensor]:
    """VAE posterior parameters (mean and log-variance, stacked on dim 0) per (sample id,
    mirrored), keyed on disk by the image's content, its bucket, size and crop, the mirroring
    and the VAE, so a changed setting never reuses a wrong latent. ``flips``: also the mirrored
    image of every sample whose subset has flip_aug.

    Training draws a fresh latent from the posterior each step, as diffusers' scripts do.
    """
    unique = {s.id: s for s in samples}
    out: Dict[Tuple[str, bool], torch.Tensor] = {}
    todo: Dict[Size, List[Tuple[Sample, bool]]] = {}
    for sid, s in unique.items():
        for flip in ((False, True) if flips and s.options.flip_aug else (False,)):
            p = _path(root, "latents", _latent_key(s, placements[sid], flip, vae_id))
            if p.exists():
                out[(sid, flip)] = load_file(p)["parameters"]
            else:
                todo.setdefault(placements[sid].bucket, []).append((s, flip))
    device, dtype = vae.device, vae.dtype
    chunks = [items[i : i + batch_size] for items in todo.values() for i in range(0, len(items), batch_size)]
    for chunk in tqdm(chunks, desc="caching latents", disable=not chunks, leave=False):
        pixels = torch.stack([image_tensor(s, placements[s.id], flip) for s, flip in chunk]).to(device, dtype)
        params = vae.encode(pixels).latent_dist.parameters.float().cpu()
        check_latents(params, [s.path for s, _ in chunk], vae)
        for (s, flip), p in zip(chunk, params):
            atomic_save({"parameters": p}, _path(root, "latents", _latent_key(s, placements[s.id], flip, vae_id)))
            out[(s.id, flip)] = p
    return out


def check_latents(params: torch.Tensor, paths: List[Path], vae) -> None:
    """Stop when the VAE gave NaN or infinity, naming the image and the likely cause.

    Raises:
        TrainingError: naming the first image whose latent is not finite.
    """
    bad = [p for p, x in zip(paths, params) if not torch.isfinite(x).all()]
    if bad:
        from lora_lab.errors import TrainingError

        raise TrainingError(
            f"the VAE ({vae.dtype}) gave NaN for {bad[0]}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
            + "; SDXL's VAE overflows in fp16: keep it in fp32 (the default) or set model.vae to an "
            "fp16-safe VAE (e.g. madebyollin/sdxl-vae-fp16-fix)")


def encode_text(captions: List[str], tokenizer, text_encoder, clip_skip: int) -> torch.Tensor:
    """Text embeddings as SD's UNet sees them; ``clip_skip`` 2 = penultimate layer (kohya, A1111)."""
    ids = _ids(captions, tokenizer, text_encoder.device)
    if clip_skip == 1:
        return text_encoder(ids)[0]
    hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
    # transformers < 5 nests the layers under ``text_model``; 5.x flattened that level.
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)


def _ids(captions: List[str], tokenizer, device) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


def encode(captions: List[str], tokenizers: Tuple, text_encoders: Tuple, clip_skip: int
           ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(hidden states the UNet attends to, pooled embedding or None) for one text encoder or
    SDXL's two.

    SDXL (as SGM, kohya and diffusers encode it): each encoder's penultimate hidden states with
    no final layer norm (``clip_skip`` k takes layer -(k + 1)), concatenated on the feature axis,
    and the second encoder's projected pooled output.
    """
    if len(text_encoders) == 1:
        return encode_text(captions, tokenizers[0], text_encoders[0], clip_skip), None
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        out = encoder(_ids(captions, tokenizer, encoder.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-(clip_skip + 1)])
        pooled = out.text_embeds if hasattr(out, "text_embeds") else pooled
    if pooled is None:
        raise ValueError("SDXL's second text encoder must have a projection (CLIPTextModelWithProjection)")
    return torch.cat(hidden, dim=-1), pooled


@torch.no_grad()
def cache_text(captions: Iterable[str], tokenizers: Tuple, text_encoders: Tuple, clip_skip: int, te_id: str,
               root: Path, batch_size: int = 16) -> Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Text embeddings (and SDXL's pooled embedding) of frozen text encoders, per caption."""
    tok_id = "+".join(f"{t.__class__.__name__}/{len(t)}/{t.model_max_length}/{t.pad_token}" for t in tokenizers)
    unique = sorted(set(captions))
    out: Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
    todo = []
    for c in unique:
        p = _path(root, "text", _key(c, clip_skip, te_id, tok_id))
        if p.exists():
            saved = load_file(p)
            out[c] = (saved["embedding"], saved.get("pooled"))
        else:
            todo.append(c)
    for i in tqdm(range(0, len(todo), batch_size), desc="caching text", disable=not todo, leave=False):
        chunk = todo[i : i + batch_size]
        emb, pooled = encode(chunk, tokenizers, text_encoders, clip_skip)
        for j, c in enumerate(chunk):
            tensors = {"embedding": emb[j].float().cpu()}
            if pooled is not None:
                tensors["pooled"] = pooled[j].float().cpu()
            atomic_save(tensors, _path(root, "text", _key(c, clip_skip, te_id, tok_id)))
            out[c] = (tensors["embedding"], tensors.get("pooled"))
    return out
