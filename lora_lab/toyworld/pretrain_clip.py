"""The pretraining's CLIP stage: (drawing, caption) pairs with hard negative captions that change
one attribute, a caption bank per attribute, linear probes used in training only, and half of
each batch VAE round trips (the scorer is asked about generated images)."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Callable, List

import torch
import torch.nn.functional as F

from lora_lab.toyworld import nets, world

log = logging.getLogger("lora_lab.toyworld.pretrain")
from lora_lab.toyworld.pretrain_steps import TEXT_TOKENS, Plan, draw_records, stage_rng, train_stage


def encode_text_short(clip, ids: torch.Tensor) -> torch.Tensor:
    """open_clip's ``encode_text`` on the first :data:`TEXT_TOKENS` tokens: identical numbers for
    captions that end before that (the causal mask hides later tokens from earlier ones)."""
    n = TEXT_TOKENS
    if bool((ids[:, n:] != 0).any()):
        raise ValueError(f"a caption is longer than {n} tokens")
    ids = ids[:, :n]
    x = clip.token_embedding(ids) + clip.positional_embedding[:n]
    x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask[:n, :n]))
    x = x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ clip.text_projection
    return F.normalize(x, dim=-1)


def clip_pixels(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] pixels -> what open_clip's own preprocessing gives (OpenAI mean and std), so the
    CLIP scorer's ordinary transform feeds the model what it was trained on."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std


def _caption_group(a: world.Attributes, rng: random.Random, negatives: int) -> List[str]:
    """A caption of ``a`` (full or partial) and ``negatives`` distinct captions that each change
    one attribute it names; short captions that name too little are padded with other characters'."""
    text, fields, style = world.random_caption(a, rng)
    group = [text]
    for _ in range(20 * negatives):
        b = world.change_one(a, rng, fields, style)
        neg = world.caption(b) if fields == world.FIELDS else world.partial_caption(b, fields, style)
        if neg not in group:
            group.append(neg)
        if len(group) == 1 + negatives:
            return group
    while len(group) < 1 + negatives:
        neg = world.caption(world.sample(rng))
        if neg not in group:
            group.append(neg)
    return group


# One caption per value of an attribute: an image must pick its own among them.
ATTRIBUTE_BANK = {
    "hair_colour": [f"photo of a person with {v} hair" for v in world.VALUES["hair_colour"]],
    "hair_style": [f"photo of a person with {v} hair" for v in world.VALUES["hair_style"]],
    "eye_colour": [f"photo of a person with {v} eyes" for v in world.VALUES["eye_colour"]],
    "mark": ["photo of a person" if v == "none" else f"photo of a person, a {v} on the cheek"
             for v in world.VALUES["mark"]],
    "background": [f"photo of a person, on a {v} background" for v in world.VALUES["background"]],
}


# Attributes a caption names: the CLIP's image embedding must tell each of them apart.
CAPTIONED = ("hair_colour", "hair_style", "eye_colour", "mark", "glasses", "hat", "earrings", "background", "pattern")


class Probes(torch.nn.Module):
    """Linear heads on the CLIP's image embedding, one per :data:`CAPTIONED` attribute; used
    in training only and not shipped."""

    def __init__(self, dim: int):
        super().__init__()
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(dim, len(nets.HEADS[k])) for k in CAPTIONED})

    def loss(self, embedding: torch.Tensor, records) -> torch.Tensor:
        want = nets.targets(records)
        return sum(F.cross_entropy(head(embedding), want[k]) for k, head in self.heads.items()) / len(self.heads)


class ClipWithProbes(torch.nn.Module):
    def __init__(self, clip, probes: Probes):
        super().__init__()
        self.clip, self.probes = clip, probes


def _contrastive(plan: Plan, stage: str, clip, pixels: Callable, probes: Probes) -> Callable:
    """The CLIP loss of ``stage``: each image against every caption in the batch, including
    ``clip_negatives`` hard negatives per image that change one attribute, and each caption
    against every image; plus each image against :data:`ATTRIBUTE_BANK` (its own eye colour,
    mark, hair style ... among all values). In-batch pairs alone are told apart by colours;
    the hard negatives and the bank make the small features count. Plus the ``probes``'
    attribute loss on the image embedding: the bank alone cannot start a feature that neither
    tower has yet (the bank's captions for a star and a mole embed alike until the images do
    differ, so the gradient that would tell them apart is near zero; measured: a cheek mark
    stayed at chance for 2750 steps without the probes)."""
    tok = nets.clip_tokenizer()
    bank_texts = [t for texts in ATTRIBUTE_BANK.values() for t in texts]

    def loss_fn(step):
        rng = stage_rng(plan, stage, step)
        records = draw_records(rng, plan.clip_batch)
        texts, own = [], []
        for a in records:
            own.append(len(texts))
            texts += _caption_group(a, rng, plan.clip_negatives)
        embedding = clip.encode_image(pixels(records))
        img = F.normalize(embedding, dim=-1)
        txt = encode_text_short(clip, tok(texts + bank_texts))
        scale = clip.logit_scale.exp().clamp(max=100)
        own = torch.tensor(own)
        n = len(records)
        per_image = F.cross_entropy(scale * img @ txt[: len(texts)].T, own)
        per_text = F.cross_entropy(scale * txt[own] @ img.T, torch.arange(n))
        attribute, at = 0.0, len(texts)
        for name, values in ATTRIBUTE_BANK.items():
            logits = scale * img @ txt[at : at + len(values)].T
            want = torch.tensor([world.VALUES[name].index(getattr(a, name)) for a in records])
            attribute = attribute + F.cross_entropy(logits, want)
            at += len(values)
        loss = (per_image + per_text) / 2 + attribute / len(ATTRIBUTE_BANK)
        return loss + probes.loss(embedding, records)

    return loss_fn


def scorer_pixels(records, size: int, vae=None) -> torch.Tensor:
    """32 px drawings upscaled the way the CLIP scorer's own preprocessing does (PIL bicubic).
    With ``vae``, the first half are VAE round trips, saved as 8-bit images first as the
    renderer's are: the scorer is asked about generated images, not only clean drawings."""
    from PIL import Image

    images = [world.draw(a, nets.RESOLUTION) for a in records]
    if vae is not None:
        half = len(images) // 2
        with torch.no_grad():
            x = vae.decode(vae.encode(nets.to_tensor(images[:half])).latent_dist.mean).sample
        images[:half] = nets.to_images(x)
    return clip_pixels(nets.to_tensor([im.resize((size, size), Image.BICUBIC) for im in images]))


def train_clip(plan: Plan, work: Path, vae=None):
    """Stage 2: the CLIP (scorer and, through its text tower, the UNet's text encoder). The
    image tower is convolutional: a ViT trained this briefly on these drawings learns their
    colours only, and a text tower trained against it then maps "spiky" and "short" to the
    same states, so the UNet could never be asked for a hair style or a mark. Half of each
    batch goes through ``vae`` first: trained on clean drawings only, the CLIP scored VAE round
    trips of the subject's own drawings at CLIP-I 0.73 against their ceiling of 0.87, so a LoRA
    that drew the whole identity stayed far from the ceiling and was called underfit."""
    clip = nets.make_clip()
    config = nets.clip_config()
    both = ClipWithProbes(clip, Probes(config["embed_dim"]))
    size = config["vision_cfg"]["image_size"]
    loss_fn = _contrastive(plan, "clip", clip, lambda records: scorer_pixels(records, size, vae), both.probes)
    state = train_stage("clip", work, both, plan.clip_steps, plan.clip_lr, loss_fn, plan.every)
    both.load_state_dict(state)
    return clip
