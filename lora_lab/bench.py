"""Benchmark: the lora_lab sweep against the manual workflow on the same work, same machine.

``python -m lora_lab.bench`` runs, on the same model, data and grid:

1. the manual-style baseline: for each trial a fresh process that loads the model, trains
   without caches (the VAE and text encoder run every step, as a plain diffusers script does),
   then renders every X/Y cell with a freshly loaded pipeline and LoRA (as A1111's X/Y plot
   over epoch files and strengths does);
2. the lora_lab sweep of the same trials and grid (one worker: model loaded once, latents and
   text cached once, LoRA hot-swapped, strengths set in place), which also scores and judges
   every cell;
3. a memory check: a sweep of ``--memory-trials`` small trials in one worker, resident memory
   after each.

It prints wall times, their ratio, training steps per second with and without caches, images
per second in the evaluation, time spent loading, the cost of switching epoch or strength,
per-trial set-up in a warm worker and peak memory, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

RESULT_PREFIX = "BENCH_RESULT "


def _sweep_args(args, name: str, grid: List[int], epochs: int, root: Path, extra: List[str] = ()) -> List[str]:
    strengths = ",".join(str(s) for s in args.strengths)
    return [
        sys.executable, "-m", "lora_lab.sweep", "+sweep=smoke", f"sweep.name={name}", f"sweep.root={root}",
        f"sweep.reports={root / 'reports'}", f"cache_dir={args.cache_dir}", f"model={args.model}",
        "sweep.pruner=none", f"sweep.grid={{train.network_dim:[{','.join(map(str, grid))}]}}",
        f"sweep.fixed={{train.epochs:{epochs},train.resolution:{args.resolution},data.repeats:{args.repeats}}}",
        f"eval.strengths=[{strengths}]", f"eval.max_prompts={args.prompts // 2}", "eval.seeds=[1234]",
        f"eval.steps={args.steps}", f"eval.size={args.resolution}", "eval.face.pretrained=null",
        "eval.clip.model=lora-lab-tiny-clip", "eval.clip.pretrained=null", "train.batch_size=2",
        "train.learning_rate=1e-3", *extra,
    ]


class _PeakRSS:
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


def _run(cmd: List[str], cwd: Path) -> tuple:
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    meter = _PeakRSS(proc.pid)
    out, err = proc.communicate()
    peak = meter.stop()
    if proc.returncode != 0:
        raise SystemExit(f"error: benchmark step failed: {' '.join(cmd[:4])} ...\n{err[-3000:]}")
    return time.perf_counter() - started, peak, out


def baseline_trial(spec: Dict) -> Dict:
    """One manual-style trial in this (fresh) process: load, train without caches, then a fresh
    pipeline + LoRA per X/Y cell."""
    import torch
    from diffusers import StableDiffusionPipeline

    from lora_lab.cli import compose
    from lora_lab.data import load_dataset
    from lora_lab.models import load_base
    from lora_lab.render import make_scheduler
    from lora_lab.suite import load_suite
    from lora_lab.train import train

    t0 = time.perf_counter()
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    cfg = compose(spec["overrides"] + [f"output_dir={out}"])
    dataset = load_dataset(cfg.data, Path(cfg.cache_dir))
    load = time.perf_counter()
    base = load_base(cfg.model, Path(cfg.cache_dir), torch.device("cpu"))
    load_s = time.perf_counter() - load
    result = train(cfg, base, dataset, out)
    folder = base.source
    suite = load_suite(cfg.eval.suite, dataset.token, dataset.suite).limited(cfg.eval.max_prompts)
    render_s = images = 0
    for epoch, path in sorted(result.lora_files.items()):
        for strength in cfg.eval.strengths:
            for prompt in suite.prompts:
                t = time.perf_counter()
                pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                               requires_safety_checker=False)
                pipe.set_progress_bar_config(disable=True)
                pipe.load_lora_weights(str(path))
                load_s += time.perf_counter() - t
                pipe.scheduler = make_scheduler(cfg.eval.sampler, dict(pipe.scheduler.config))
                t = time.perf_counter()
                pipe([prompt.text], negative_prompt=[suite.negative_prompt], num_inference_steps=cfg.eval.steps,
                     guidance_scale=cfg.eval.cfg_scale, height=cfg.resolution, width=cfg.resolution,
                     generator=[torch.Generator().manual_seed(cfg.eval.seeds[0])],
                     cross_attention_kwargs={"scale": float(strength)})
                render_s += time.perf_counter() - t
                images += 1
    return {"wall_s": time.perf_counter() - t0, "load_s": load_s, "train_s": result.train_s,
            "steps": result.steps, "render_s": render_s, "images": images}


def _baseline(args, root: Path, grid: List[int]) -> Dict:
    totals = {"wall_s": 0.0, "load_s": 0.0, "train_s": 0.0, "steps": 0, "render_s": 0.0, "images": 0,
              "peak_mb": 0.0}
    sweep_cmd = _sweep_args(args, "bench", grid, args.epochs, root)
    overrides = [a for a in sweep_cmd[3:] if not a.startswith(("+sweep", "sweep."))]
    for dim in grid:
        spec = {"out": str(root / "baseline" / f"dim{dim}"),
                "overrides": overrides + [f"train.network_dim={dim}", f"train.epochs={args.epochs}",
                                          f"train.resolution={args.resolution}", f"data.repeats={args.repeats}",
                                          "train.cache_latents=false", "train.cache_text_embeddings=false",
                                          "data=demo", "data.token=sks woman"]}
        wall, peak, out = _run([sys.executable, "-m", "lora_lab.bench", "baseline-trial", json.dumps(spec)], root)
        line = next(l for l in out.splitlines() if l.startswith(RESULT_PREFIX))
        r = json.loads(line[len(RESULT_PREFIX):])
        for k in ("load_s", "train_s", "steps", "render_s", "images"):
            totals[k] += r[k]
        totals["wall_s"] += wall
        totals["peak_mb"] = max(totals["peak_mb"], peak)
        print(f"  baseline trial dim {dim}: {wall:.1f}s (load {r['load_s']:.1f}s, train {r['train_s']:.1f}s, "
              f"render {r['render_s']:.1f}s)", flush=True)
    return totals


def _trials(study: Path) -> List[Dict]:
    infos = [json.loads(p.read_text()) for p in study.glob("trial_*/trial.json")]
    return sorted((i for i in infos if i.get("state") == "complete"), key=lambda i: i["number"])


def _sweep(args, root: Path, grid: List[int]) -> Dict:
    wall, peak, out = _run(_sweep_args(args, "bench", grid, args.epochs, root), root)
    trials = _trials(root / "bench")
    t = [i["timing"] for i in trials]
    loaded = [float(x) for x in __import__("re").findall(r"loaded .* and scorers in ([0-9.]+)s", out)]
    return {"wall_s": wall, "peak_mb": peak, "load_s": sum(loaded), "train_s": sum(x["train_s"] for x in t),
            "steps": sum(x["steps"] for x in t), "render_s": sum(x["render_s"] for x in t),
            "switch_s": sum(x["switch_s"] for x in t), "attach_s": sum(x["attach_s"] for x in t),
            "images": sum(x["images"] for x in t),
            "setup_s": [x["setup_s"] for x in t], "trials": len(trials)}


def _memory(args, root: Path) -> Dict:
    grid = list(range(1, args.memory_trials + 1))
    _run(_sweep_args(args, "memory", grid, 1, root, ["eval.max_prompts=1", "eval.strengths=[0,1]"]), root)
    rss = [i["rss_mb"] for i in _trials(root / "memory")]
    return {"rss_mb": rss, "growth_2_to_last": (rss[-1] / rss[1] - 1) if len(rss) > 2 else None}


def compare(args) -> Dict:
    out = Path(args.out).resolve()
    root = out / "compare"  # its own folder: `bench truth` keeps its studies beside it
    if root.exists():
        import shutil

        shutil.rmtree(root)
    root.mkdir(parents=True)
    grid = [4 * (i + 1) for i in range(args.trials)]
    print(f"lora_lab bench: model {args.model}, {args.resolution}px, {args.trials} trials x {args.epochs} epochs x "
          f"{len(args.strengths)} strengths x {args.prompts} prompts, {args.steps} sampling steps", flush=True)
    # Warm the shared cache (built-in model, demo data) so neither side pays for building it.
    _run(_sweep_args(args, "warmup", [2], 1, root, ["eval.strengths=[0]", "eval.max_prompts=1", "eval.steps=1"]), root)
    print("manual-style baseline ...", flush=True)
    base = _baseline(args, root, grid)
    print("lora_lab sweep ...", flush=True)
    ours = _sweep(args, root, grid)
    print(f"memory check ({args.memory_trials} trials) ...", flush=True)
    mem = _memory(args, root)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": __import__("torch").__version__},
        "settings": {k: v for k, v in vars(args).items() if k not in ("func",)},
        "baseline": base, "sweep": ours, "memory": mem,
        "speedup": base["wall_s"] / ours["wall_s"],
        "train_steps_per_s": {"cached": ours["steps"] / ours["train_s"], "uncached": base["steps"] / base["train_s"]},
        "images_per_s": {"sweep": ours["images"] / ours["render_s"], "baseline": base["images"] / base["render_s"]},
        "switch_share_of_render": ours["switch_s"] / ours["render_s"],
        "attach_share_of_render": ours["attach_s"] / ours["render_s"],
        "warm_trial_setup_s": max(ours["setup_s"][1:] or ours["setup_s"]),
    }
    result["cache_speedup"] = result["train_steps_per_s"]["cached"] / result["train_steps_per_s"]["uncached"]
    (out / "bench.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(_table(result))
    print(f"json: {out / 'bench.json'}")
    return result


def _table(r: Dict) -> str:
    b, s, m = r["baseline"], r["sweep"], r["memory"]
    growth = m["growth_2_to_last"]
    rows = [
        ("whole run, wall", f"{b['wall_s']:.1f} s", f"{s['wall_s']:.1f} s", f"{r['speedup']:.2f}x faster (target >= 3x)"),
        ("time loading models", f"{b['load_s']:.1f} s", f"{s['load_s']:.1f} s", ""),
        ("training steps / s", f"{r['train_steps_per_s']['uncached']:.2f}", f"{r['train_steps_per_s']['cached']:.2f}",
         f"{r['cache_speedup']:.2f}x with caches (target >= 1.3x)"),
        ("evaluation images / s", f"{r['images_per_s']['baseline']:.2f}", f"{r['images_per_s']['sweep']:.2f}",
         f"{s['images']} vs {b['images']} images; the sweep also scores them"),
        ("epoch/strength switching", "", f"{100 * r['switch_share_of_render']:.2f}% of rendering", "target < 5%"),
        ("attaching the LoRA, once per trial", "", f"{100 * r['attach_share_of_render']:.2f}% of rendering", ""),
        ("per-trial set-up, warm worker", "", f"{r['warm_trial_setup_s']:.2f} s", "target < 1 s"),
        ("peak memory", f"{b['peak_mb']:.0f} MB", f"{s['peak_mb']:.0f} MB", ""),
        (f"RSS trial 2 -> {len(m['rss_mb'])}", "", f"{m['rss_mb'][1]:.0f} -> {m['rss_mb'][-1]:.0f} MB",
         f"{100 * growth:+.1f}% (target within 10%)" if growth is not None else ""),
    ]
    return _columns(("", "baseline", "lora_lab", ""), rows)


def _columns(head, rows) -> str:
    """Left-aligned text columns."""
    width = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, width)).rstrip() for row in [head, *rows])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["truth"]:
        from lora_lab.toyworld import truthbench

        parser = argparse.ArgumentParser(prog="python -m lora_lab.bench truth",
                                         description="lora_lab's verdicts, picks and pruning against the toy world's "
                                                     "truth, thresholds chosen on calibration subjects")
        parser.add_argument("--cache-dir", default="sweeps/.cache")
        parser.add_argument("--out", default="sweeps/bench")
        parser.add_argument("--calibration", type=lambda s: s.split(","), default=list(truthbench.CALIBRATION),
                            help="subjects the thresholds are chosen on (comma-separated)")
        parser.add_argument("--heldout", type=lambda s: s.split(","), default=list(truthbench.HELDOUT),
                            help="subjects the figures are reported on (comma-separated)")
        parser.add_argument("overrides", nargs="*", help="Hydra overrides for every study (eval.seeds=[1,2] ...)")
        args = parser.parse_args(argv[1:])
        args.cache_dir = str(Path(args.cache_dir).resolve())
        truthbench.run(args)
        return 0
    if argv[:1] == ["baseline-trial"]:
        from lora_lab.cli import setup_logging

        setup_logging()
        print(RESULT_PREFIX + json.dumps(baseline_trial(json.loads(argv[1]))), flush=True)
        return 0
    parser = argparse.ArgumentParser(prog="python -m lora_lab.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bench", choices=["bench", "tiny"],
                        help="bench: UNet 64/128/256 channels, VAE factor 8 (default); tiny: the test model")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--strengths", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.5, 0.75, 1.0])
    parser.add_argument("--prompts", type=int, default=2, help="an even number: half likeness, half adaptability")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps per image")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--memory-trials", type=int, default=10)
    parser.add_argument("--cache-dir", default="sweeps/.cache")
    parser.add_argument("--out", default="sweeps/bench")
    args = parser.parse_args(argv)
    if args.prompts < 2 or args.prompts % 2:
        parser.error("--prompts must be an even number >= 2")
    args.cache_dir = str(Path(args.cache_dir).resolve())
    compare(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
