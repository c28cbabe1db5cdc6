"""Train the toy world's models from a seed: ``python -m lora_lab.toyworld.pretrain``.

Stages, in order, each resumable from its last checkpoint (every ``--every`` steps):

1. ``vae``: AutoencoderKL, 32 px drawings -> 8 x 8 x 4 latents (MSE + a small KL term).
2. ``clip``: the toy world's CLIP, open_clip ``lora-lab-toyworld-clip`` (a ModifiedResNet
   image tower on the drawings upscaled to 64 px, as the CLIP scorer's own preprocessing
   does, and a text transformer), contrastive on (drawing, caption), half of the drawings
   as VAE round trips, with hard negative
   captions that differ in one attribute and a caption bank per attribute. It is the CLIP
   scorer's model (``clip.safetensors``), and its text tower becomes the diffusion model's text
   encoder (``text_encoder.safetensors``, token embedding shared with the CLIP file).
3. ``unet``: UNet2DConditionModel on the VAE's latents, conditioned on stage 2's text tower
   (frozen, as a transformers CLIPTextModel), epsilon prediction on SD 1.x's schedule, 10% empty
   captions (for classifier-free guidance), EMA weights kept.
4. ``readout``: the attribute classifier, on clean drawings and on their VAE reconstructions.

Every batch is drawn fresh from the world with a random generator seeded by
(seed, stage, step), so a resumed run sees the same batches as an unbroken one. The finished
weights are written in float16 to ``--weights`` (default: the weights shipped with lora_lab)
with a ``manifest.json`` naming the command, seed, steps and times.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from lora_lab.files import atomic_write_bytes, atomic_write_text
from lora_lab.toyworld import nets, world

log = logging.getLogger("lora_lab.toyworld.pretrain")

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
STAGES = ("vae", "clip", "unet", "readout")
TEXT_TOKENS = 48  # captions of the world fit in 48 tokens; the causal mask makes a shorter run exact


@dataclass(frozen=True)
class Plan:
    seed: int = 0
    vae_steps: int = 2500
    vae_batch: int = 64
    vae_lr: float = 1e-3
    clip_steps: int = 4500
    clip_batch: int = 64
    clip_lr: float = 1e-3
    clip_negatives: int = 6
    readout_steps: int = 4000
    readout_batch: int = 64
    readout_lr: float = 2e-3
    unet_steps: int = 10000
    unet_batch: int = 32
    unet_lr: float = 4e-4
    unet_uncond: float = 0.1
    ema: float = 0.999
    every: int = 250


SMOKE = Plan(vae_steps=3, vae_batch=4, clip_steps=3, clip_batch=4, clip_negatives=2, readout_steps=3, readout_batch=4,
             unet_steps=4, unet_batch=4, every=2)


def _rng(plan: Plan, stage: str, step: int) -> random.Random:
    return random.Random(f"{plan.seed}/{stage}/{step}")


def _gen(plan: Plan, stage: str, step: int) -> torch.Generator:
    digest = hashlib.sha256(f"{plan.seed}/{stage}/{step}/torch".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _records(rng: random.Random, n: int) -> List[world.Attributes]:
    return [world.sample(rng) for _ in range(n)]


def _pixels(records) -> torch.Tensor:
    return nets.to_tensor([world.draw(a, nets.RESOLUTION) for a in records])


def _lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _train(stage: str, work: Path, model: torch.nn.Module, steps: int, lr: float, loss_fn: Callable,
           every: int, ema_decay: float = 0.0) -> Dict[str, torch.Tensor]:
    """Run one stage from its checkpoint; returns the final (EMA where kept) state dict."""
    from tqdm import tqdm

    ckpt = work / f"{stage}.ckpt.pt"
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()} if ema_decay else None
    start, losses = 0, []
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        ema = state.get("ema") or ema
        start, losses = state["step"], state["losses"]
        log.info("%s: resuming at step %d of %d", stage, start, steps)
    model.train()
    bar = tqdm(range(start, steps), desc=stage, initial=start, total=steps, leave=False, file=sys.stderr)
    recent: List[float] = []
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        loss = loss_fn(step)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{stage}: loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    if v.dtype.is_floating_point:
                        ema[k].mul_(ema_decay).add_(v.detach(), alpha=1 - ema_decay)
                    else:
                        ema[k].copy_(v)
        recent.append(loss.item())
        if (step + 1) % every == 0 or step + 1 == steps:
            losses.append([step + 1, sum(recent) / len(recent)])
            bar.set_postfix(loss=f"{losses[-1][1]:.4f}")
            log.info("%s: step %d/%d loss %.4f", stage, step + 1, steps, losses[-1][1])
            recent = []
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema, "step": step + 1,
                        "losses": losses}, buf)
            atomic_write_bytes(ckpt, buf.getvalue())
    model.eval()
    (work / f"{stage}.losses.json").write_text(json.dumps(losses), encoding="utf-8")
    return ema if ema is not None else model.state_dict()


def _save(state: Dict[str, torch.Tensor], path: Path, half: bool = True) -> None:
    from safetensors.torch import save

    tensors = {k: (v.half() if half and v.dtype == torch.float32 else v).contiguous() for k, v in state.items()}
    atomic_write_bytes(path, save(tensors))


def _load(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.float() if v.dtype == torch.float16 else v for k, v in load_file(str(path)).items()}


def train_vae(plan: Plan, work: Path):
    vae = nets.make_vae()

    def loss_fn(step):
        x = _pixels(_records(_rng(plan, "vae", step), plan.vae_batch))
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=_gen(plan, "vae", step))
        recon = vae.decode(z).sample
        return F.mse_loss(recon, x) + 1e-6 * post.kl().mean()

    state = _train("vae", work, vae, plan.vae_steps, plan.vae_lr, loss_fn, plan.every)
    vae.load_state_dict(state)
    with torch.no_grad():  # SD's scaling factor: 1 / std of the latents
        z = vae.encode(_pixels(_records(_rng(plan, "vae-scale", 0), 512))).latent_dist.mean
    return vae, float(1.0 / z.std())


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
    "hair_colour": [f"photo of a person with {v} hair" for v in world._VALUES["hair_colour"]],
    "hair_style": [f"photo of a person with {v} hair" for v in world._VALUES["hair_style"]],
    "eye_colour": [f"photo of a person with {v} eyes" for v in world._VALUES["eye_colour"]],
    "mark": ["photo of a person" if v == "none" else f"photo of a person, a {v} on the cheek"
             for v in world._VALUES["mark"]],
    "background": [f"photo of a person, on a {v} background" for v in world._VALUES["background"]],
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
        rng = _rng(plan, stage, step)
        records = _records(rng, plan.clip_batch)
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
            want = torch.tensor([world._VALUES[name].index(getattr(a, name)) for a in records])
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
    state = _train("clip", work, both, plan.clip_steps, plan.clip_lr, loss_fn, plan.every)
    both.load_state_dict(state)
    return clip


def train_readout(plan: Plan, work: Path, vae):
    model = nets.ReadOut()

    def loss_fn(step):
        rng = _rng(plan, "readout", step)
        records = _records(rng, plan.readout_batch)
        x = _pixels(records)
        g = _gen(plan, "readout", step)
        half = len(records) // 2
        with torch.no_grad():  # half the batch through the VAE: the read-out also reads decoded images
            x[:half] = vae.decode(vae.encode(x[:half]).latent_dist.mean).sample.clamp(-1, 1)
        x = x + torch.rand(len(records), 1, 1, 1, generator=g) * 0.1 * torch.randn(x.shape, generator=g)
        out = model(x)
        want = nets.targets(records)
        return sum(F.cross_entropy(out[k], want[k]) for k in nets.HEADS)

    state = _train("readout", work, model, plan.readout_steps, plan.readout_lr, loss_fn, plan.every)
    model.load_state_dict(state)
    return model


def train_unet(plan: Plan, work: Path, vae, scaling: float, text_encoder, tokenizer):
    from diffusers import DDPMScheduler

    unet = nets.make_unet()
    noise_scheduler = DDPMScheduler.from_config(nets.make_scheduler().config)

    def loss_fn(step):
        rng = _rng(plan, "unet", step)
        g = _gen(plan, "unet", step)
        records = _records(rng, plan.unet_batch)
        captions = ["" if rng.random() < plan.unet_uncond else world.random_caption(a, rng)[0] for a in records]
        with torch.no_grad():
            post = vae.encode(_pixels(records)).latent_dist
            latents = (post.mean + post.std * torch.randn(post.mean.shape, generator=g)) * scaling
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            states = text_encoder(ids).last_hidden_state
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(records),), generator=g)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        return F.mse_loss(unet(noisy, t, states).sample, noise)

    state = _train("unet", work, unet, plan.unet_steps, plan.unet_lr, loss_fn, plan.every, ema_decay=plan.ema)
    unet.load_state_dict(state)
    return unet


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def pretrain(plan: Plan, work: Path, weights: Path, command: str = "") -> dict:
    """Run (or resume) every stage; write float16 weights and ``manifest.json`` to ``weights``."""
    from transformers import CLIPTokenizer

    from lora_lab.models.builtin import write_clip_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    times: Dict[str, float] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        times[name] = round(time.perf_counter() - t0, 1)
        log.info("%s: done in %.0f s", name, times[name])
        return out

    vae, scaling = timed("vae", lambda: train_vae(plan, work))
    clip = timed("clip", lambda: train_clip(plan, work, vae))
    diffusion_text = nets.text_encoder_state(clip.state_dict())
    token_embedding = diffusion_text.pop("embeddings.token_embedding.weight")  # stored once, in clip.safetensors
    text_encoder = nets.text_encoder_from_state(diffusion_text, token_embedding)
    write_clip_tokenizer(work / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
    unet = timed("unet", lambda: train_unet(plan, work, vae, scaling, text_encoder, tokenizer))
    readout = timed("readout", lambda: train_readout(plan, work, vae))

    weights.mkdir(parents=True, exist_ok=True)
    files = {"clip": clip.state_dict(), "text_encoder": diffusion_text, "vae": vae.state_dict(),
             "readout": readout.state_dict(), "unet": unet.state_dict()}
    for name, state in files.items():
        _save(state, weights / f"{name}.safetensors")
    manifest = {
        "command": command or "python -m lora_lab.toyworld.pretrain",
        "plan": asdict(plan),
        "vae_scaling_factor": scaling,
        "resolution": nets.RESOLUTION,
        "seconds_this_run": times,  # a resumed run times only what it did itself
        "torch": torch.__version__,
        "files": {f"{n}.safetensors": sha256(weights / f"{n}.safetensors") for n in files},
    }
    atomic_write_text(weights / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_lab.toyworld.pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("sweeps/.cache/toyworld-pretrain"),
                        help="checkpoints (resume by running the same command again)")
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR, help="where the finished weights go")
    parser.add_argument("--smoke", action="store_true", help="a few steps per stage (for tests)")
    parser.add_argument("--unet-steps", type=int, default=None)
    parser.add_argument("--every", type=int, default=None, help="checkpoint every N steps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    plan = replace(SMOKE if args.smoke else Plan(), seed=args.seed)
    if args.unet_steps:
        plan = replace(plan, unet_steps=args.unet_steps)
    if args.every:
        plan = replace(plan, every=args.every)
    command = "python -m lora_lab.toyworld.pretrain " + " ".join(argv if argv is not None else sys.argv[1:])
    manifest = pretrain(plan, args.work, args.weights, command.strip())
    print(json.dumps({"weights": str(args.weights), "seconds_this_run": manifest["seconds_this_run"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
