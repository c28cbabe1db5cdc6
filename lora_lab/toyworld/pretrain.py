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
import json
import logging
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict

import torch
import torch.nn.functional as F

from lora_lab.files import atomic_write_text
from lora_lab.toyworld import nets, world
from lora_lab.toyworld.pretrain_clip import train_clip
from lora_lab.toyworld.pretrain_steps import (
    SMOKE,
    Plan,
    draw_pixels,
    draw_records,
    save_state,
    stage_gen,
    stage_rng,
    train_stage,
)

log = logging.getLogger("lora_lab.toyworld.pretrain")

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
STAGES = ("vae", "clip", "unet", "readout")


def train_vae(plan: Plan, work: Path):
    vae = nets.make_vae()

    def loss_fn(step):
        x = draw_pixels(draw_records(stage_rng(plan, "vae", step), plan.vae_batch))
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=stage_gen(plan, "vae", step))
        recon = vae.decode(z).sample
        return F.mse_loss(recon, x) + 1e-6 * post.kl().mean()

    state = train_stage("vae", work, vae, plan.vae_steps, plan.vae_lr, loss_fn, plan.every)
    vae.load_state_dict(state)
    with torch.no_grad():  # SD's scaling factor: 1 / std of the latents
        z = vae.encode(draw_pixels(draw_records(stage_rng(plan, "vae-scale", 0), 512))).latent_dist.mean
    return vae, float(1.0 / z.std())


def train_readout(plan: Plan, work: Path, vae):
    model = nets.ReadOut()

    def loss_fn(step):
        rng = stage_rng(plan, "readout", step)
        records = draw_records(rng, plan.readout_batch)
        x = draw_pixels(records)
        g = stage_gen(plan, "readout", step)
        half = len(records) // 2
        with torch.no_grad():  # half the batch through the VAE: the read-out also reads decoded images
            x[:half] = vae.decode(vae.encode(x[:half]).latent_dist.mean).sample.clamp(-1, 1)
        x = x + torch.rand(len(records), 1, 1, 1, generator=g) * 0.1 * torch.randn(x.shape, generator=g)
        out = model(x)
        want = nets.targets(records)
        return sum(F.cross_entropy(out[k], want[k]) for k in nets.HEADS)

    state = train_stage("readout", work, model, plan.readout_steps, plan.readout_lr, loss_fn, plan.every)
    model.load_state_dict(state)
    return model


def train_unet(plan: Plan, work: Path, vae, scaling: float, text_encoder, tokenizer):
    from diffusers import DDPMScheduler

    unet = nets.make_unet()
    noise_scheduler = DDPMScheduler.from_config(nets.make_scheduler().config)

    def loss_fn(step):
        rng = stage_rng(plan, "unet", step)
        g = stage_gen(plan, "unet", step)
        records = draw_records(rng, plan.unet_batch)
        captions = ["" if rng.random() < plan.unet_uncond else world.random_caption(a, rng)[0] for a in records]
        with torch.no_grad():
            post = vae.encode(draw_pixels(records)).latent_dist
            latents = (post.mean + post.std * torch.randn(post.mean.shape, generator=g)) * scaling
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            states = text_encoder(ids).last_hidden_state
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(records),), generator=g)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        return F.mse_loss(unet(noisy, t, states).sample, noise)

    state = train_stage("unet", work, unet, plan.unet_steps, plan.unet_lr, loss_fn, plan.every, ema_decay=plan.ema)
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
        save_state(state, weights / f"{name}.safetensors")
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
