"""Train the toy world's second read-out: ``python -m lora_lab.toyworld.pretrain_readout2``.

The truth benchmark reads every render with two read-outs and reports where they part. The
first (``readout.safetensors``, stage 4 of :mod:`lora_lab.toyworld.pretrain`) learnt from clean
drawings and their VAE round trips. This one is built differently (:class:`nets.ReadOutB`),
from another seed, and learns from harder inputs, closer to what a LoRA renders: a third of
each batch clean, a third through the VAE, a third through the VAE with noise added to the
latents (an imperfect denoising), then a random blur on half the batch and pixel noise on all.
It needs the shipped VAE and takes about 8 minutes on 2 CPU cores. It writes
``readout2.safetensors`` and ``readout2.json`` (command, seed, steps, seconds, sha256) beside the
other weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lora_lab.files import atomic_write_text
from lora_lab.toyworld import assets, nets
from lora_lab.toyworld.pretrain import WEIGHTS_DIR, sha256
from lora_lab.toyworld.pretrain_steps import Plan, draw_pixels, draw_records, save_state, stage_gen, stage_rng, train_stage

log = logging.getLogger("lora_lab.toyworld.pretrain")
STAGE = "readout2"


def blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A Gaussian blur per image (``sigma`` in pixels, one per image; 0 leaves it as it is)."""
    r = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-(r[None, :] ** 2) / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    k = k / k.sum(dim=1, keepdim=True)  # (n, 5)
    out = []
    for img, ki in zip(x, k):
        c = img.shape[0]
        h = F.conv2d(F.pad(img[None], (2, 2, 0, 0), mode="replicate"), ki.view(1, 1, 1, 5).repeat(c, 1, 1, 1), groups=c)
        out.append(F.conv2d(F.pad(h, (0, 0, 2, 2), mode="replicate"), ki.view(1, 1, 5, 1).repeat(c, 1, 1, 1), groups=c))
    return torch.cat(out)


def harder(x: torch.Tensor, vae, g: torch.Generator) -> torch.Tensor:
    """Clean / VAE round trip / VAE with noisy latents, by thirds; blur on half; pixel noise."""
    n = len(x)
    third = n // 3
    with torch.no_grad():
        z = vae.encode(x[third:]).latent_dist.mean
        noisy = z[third:] + torch.rand(len(z) - third, 1, 1, 1, generator=g) * 0.5 * z.std() * \
            torch.randn(z[third:].shape, generator=g)
        z = torch.cat([z[:third], noisy])
        x = torch.cat([x[:third], vae.decode(z).sample.clamp(-1, 1)])
    sigma = torch.rand(n, generator=g) * 1.0 * (torch.rand(n, generator=g) < 0.5)
    x = torch.where((sigma > 0)[:, None, None, None], blur(x, sigma), x)
    return x + torch.rand(n, 1, 1, 1, generator=g) * 0.08 * torch.randn(x.shape, generator=g)


def train(plan: Plan, work: Path) -> nets.ReadOutB:
    vae = nets.make_vae()
    vae.load_state_dict(assets.load_state("vae"))
    vae.eval()
    model = nets.ReadOutB()

    def loss_fn(step):
        records = draw_records(stage_rng(plan, STAGE, step), plan.readout_batch)
        x = harder(draw_pixels(records), vae, stage_gen(plan, STAGE, step))
        out = model(x)
        want = nets.targets(records)
        return sum(F.cross_entropy(out[k], want[k]) for k in nets.HEADS)

    model.load_state_dict(train_stage(STAGE, work, model, plan.readout_steps, plan.readout_lr, loss_fn, plan.every))
    return model.eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_lab.toyworld.pretrain_readout2", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1, help="not the first read-out's seed (0)")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--work", type=Path, default=Path("sweeps/.cache/toyworld-pretrain"),
                        help="checkpoints (resume by running the same command again)")
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR, help="where the finished weights go")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    plan = Plan(seed=args.seed, readout_steps=args.steps, every=min(250, args.steps))
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = train(plan, args.work)
    args.weights.mkdir(parents=True, exist_ok=True)
    path = args.weights / f"{STAGE}.safetensors"
    save_state(model.state_dict(), path)
    info = {"command": " ".join(["python -m lora_lab.toyworld.pretrain_readout2", *(argv if argv is not None else sys.argv[1:])]),
            "seed": plan.seed, "steps": plan.readout_steps, "batch": plan.readout_batch, "lr": plan.readout_lr,
            "seconds_this_run": round(time.perf_counter() - started, 1), "torch": torch.__version__,
            "sha256": sha256(path)}
    atomic_write_text(args.weights / f"{STAGE}.json", json.dumps(info, indent=2) + "\n")
    print(json.dumps({"weights": str(path), "seconds_this_run": info["seconds_this_run"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
