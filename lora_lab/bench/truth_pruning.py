"""The truth benchmark's pruning figures: the per-epoch check that feeds the pruner, replayed
from a study's stored images, its rank correlation with each trial's final objective, and what
Optuna's pruners (built by the sweep's own code, fed the recorded checks) would have saved or
lost on each split's studies."""

from __future__ import annotations

from typing import Dict, List, Optional

import pandas as pd

from lora_lab.config import JudgeConfig
from lora_lab.evaluate.judge import aggregate, best_cell, judge

# The per-epoch check that feeds the pruner, replayed from the full evaluation's images: which
# prompts (the first n of each kind), seeds and strengths it looks at.
CHECKS = {
    "before": {"max_prompts": 1, "seeds": 1, "strengths": [0.0, 1.0]},  # lora_lab up to 2026-12
    "now": {"max_prompts": 2, "seeds": 2, "strengths": None},  # None: the evaluation's strengths
}


def check_values(t: dict, cfg: JudgeConfig, check: dict) -> Dict[int, float]:
    """Epoch -> the check's objective (the best non-overfit cell's combined; 0 if none)."""
    s = t["scores"]
    keep = pd.Series(True, index=s.index)
    for kind in ("likeness", "adaptability"):
        prompts = list(dict.fromkeys(s[s.prompt_kind == kind].prompt))[: check["max_prompts"]]
        keep &= (s.prompt_kind != kind) | s.prompt.isin(prompts)
    seeds = sorted(s.seed.unique())[: check["seeds"]]
    keep &= s.seed.isin(seeds)
    if check["strengths"] is not None:
        keep &= s.strength.isin(check["strengths"])
    sub = s[keep]
    out = {}
    base = sub[sub.strength == 0]
    for epoch in sorted(e for e in sub.epoch.unique() if e > 0):
        cell = pd.concat([base, sub[sub.epoch == epoch]], ignore_index=True)
        judged = judge(aggregate(cell, t["kind"]), t["ceiling"], cfg)
        best = best_cell(judged)
        out[int(epoch)] = 0.0 if best is None or pd.isna(best.combined) else float(best.combined)
    return out


def _spearman(a: List[float], b: List[float]) -> Optional[float]:
    if len(a) < 3:
        return None
    r = pd.Series(a).rank().corr(pd.Series(b).rank())
    return None if pd.isna(r) else round(float(r), 3)


def _pruners() -> dict:
    """The pruners replayed, built by the sweep's own :func:`lora_lab.sweep.study.make_pruner`."""
    from lora_lab.config import SweepConfig
    from lora_lab.sweep.study import make_pruner

    def make(**kw):
        return lambda: make_pruner(SweepConfig(name="replay", grid={"x": [0]}, pruner_startup_trials=2, **kw))

    return {
        "median, no warm-up (before)": make(pruner="median", pruner_warmup_epochs=0),
        "median, 1 warm-up epoch": make(pruner="median", pruner_warmup_epochs=1),
        "25th percentile, 1 warm-up epoch": make(pruner="percentile", pruner_percentile=25.0, pruner_warmup_epochs=1),
        "median, patience 1": make(pruner="median", pruner_warmup_epochs=0, pruner_patience=1),
        "median, 1 warm-up epoch, patience 1": make(pruner="median", pruner_warmup_epochs=1, pruner_patience=1),
    }


def replay_pruner(make, studies: Dict[str, List[dict]], values: Dict[str, Dict[int, float]],
                  finals: Dict[str, float], true_best: Dict[str, List[str]]) -> dict:
    """Feed each study's recorded per-epoch checks to a fresh Optuna pruner, trials in order.
    ``true_best``: per study, the trials whose best cell has the study's highest true score (a
    tie keeps them all); the study's true best is lost only when every one of them is pruned,
    since a kept trial as good as the best loses the user nothing."""
    from lora_lab.sweep.study import replay_pruning

    saved = total = lost = 0
    pruned_trials = []
    for name, trials in studies.items():
        recorded = [(values[t["trial_key"]], finals[t["trial_key"]]) for t in trials]
        stopped_here = set()
        for t, (per_epoch, _), stopped in zip(trials, recorded, replay_pruning(make, recorded)):
            epochs = max(per_epoch) + 1 if per_epoch else 0  # the last epoch is never checked
            total += epochs
            if stopped is not None:
                saved += epochs - stopped
                pruned_trials.append(t["trial_key"])
                stopped_here.add(t["trial_key"])
        lost += int(set(true_best[name]) <= stopped_here)
    return {"trial_epochs_saved": round(saved / total, 4) if total else None, "true_best_pruned": lost,
            "studies": len(studies), "pruned": pruned_trials}


def true_best_trials(cells: pd.DataFrame, name: str) -> List[str]:
    """The study's true best trials: those whose best cell that is not truly overfit (any cell
    where every one is) has the highest true combined score, ties all kept (the read-out's
    shares are fractions of a few images, so equal scores are common)."""
    mine = cells[(cells.subject == name) & cells.true_combined.notna()]
    ok = mine[mine.true_verdict != "overfit"]
    pool = ok if len(ok) else mine
    top = pool.groupby("trial").true_combined.max().round(9)
    return [f"{name}/{trial}" for trial in sorted(top.index[top == top.max()])]


def pruning(trials: List[dict], cfg: JudgeConfig, cells: pd.DataFrame, split: Dict[str, str]) -> dict:
    """Rank correlation of each check with the final objective, and each pruner replayed."""
    for t in trials:
        t["trial_key"] = f"{t['subject']}/{t['trial']}"
    finals, true_best = {}, {}
    for t in trials:
        judged = judge(t["agg"], t["ceiling"], cfg)
        best = best_cell(judged)
        finals[t["trial_key"]] = 0.0 if best is None or pd.isna(best.combined) else float(best.combined)
    for name in {t["subject"] for t in trials}:
        true_best[name] = true_best_trials(cells, name)
    out = {"spearman_by_epoch": {}, "checks": CHECKS, "pruners": {},
           "true_best": {name: true_best[name] for name in sorted(true_best)}}
    values = {}
    for label, check in CHECKS.items():
        values[label] = {t["trial_key"]: check_values(t, cfg, check) for t in trials}
        epochs = sorted({e for v in values[label].values() for e in v})
        out["spearman_by_epoch"][label] = {
            str(e): _spearman([values[label][t["trial_key"]][e] for t in trials if e in values[label][t["trial_key"]]],
                              [finals[t["trial_key"]] for t in trials if e in values[label][t["trial_key"]]])
            for e in epochs}
    for part in [p for p in ("calibration", "heldout") if p in split.values()]:
        studies = {}
        for t in trials:
            if split[t["subject"]] == part:
                studies.setdefault(t["subject"], []).append(t)
        last = {t["trial_key"]: {e: v for e, v in values["now"][t["trial_key"]].items()
                                 if e < max(values["now"][t["trial_key"]])} for t in trials}
        out["pruners"][part] = {name: replay_pruner(make, studies, last, finals, true_best)
                                for name, make in _pruners().items()}
        before = {t["trial_key"]: {e: v for e, v in values["before"][t["trial_key"]].items()
                                   if e < max(values["before"][t["trial_key"]])} for t in trials}
        out["pruners"][part]["median, no warm-up, check before"] = replay_pruner(
            _pruners()["median, no warm-up (before)"], studies, before, finals, true_best)
    return out
