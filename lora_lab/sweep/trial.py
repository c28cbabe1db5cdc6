"""One trial of a study: its config, training with the per-epoch check, the evaluation.

No optuna here: a trial is anything with ``number``, ``report(value, epoch)`` and
``should_prune()``; :mod:`lora_lab.sweep` hands in Optuna's. A :class:`Worker` loads the base
model, data, scorers and prompt suite once and runs its trials one by one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import OmegaConf

from lora_lab.config import Config, to_config, to_yaml
from lora_lab.files import atomic_write_text
from lora_lab.report.tensorboard import log_hparams

log = logging.getLogger("lora_lab.sweep")
RUNNING, COMPLETE, PRUNED, FAILED = "running", "complete", "pruned", "failed"


def trial_config(config: Config, params: Dict[str, Any], trial_dir: Path) -> Config:
    """The study's config with the fixed values, the trial's parameters and its folder applied.

    A key the command line set (``Config.explicit``) keeps its value over the sweep file's
    ``fixed`` (``+sweep=truth eval.seeds=[1,2,3,4]`` renders four seeds); what a trial sweeps
    (its grid, space or variant values) is set whatever the command line said."""
    sweep = config.sweep
    node = OmegaConf.structured(replace(config, sweep=None))
    values = {k: v for k, v in sweep.fixed.items() if k not in config.explicit}
    for key, value in params.items():
        if key == "variant":
            values.update(sweep.variants[value])
        else:
            values[key] = value
    for key, value in values.items():
        OmegaConf.update(node, key, value, merge=False)
    node.output_dir = str(trial_dir)
    if "train.output_name" not in values:
        # Unique file names across trials, so <lora:name:0.7> means one file in A1111's folder.
        node.train.output_name = f"{sweep.name}_{trial_dir.name}"
    out = to_config(node, config.explicit)
    out.sweep = sweep
    return out


def command_line_notes(config: Config) -> List[str]:
    """One line per command-line key the sweep file also names: which value its trials use."""
    sweep, lines = config.sweep, []
    for key in sorted(set(config.explicit) & set(sweep.fixed)):
        lines.append(f"{key}: the command line's value, not the sweep file's fixed {sweep.fixed[key]!r}")
    for key in sorted(set(config.explicit) & set(sweep.swept_keys())):
        some = [name for name, values in sweep.variants.items() if key in values]
        if key in sweep.grid or key in sweep.space or len(some) == len(sweep.variants):
            lines.append(f"{key}: swept by this study, so each trial sets its own; the command line's value is not used")
        else:
            lines.append(f"{key}: the command line's value, except in the variants that set their own "
                         f"({', '.join(some)})")
    return lines


def objective_value(verdict: dict, judged, objective: str) -> float:
    """The best non-overfit cell's metric; 0 when every cell is overfit (documented)."""
    best = verdict.get("best")
    if not best:
        return 0.0
    if objective == "gain":
        row = judged[(judged.epoch == best["epoch"]) & (judged.strength == best["strength"])].iloc[0]
        value = row.gain
    else:
        value = best[objective]
    return float(value) if value is not None and not (isinstance(value, float) and math.isnan(value)) else 0.0


def network_fields(t, result) -> Dict[str, Any]:
    """What a network-type comparison needs of a trial: the type, its size in trainable
    parameters and on disk, and how fast it trained (steps per second of the loop itself)."""
    last = result.lora_files[max(result.lora_files)] if result.lora_files else None
    return {"type": t.network_type, "trainable_params": result.trainable_params,
            "file_bytes": last.stat().st_size if last is not None and last.exists() else None,
            "steps_per_s": round(result.steps / result.train_s, 3) if result.train_s > 0 else None}


def network_text(t, network: Dict[str, Any]) -> str:
    """``lokr dim 8 alpha 8 factor 4: 12,345 trainable parameters, file 0.1 MB, 3.20 steps/s``."""
    settings = f"{t.network_type} dim {t.network_dim} alpha {t.network_alpha:g}"
    if t.conv_dim:
        settings += f" conv {t.conv_dim}/{t.conv_alpha:g}"
    if t.network_type == "lokr":
        settings += f" factor {t.factor}"
    size = f", file {network['file_bytes'] / 1e6:.2f} MB" if network.get("file_bytes") else ""
    speed = f", {network['steps_per_s']:.2f} steps/s" if network.get("steps_per_s") else ""
    return f"{settings}: {network['trainable_params']:,} trainable parameters{size}{speed}"


class Worker:
    """Loads the base model, data, scorers and prompt suite once; runs trials one by one."""

    def __init__(self, config: Config, study_dir: Path):
        from lora_lab.data.suites import load_suite
        from lora_lab.device import pick_device
        from lora_lab.evaluate.scores import Scorer
        from lora_lab.models.base import load_base

        self.config = config
        self.study_dir = study_dir
        self.device = pick_device(config.device)
        self.cache_dir = Path(config.cache_dir)
        self._datasets: Dict[str, Any] = {}
        self.dataset(config)
        started = time.time()
        self.base = load_base(config.model, self.cache_dir, self.device)
        dataset = self.dataset(config)
        self.suite = load_suite(config.eval.suite, dataset.token or "", dataset.suite)
        self.scorer = Scorer(self.suite.kind, config.eval.face, config.eval.clip, self.device,
                             config.eval.adherence, config.eval.vqa)
        self.base_renders: Dict[tuple, list] = {}  # base-model images shared by this worker's trials
        self.render_plan: Dict[Any, Any] = {}  # the batch size chosen once for this worker
        self.after_check = None  # called after every per-epoch check (the sweep rewrites its report)
        self.load_s = time.time() - started
        where = ""
        if self.device.type == "cpu":
            import torch

            n = torch.get_num_threads()
            where = f", {n} CPU thread{'s' if n > 1 else ''}"
        log.info(f"worker {os.getpid()}: loaded {self.base.source} and scorers in {self.load_s:.1f}s{where}")

    def dataset(self, config: Config):
        from lora_lab.data.dataset import load_dataset

        key = repr(config.data)
        if key not in self._datasets:
            self._datasets[key] = load_dataset(config.data, self.cache_dir, config.explicit)
        return self._datasets[key]

    def run(self, trial, params: Dict[str, Any]) -> Tuple[str, Optional[float], dict]:
        """Train and evaluate one trial; returns (state, objective value, trial.json fields)."""
        from lora_lab.evaluate.run import evaluate
        from lora_lab.train.loop import train
        from lora_lab.train.optimizers import check_environment

        sweep = self.config.sweep
        tdir = self.study_dir / f"trial_{trial.number}"
        tdir.mkdir(parents=True, exist_ok=True)
        cfg = trial_config(self.config, params, tdir)
        check_environment(cfg.train, self.device)
        if self.device.type == "cuda":
            from lora_lab.device import reset_cuda_peak

            reset_cuda_peak(self.device, self.render_plan)
        atomic_write_text(tdir / "config.yaml", to_yaml(cfg))
        dataset = self.dataset(cfg)
        pruned_at: Dict[str, Any] = {}
        check = sweep.prune_eval
        cheap = replace(cfg, eval=replace(
            cfg.eval, max_prompts=check.max_prompts,
            seeds=list(check.seeds) if check.seeds else list(cfg.eval.seeds)[: check.n_seeds],
            strengths=list(check.strengths) if check.strengths else list(cfg.eval.strengths),
            steps=check.steps or cfg.eval.steps))

        check_s = [0.0, 0]  # the per-epoch checks' time (inside train_s) and images

        def on_epoch(epoch: int, path: Path, loss: float) -> bool:
            if sweep.pruner == "none" or epoch == cfg.train.epochs:
                return False
            clock = time.perf_counter()
            ev = evaluate(cheap, self.base, dataset, tdir / "lora", tdir / "prune" / f"epoch_{epoch}",
                          scorer=self.scorer, suite=self.suite.limited(sweep.prune_eval.max_prompts),
                          progress=False, epochs=[epoch], base_renders=self.base_renders,
                          render_plan=self.render_plan)
            value = objective_value(ev.verdict, ev.judged, sweep.objective)
            check_s[0] += time.perf_counter() - clock
            check_s[1] += ev.timing["images"]
            trial.report(value, epoch)
            log.info(f"  trial {trial.number} epoch {epoch}: {sweep.objective} {value:.4g} (loss {loss:.4f})")
            if self.after_check is not None:
                self.after_check()
            if trial.should_prune():
                pruned_at.update(epoch=epoch, value=value)
                return True
            return False

        result = train(cfg, self.base, dataset, tdir, on_epoch=on_epoch, cache_dir=self.cache_dir)
        network = network_fields(cfg.train, result)
        log.info(f"  trial {trial.number}: {network_text(cfg.train, network)}")
        if result.stopped_early:
            bar = "median" if sweep.pruner == "median" else f"{sweep.pruner_percentile:g}th percentile"
            reason = (f"pruned after epoch {pruned_at['epoch']}: its per-epoch check ({len(cheap.eval.seeds)} seeds, "
                      f"strengths {', '.join(f'{x:g}' for x in cheap.eval.strengths)}) scored {sweep.objective} "
                      f"{pruned_at['value']:.4g}, below the {bar} of earlier trials at that epoch")
            return PRUNED, None, {"reason": reason, "pruned_at_epoch": pruned_at["epoch"], "network": network}
        ev = evaluate(cfg, self.base, dataset, tdir / "lora", tdir, scorer=self.scorer,
                      suite=self.suite.limited(cfg.eval.max_prompts), progress=False, tb_dir=tdir / "tb",
                      base_renders=self.base_renders, render_plan=self.render_plan)
        value = objective_value(ev.verdict, ev.judged, sweep.objective)
        timing = {"setup_s": round(result.setup_s, 3), "train_s": round(result.train_s, 3), "steps": result.steps,
                  "check_s": round(check_s[0], 3), "check_images": check_s[1],
                  **{k: round(ev.timing[k], 3) for k in ("render_s", "png_s", "switch_s", "attach_s", "write_s",
                                                         "score_s", "judge_s")},
                  "images": ev.timing["images"], "batch_size": ev.timing["batch_size"]}
        if self.device.type == "cuda":
            from lora_lab.device import cuda_peak_bytes

            timing["peak_gpu_mb"] = round(cuda_peak_bytes(self.device, self.render_plan) / 2**20, 1)
        best = ev.verdict["best"] or {}
        log_hparams(tdir / "tb", params, {"objective": value, "likeness": best.get("likeness"),
                                          "adherence": best.get("adherence"),
                                          "best_epoch": best.get("epoch"), "best_strength": best.get("strength")})
        reason = "; ".join(ev.verdict["best"]["reasons"]) if ev.verdict["best"] else \
            "every LoRA cell is overfit: objective set to 0"
        fields = {"reason": reason, "timing": timing, "network": network}
        if result.validation_loss:
            fields["validation_loss"] = {str(k): round(v, 6) for k, v in result.validation_loss.items()}
        return COMPLETE, value, fields


def write_trial(tdir: Path, **fields) -> None:
    path = tdir / "trial.json"
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(fields)
    atomic_write_text(path, json.dumps(current, indent=2, default=str) + "\n")
