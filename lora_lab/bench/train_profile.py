"""``python -m lora_lab.bench train``: where a training step's time goes, against the UNet alone.

On the model and data ``python -m lora_lab.bench`` trains (the bench model, the demo images,
batch 2, LoRA dim 8), at each resolution (64 and 128 px by default), in one process:

- the training loop as the sweep runs it (latents and text cached), and without the caches
  (the VAE and the text encoder every step, as a plain diffusers script trains);
- the floor: the UNet's forward and backward with the same LoRA, on latents of the same
  shape, and the optimizer's step: everything a step cannot do without;
- the floor with one CPU thread, and the optimizer's step alone, fused and one tensor at a time.

The loop's gap to the floor is what data handling, noise, logging and the rest cost; the
one-thread figure says whether more threads help this model (with 2 cores, whether a second
sweep worker can use the other core). Every figure is the better of two runs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List

import torch

OVERRIDES = ["data=demo", "data.token=sks woman", "device=cpu", "train.batch_size=2",
             "train.learning_rate=1e-3", "data.repeats=2", "train.epochs=3", "train.network_dim=8"]


def _loop(cfg, base, dataset, cached: bool) -> float:
    """Steps per second of the training loop itself (the better of two runs)."""
    from lora_lab.train.loop import train

    t = replace(cfg.train, cache_latents=cached, cache_text_embeddings=cached)
    best = 0.0
    for _ in range(2):
        with tempfile.TemporaryDirectory() as out:
            result = train(replace(cfg, train=t), base, dataset, Path(out))
        best = max(best, result.steps / result.train_s)
    return best


def _floor(cfg, base, resolution: int, steps: int, threads: int, fused: bool = True) -> Dict[str, float]:
    """The UNet's forward + backward with the LoRA attached, plus the optimizer's step, on
    latents of the run's shape: steps per second, and the optimizer's milliseconds a step."""
    from lora_lab.lora import adapters

    unet = base.unet
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    params = adapters.attach(unet, base.text_encoders, cfg.train)[0]
    try:
        unet.train()
        opt = torch.optim.AdamW(params, lr=1e-3, fused=fused, foreach=None if fused else False)
        side = resolution // base.pipe.vae_scale_factor
        latents = torch.randn(2, unet.config.in_channels, side, side)
        timesteps = torch.randint(0, 1000, (2,))
        hidden = torch.randn(2, base.tokenizers[0].model_max_length, unet.config.cross_attention_dim)
        best, opt_s = 0.0, float("inf")
        for _ in range(2):
            for i in range(3):  # warm-up
                unet(latents, timesteps, hidden).sample.pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
            started, in_opt = time.perf_counter(), 0.0
            for i in range(steps):
                unet(latents, timesteps, hidden).sample.pow(2).mean().backward()
                clock = time.perf_counter()
                opt.step()
                opt.zero_grad()
                in_opt += time.perf_counter() - clock
            best = max(best, steps / (time.perf_counter() - started))
            opt_s = min(opt_s, in_opt / steps)
        return {"steps_per_s": best, "optimizer_ms": 1000 * opt_s}
    finally:
        adapters.detach(unet, base.text_encoders)
        unet.eval()
        torch.set_num_threads(before)


def profile(args) -> Dict:
    from lora_lab.cli import compose
    from lora_lab.data.dataset import load_dataset
    from lora_lab.device import pick_device
    from lora_lab.models.base import load_base

    cfg = compose(OVERRIDES + [f"cache_dir={args.cache_dir}", f"model={args.model}"])
    dataset = load_dataset(cfg.data, Path(cfg.cache_dir), cfg.explicit)
    base = load_base(cfg.model, Path(cfg.cache_dir), pick_device("cpu"))
    threads = torch.get_num_threads()
    rows: List[Dict] = []
    for res in args.resolutions:
        run_cfg = replace(cfg, train=replace(cfg.train, resolution=res))
        print(f"{res} px: training loop with and without caches, the UNet floor ...", flush=True)
        row = {"resolution": res, "cached": _loop(run_cfg, base, dataset, True),
               "uncached": _loop(run_cfg, base, dataset, False)}
        full = _floor(run_cfg, base, res, args.steps, threads)
        one = _floor(run_cfg, base, res, args.steps, 1)
        single = _floor(run_cfg, base, res, args.steps, threads, fused=False)
        row.update(floor=full["steps_per_s"], floor_1_thread=one["steps_per_s"],
                   optimizer_ms_fused=full["optimizer_ms"], optimizer_ms_single=single["optimizer_ms"])
        row["cache_gain"] = row["cached"] / row["uncached"]
        row["loop_share_of_floor"] = row["cached"] / row["floor"]  # 1.0: nothing but the UNet and the step
        row["threads_gain"] = row["floor"] / row["floor_1_thread"]
        rows.append(row)
    result = {"model": args.model, "threads": threads, "batch_size": cfg.train.batch_size,
              "network_dim": cfg.train.network_dim, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(table(result))
    print(f"json: {out / 'train.json'}")
    return result


def table(result: Dict) -> str:
    head = ("px", "loop, cached", "uncached", "cache gain", "UNet floor", "loop / floor",
            "floor, 1 thread", f"{result['threads']} threads / 1", "optimizer ms: fused / one at a time")
    body = [(str(r["resolution"]), f"{r['cached']:.2f} steps/s", f"{r['uncached']:.2f}", f"{r['cache_gain']:.2f}x",
             f"{r['floor']:.2f}", f"{100 * r['loop_share_of_floor']:.0f}%", f"{r['floor_1_thread']:.2f}",
             f"{r['threads_gain']:.2f}x", f"{r['optimizer_ms_fused']:.1f} / {r['optimizer_ms_single']:.1f}")
            for r in result["rows"]]
    width = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, width)).rstrip() for row in [head, *body])


def run(argv: List[str]) -> Dict:
    parser = argparse.ArgumentParser(prog="python -m lora_lab.bench train",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bench", choices=["bench", "tiny"])
    parser.add_argument("--resolutions", type=lambda s: [int(x) for x in s.split(",")], default=[64, 128])
    parser.add_argument("--steps", type=int, default=30, help="steps per floor measurement")
    parser.add_argument("--cache-dir", default="sweeps/.cache")
    parser.add_argument("--out", default="sweeps/bench")
    args = parser.parse_args(argv)
    args.cache_dir = str(Path(args.cache_dir).resolve())
    return profile(args)
