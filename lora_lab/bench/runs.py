"""The benchmark's measured runs, each in a fresh process: the manual-style trial and the
probe of the best batched rendering speed. :mod:`lora_lab.bench` starts them and adds up."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, List

RESULT_PREFIX = "BENCH_RESULT "
PROBE_BATCHES = (1, 2, 4, 8, 16, 32)


class PeakRSS:
    """Polls a process tree's resident memory; ``peak_mb`` after ``stop()``."""

    def __init__(self, pid: int):
        import psutil

        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.proc] + self.proc.children(recursive=True)
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            self._stop.wait(0.1)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20


def run(cmd: List[str], cwd: Path) -> tuple:
    """(wall seconds, peak resident MB, stdout) of a command; exits with its stderr on failure."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    meter = PeakRSS(proc.pid)
    out, err = proc.communicate()
    peak = meter.stop()
    if proc.returncode != 0:
        raise SystemExit(f"error: benchmark step failed: {' '.join(cmd[:4])} ...\n{err[-3000:]}")
    return time.perf_counter() - started, peak, out


def result_of(stdout: str) -> Dict:
    line = next(line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX))
    return json.loads(line[len(RESULT_PREFIX):])


def _since_start() -> float:
    import psutil

    return time.time() - psutil.Process().create_time()


def _gpu_peak_mb(device) -> float:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0


def baseline_trial(spec: Dict) -> Dict:
    """One manual-style trial in this (fresh) process: load, train without caches, then a fresh
    pipeline + LoRA per X/Y cell, as A1111's X/Y plot over epoch files and strengths does."""
    import torch
    from diffusers import StableDiffusionPipeline

    from lora_lab.cli import compose
    from lora_lab.data.dataset import load_dataset
    from lora_lab.data.suites import load_suite
    from lora_lab.device import pick_device
    from lora_lab.evaluate.render import make_scheduler
    from lora_lab.models.base import load_base
    from lora_lab.train.loop import train

    t0 = time.perf_counter()
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    cfg = compose(spec["overrides"] + [f"output_dir={out}"])
    device = pick_device(cfg.device)
    dataset = load_dataset(cfg.data, Path(cfg.cache_dir), cfg.explicit)
    base = load_base(cfg.model, Path(cfg.cache_dir), device)
    load_s = _since_start()  # the interpreter, imports and the model: what each manual run pays
    result = train(cfg, base, dataset, out)
    folder = base.source
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    del base
    suite = load_suite(cfg.eval.suite, dataset.token, dataset.suite).limited(cfg.eval.max_prompts)
    render_s = images = 0
    for epoch, path in sorted(result.lora_files.items()):
        for strength in cfg.eval.strengths:
            for prompt in suite.prompts:
                t = time.perf_counter()
                pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, torch_dtype=dtype,
                                                               requires_safety_checker=False).to(device)
                pipe.set_progress_bar_config(disable=True)
                pipe.load_lora_weights(str(path))
                load_s += time.perf_counter() - t
                pipe.scheduler = make_scheduler(cfg.eval.sampler, dict(pipe.scheduler.config))
                t = time.perf_counter()
                pipe([prompt.text], negative_prompt=[suite.negative_prompt], num_inference_steps=cfg.eval.steps,
                     guidance_scale=cfg.eval.cfg_scale, height=cfg.resolution, width=cfg.resolution,
                     generator=[torch.Generator(device=device).manual_seed(cfg.eval.seeds[0])],
                     cross_attention_kwargs={"scale": float(strength)})
                render_s += time.perf_counter() - t
                images += 1
                del pipe
    return {"wall_s": time.perf_counter() - t0, "load_s": load_s, "train_s": result.train_s,
            "steps": result.steps, "render_s": render_s, "images": images, "peak_gpu_mb": _gpu_peak_mb(device)}


def probe(spec: Dict) -> Dict:
    """The floor for the sweep's work, in this (fresh) process: the time to start Python and
    load the model once, and the best rendering speed over batch sizes, with a trained LoRA
    attached and each image at its own strength, as the sweep renders."""
    import torch

    from lora_lab.cli import compose
    from lora_lab.data.dataset import load_dataset
    from lora_lab.data.suites import load_suite
    from lora_lab.device import pick_device
    from lora_lab.evaluate.render import RenderSettings, generate
    from lora_lab.lora import kohya as kohya_io
    from lora_lab.lora.strengths import SampleStrengths
    from lora_lab.models.base import load_base

    cfg = compose(spec["overrides"])
    device = pick_device(cfg.device)
    dataset = load_dataset(cfg.data, Path(cfg.cache_dir), cfg.explicit)
    base = load_base(cfg.model, Path(cfg.cache_dir), device)
    load_s = _since_start()
    suite = load_suite(cfg.eval.suite, dataset.token, dataset.suite).limited(cfg.eval.max_prompts)
    settings = RenderSettings(cfg.eval.sampler, cfg.eval.steps, cfg.eval.cfg_scale, cfg.resolution,
                              list(cfg.eval.seeds), suite.negative_prompt, "bench")
    tensors, _ = kohya_io.read_kohya(Path(spec["lora"]))
    placed = [kohya_io.placed_layers(base.unet, base.text_encoders, tensors)]  # as render places a file
    strengths = [s for s in cfg.eval.strengths if s] or [1.0]
    speeds = {}
    with SampleStrengths(base.unet, base.text_encoders, files=placed) as per_sample:
        for size in PROBE_BATCHES:
            jobs = [(suite.prompts[i % len(suite.prompts)], 1000 + i, strengths[i % len(strengths)])
                    for i in range(size)]
            settings.batch_size = size
            best = float("inf")
            for _ in range(2):  # the better of two calls: the first may pay for warming up
                t = time.perf_counter()
                generate(base.pipe, jobs, settings, per_sample)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                best = min(best, time.perf_counter() - t)
            speeds[size] = size / best
    best_size = max(speeds, key=speeds.get)
    return {"load_s": load_s, "images_per_s": speeds, "best_batch": best_size, "best_images_per_s": speeds[best_size]}
