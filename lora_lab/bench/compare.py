"""Benchmark: the lora_lab sweep against the manual workflow on the same work, same machine.

``python -m lora_lab.bench`` runs, on the same model, data and grid:

1. the manual-style baseline: for each trial a fresh process that loads the model, trains
   without caches (the VAE and text encoder run every step, as a plain diffusers script does),
   then renders every X/Y cell with a freshly loaded pipeline and LoRA (as A1111's X/Y plot
   over epoch files and strengths does);
2. the lora_lab sweep of the same trials and grid (one worker: model loaded once, latents and
   text cached once, LoRA hot-swapped, every strength of an epoch rendered in the same
   batches), which also scores and judges every cell;
3. the probe: a fresh process that loads the model once and renders at batch sizes 1 to 32
   with a trained LoRA attached; with the sweep's own training speed it gives the lower bound
   for the sweep's work (one load + its training steps + its images at the best batch);
4. a memory check: a sweep of ``--memory-trials`` small trials in one worker, resident memory
   after each.

It prints wall times and their ratio, where each second of the sweep went (load, train,
render, score, judge, write, other), the bound and the sweep's ratio to it, training steps per
second with and without caches, images per second, per-trial set-up in a warm worker and peak
memory (and peak GPU memory on ``--device cuda``), and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Dict, List

from lora_lab.bench.runs import RESULT_PREFIX, baseline_trial, probe, result_of, run

TARGET_SPEEDUP, TARGET_BOUND_RATIO, TARGET_RENDER_RATIO, TARGET_SWITCH = 5.0, 1.2, 1.2, 0.05
_DATA = ["data=demo", "data.token=sks woman"]  # what +sweep=smoke trains on
STAGES = ("load", "train", "render", "score", "judge", "write", "other")


def _device_overrides(args) -> List[str]:
    if args.device == "cuda":  # the GPU settings users train SD 1.5 with
        return ["device=cuda", "train.mixed_precision=fp16", "train.optimizer=adamw8bit"]
    return ["device=cpu"]


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
        "train.learning_rate=1e-3", f"sweep.workers={args.workers}", *_device_overrides(args), *extra,
    ]


def _model_overrides(sweep_cmd: List[str]) -> List[str]:
    """The sweep's settings as plain overrides (for a single trial or the probe)."""
    return [a for a in sweep_cmd[3:] if not a.startswith(("+sweep", "sweep."))]


def _baseline(args, root: Path, grid: List[int]) -> Dict:
    totals = {"wall_s": 0.0, "load_s": 0.0, "train_s": 0.0, "steps": 0, "render_s": 0.0, "images": 0,
              "peak_mb": 0.0, "peak_gpu_mb": 0.0}
    overrides = _model_overrides(_sweep_args(args, "bench", grid, args.epochs, root))
    for dim in grid:
        spec = {"out": str(root / "baseline" / f"dim{dim}"),
                "overrides": overrides + [f"train.network_dim={dim}", f"train.epochs={args.epochs}",
                                          f"train.resolution={args.resolution}", f"data.repeats={args.repeats}",
                                          "train.cache_latents=false", "train.cache_text_embeddings=false",
                                          *_DATA]}
        wall, peak, out = run([sys.executable, "-m", "lora_lab.bench", "baseline-trial", json.dumps(spec)], root)
        r = result_of(out)
        for k in ("load_s", "train_s", "steps", "render_s", "images"):
            totals[k] += r[k]
        totals["wall_s"] += wall
        totals["peak_mb"] = max(totals["peak_mb"], peak)
        totals["peak_gpu_mb"] = max(totals["peak_gpu_mb"], r["peak_gpu_mb"])
        print(f"  baseline trial dim {dim}: {wall:.1f}s (load {r['load_s']:.1f}s, train {r['train_s']:.1f}s, "
              f"render {r['render_s']:.1f}s)", flush=True)
    totals["stages"] = {"load": totals["load_s"], "train": totals["train_s"], "render": totals["render_s"],
                        "score": 0.0, "judge": 0.0, "write": 0.0}
    totals["stages"]["other"] = totals["wall_s"] - sum(totals["stages"].values())
    return totals


def _trials(study: Path) -> List[Dict]:
    infos = [json.loads(p.read_text()) for p in study.glob("trial_*/trial.json")]
    return sorted((i for i in infos if i.get("state") == "complete"), key=lambda i: i["number"])


def _sweep(args, root: Path, grid: List[int]) -> Dict:
    wall, peak, _ = run(_sweep_args(args, "bench", grid, args.epochs, root), root)
    trials = _trials(root / "bench")
    t = [i["timing"] for i in trials]
    study = json.loads((root / "bench" / "timing.json").read_text())

    def total(key: str) -> float:
        return sum(x.get(key, 0.0) for x in t)

    # With several workers the trials' stages overlap: each is shown per worker (its sum / workers),
    # and the workers' own start-up and loading fall in "other".
    w = args.workers
    stages = {"load": study["startup_s"] + (study["load_s"] or 0.0),
              "train": (total("setup_s") + total("train_s")) / w, "render": (total("render_s") - total("png_s")) / w,
              "score": total("score_s") / w, "judge": total("judge_s") / w,
              "write": total("write_s") / w + study["report_s"]}
    stages["other"] = wall - sum(stages.values())
    return {"wall_s": wall, "peak_mb": peak, "load_s": stages["load"], "train_s": total("train_s"),
            "steps": total("steps"), "render_s": total("render_s"), "switch_s": total("switch_s"),
            "attach_s": total("attach_s"), "images": int(total("images")), "stages": stages,
            "batch_size": t[0].get("batch_size") if t else None,
            "peak_gpu_mb": max((x.get("peak_gpu_mb", 0.0) for x in t), default=0.0),
            "setup_s": [x["setup_s"] for x in t], "trials": len(trials)}


def _probe(args, root: Path, grid: List[int]) -> Dict:
    loras = sorted((root / "bench").glob(f"trial_{len(grid) - 1}/lora/*.safetensors"))
    spec = {"overrides": _model_overrides(_sweep_args(args, "bench", grid, args.epochs, root)) + _DATA,
            "lora": str(loras[-1])}
    _, _, out = run([sys.executable, "-m", "lora_lab.bench", "probe", json.dumps(spec)], root)
    return result_of(out)


def _memory(args, root: Path) -> Dict:
    grid = list(range(1, args.memory_trials + 1))
    one = argparse.Namespace(**{**vars(args), "workers": 1})  # resident memory of one worker
    run(_sweep_args(one, "memory", grid, 1, root, ["eval.max_prompts=1", "eval.strengths=[0,1]"]), root)
    rss = [i["rss_mb"] for i in _trials(root / "memory")]
    return {"rss_mb": rss, "growth_2_to_last": (rss[-1] / rss[1] - 1) if len(rss) > 2 else None}


def bound_of(ours: Dict, floor: Dict, workers: int = 1) -> Dict:
    """The least time the sweep's work could take: one load (the probe's), the sweep's own
    training steps at its own speed, its images at the probe's best batched speed. With several
    workers, each trains on its own share of the cores at the speed it measured (their training
    seconds, summed, divided among them); rendering stays at the probe's best for the machine."""
    bound = {"load_s": floor["load_s"], "train_s": ours["train_s"] / workers,
             "render_s": ours["images"] / floor["best_images_per_s"]}
    bound["total_s"] = sum(bound.values())
    return bound


def compare(args) -> Dict:
    out = Path(args.out).resolve()
    root = out / "compare"  # its own folder: `bench truth` keeps its studies beside it
    if root.exists():
        import shutil

        shutil.rmtree(root)
    root.mkdir(parents=True)
    grid = [4 * (i + 1) for i in range(args.trials)]
    print(f"lora_lab bench on {args.device}: model {args.model}, {args.resolution}px, {args.trials} trials x "
          f"{args.epochs} epochs x {len(args.strengths)} strengths x {args.prompts} prompts, {args.steps} sampling "
          f"steps, {args.workers} sweep worker{'s' if args.workers > 1 else ''}", flush=True)
    # Warm the shared cache (built-in model, demo data) so neither side pays for building it.
    run(_sweep_args(args, "warmup", [2], 1, root, ["eval.strengths=[0]", "eval.max_prompts=1", "eval.steps=1"]), root)
    print("manual-style baseline ...", flush=True)
    base = _baseline(args, root, grid)
    print("lora_lab sweep ...", flush=True)
    ours = _sweep(args, root, grid)
    print("probe: one load, rendering at batch sizes 1-32 ...", flush=True)
    floor = _probe(args, root, grid)
    print(f"memory check ({args.memory_trials} trials) ...", flush=True)
    mem = _memory(args, root)
    bound = bound_of(ours, floor, args.workers)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": __import__("torch").__version__,
                    "device": args.device},
        "settings": {k: v for k, v in vars(args).items() if k not in ("func",)},
        "baseline": base, "sweep": ours, "probe": floor, "bound": bound, "memory": mem,
        "speedup": base["wall_s"] / ours["wall_s"],
        "bound_ratio": ours["wall_s"] / bound["total_s"],
        "train_steps_per_s": {"cached": ours["steps"] / ours["train_s"], "uncached": base["steps"] / base["train_s"]},
        "images_per_s": {"sweep": ours["images"] / ours["render_s"], "baseline": base["images"] / base["render_s"],
                         "best_batched": floor["best_images_per_s"]},
        "switch_share_of_render": ours["switch_s"] / ours["render_s"],
        "attach_share_of_render": ours["attach_s"] / ours["render_s"],
        "warm_trial_setup_s": max(ours["setup_s"][1:] or ours["setup_s"]),
    }
    result["cache_speedup"] = result["train_steps_per_s"]["cached"] / result["train_steps_per_s"]["uncached"]
    (out / "bench.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(_table(result))
    print()
    print(_stage_table(result))
    print(f"json: {out / 'bench.json'}")
    return result


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _table(r: Dict) -> str:
    b, s, m, bound = r["baseline"], r["sweep"], r["memory"], r["bound"]
    growth = m["growth_2_to_last"]
    workers = r["settings"].get("workers", 1)
    render_ratio = r["images_per_s"]["best_batched"] / r["images_per_s"]["sweep"]
    rows = [
        ("whole run, wall", f"{b['wall_s']:.1f} s", f"{s['wall_s']:.1f} s",
         f"{r['speedup']:.2f}x faster (target >= {TARGET_SPEEDUP:g}x: {_met(r['speedup'] >= TARGET_SPEEDUP)})"),
        ("lower bound for the sweep's work", "", f"{bound['total_s']:.1f} s",
         f"sweep = {r['bound_ratio']:.2f}x the bound (target <= {TARGET_BOUND_RATIO:g}x: "
         f"{_met(r['bound_ratio'] <= TARGET_BOUND_RATIO)})"),
        ("time loading models", f"{b['load_s']:.1f} s", f"{s['load_s']:.1f} s", "start-up and imports included"),
        ("training steps / s", f"{r['train_steps_per_s']['uncached']:.2f}", f"{r['train_steps_per_s']['cached']:.2f}",
         f"{r['cache_speedup']:.2f}x with caches" + (f" (per worker, {workers} workers)" if workers > 1 else "")),
        ("evaluation images / s", f"{r['images_per_s']['baseline']:.2f}", f"{r['images_per_s']['sweep']:.2f}",
         f"{s['images']} vs {b['images']} images, batch {s['batch_size']}; best batched "
         f"{r['images_per_s']['best_batched']:.2f} (batch {r['probe']['best_batch']}): {render_ratio:.2f}x "
         f"(target <= {TARGET_RENDER_RATIO:g}x: {_met(render_ratio <= TARGET_RENDER_RATIO)})"
         + (" (per worker)" if workers > 1 else "")),
        ("epoch switching", "", f"{100 * r['switch_share_of_render']:.2f}% of rendering",
         f"target < {100 * TARGET_SWITCH:g}%: {_met(r['switch_share_of_render'] < TARGET_SWITCH)}"),
        ("attaching the LoRA, once per trial", "", f"{100 * r['attach_share_of_render']:.2f}% of rendering", ""),
        ("per-trial set-up, warm worker", "", f"{r['warm_trial_setup_s']:.2f} s", "target < 1 s"),
        ("peak memory", f"{b['peak_mb']:.0f} MB", f"{s['peak_mb']:.0f} MB",
         f"{workers} workers together" if workers > 1 else ""),
        (f"RSS trial 2 -> {len(m['rss_mb'])}", "", f"{m['rss_mb'][1]:.0f} -> {m['rss_mb'][-1]:.0f} MB",
         f"{100 * growth:+.1f}% (target within 10%)" if growth is not None else ""),
    ]
    if r["machine"]["device"] == "cuda":
        rows.append(("peak GPU memory", f"{b['peak_gpu_mb']:.0f} MB", f"{s['peak_gpu_mb']:.0f} MB", ""))
    return _columns(("", "baseline", "lora_lab", ""), rows)


def _stage_table(r: Dict) -> str:
    """Where each second went, side by side, with the bound's share of each stage."""
    b, s, bound = r["baseline"]["stages"], r["sweep"]["stages"], r["bound"]
    floor = {"load": bound["load_s"], "train": bound["train_s"], "render": bound["render_s"]}
    rows = [(stage, f"{b[stage]:.1f} s", f"{s[stage]:.1f} s", f"{100 * s[stage] / r['sweep']['wall_s']:.0f}%",
             f"{floor[stage]:.1f} s" if stage in floor else "")
            for stage in STAGES]
    rows.append(("total", f"{r['baseline']['wall_s']:.1f} s", f"{r['sweep']['wall_s']:.1f} s", "100%",
                 f"{bound['total_s']:.1f} s"))
    return _columns(("stage", "baseline", "lora_lab", "share", "bound"), rows)


def _columns(head, rows) -> str:
    """Left-aligned text columns."""
    width = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, width)).rstrip() for row in [head, *rows])


def check_device(device: str) -> None:
    """Refuse ``--device cuda`` plainly where it cannot run, before any work."""
    if device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: this machine has no CUDA GPU that torch can use "
                         f"(torch {torch.__version__}, torch.cuda.is_available() is False); run the benchmark "
                         "without --device to measure on the CPU")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise SystemExit("error: --device cuda measures with 8-bit AdamW, which needs bitsandbytes: "
                         "pip install bitsandbytes") from None


def _truth(argv: List[str]) -> int:
    from lora_lab.bench import studies
    from lora_lab.bench import truth as truthbench

    parser = argparse.ArgumentParser(prog="python -m lora_lab.bench truth",
                                     description="lora_lab's verdicts, picks and pruning against the toy world's "
                                                 "truth on held-out subjects, with the toy world's shipped thresholds "
                                                 "(--full: chosen again on calibration subjects)")
    parser.add_argument("--cache-dir", default="sweeps/.cache")
    parser.add_argument("--out", default="sweeps/bench")
    parser.add_argument("--full", action="store_true",
                        help="also run the calibration subjects' studies and choose the thresholds on them "
                             "(three more studies, about 35 minutes on 2 cores), saying whether the shipped "
                             "thresholds come out")
    parser.add_argument("--calibration", type=lambda s: s.split(","), default=None,
                        help="subjects the thresholds are chosen on (implies --full): shipped names or subject .yaml "
                             f"files, comma-separated; default with --full: {','.join(truthbench.CALIBRATION)}")
    parser.add_argument("--heldout", type=lambda s: s.split(","), default=list(truthbench.HELDOUT),
                        help="subjects the figures are reported on: shipped names or subject .yaml files, comma-separated")
    parser.add_argument("--jobs", type=int, default=studies.default_jobs(),
                        help="studies run at once, each on cores/jobs threads, and the processes of the threshold "
                             "search (default: 2 with 2 or more cores)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every study (eval.seeds=[1,2] ...)")
    args = parser.parse_args(argv)
    args.cache_dir = str(Path(args.cache_dir).resolve())
    truthbench.run(args)
    return 0


# `python -m lora_lab.bench NAME ...` -> the module of lora_lab.bench whose run(argv) it calls
SUBCOMMANDS = {"calibrate": "calibrate", "network": "network", "train": "train_profile", "doctor": "doctor",
               "report": "report"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["truth"]:
        return _truth(argv[1:])
    if argv[:1] and argv[0] in SUBCOMMANDS:  # each imported only when asked for
        import importlib

        importlib.import_module(f"lora_lab.bench.{SUBCOMMANDS[argv[0]]}").run(argv[1:])
        return 0
    if argv[:1] in (["baseline-trial"], ["probe"]):
        from lora_lab.cli import setup_logging

        setup_logging()
        measure = baseline_trial if argv[0] == "baseline-trial" else probe
        print(RESULT_PREFIX + json.dumps(measure(json.loads(argv[1]))), flush=True)
        return 0
    parser = argparse.ArgumentParser(prog="python -m lora_lab.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: an SD 1.5-shaped random model at 512 px, fp16 mixed precision, 8-bit AdamW")
    parser.add_argument("--model", default=None, choices=["bench", "tiny", "bench_sd15"],
                        help="bench: UNet 64/128/256 channels, VAE factor 8 (default on cpu); tiny: the test model; "
                             "bench_sd15: SD 1.5's architecture, random weights (default on cuda)")
    parser.add_argument("--resolution", type=int, default=None, help="default 64 on cpu, 512 on cuda")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--strengths", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.5, 0.75, 1.0])
    parser.add_argument("--prompts", type=int, default=2, help="an even number: half likeness, half adaptability")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps per image")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1,
                        help="sweep.workers for the sweep (several: each gets its share of the CPU threads)")
    parser.add_argument("--memory-trials", type=int, default=10)
    parser.add_argument("--cache-dir", default="sweeps/.cache")
    parser.add_argument("--out", default="sweeps/bench")
    args = parser.parse_args(argv)
    if args.prompts < 2 or args.prompts % 2:
        parser.error("--prompts must be an even number >= 2")
    check_device(args.device)
    cuda = args.device == "cuda"
    args.model = args.model or ("bench_sd15" if cuda else "bench")
    args.resolution = args.resolution or (512 if cuda else 64)
    args.cache_dir = str(Path(args.cache_dir).resolve())
    compare(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
