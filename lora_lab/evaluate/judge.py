"""Score tables -> per-cell verdicts (underfit / good / overfit, with reasons) and the best cell.

Pure pandas, no torch: testable with constructed scores. The strength-0 cell is the base model,
the baseline for likeness and adherence; the ceiling is the references' own similarity to their
centroid (DreamBooth's "real images" row).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Dict, List, Optional

import pandas as pd

from lora_lab.config import JudgeConfig
from lora_lab.numbers import fmt
from lora_lab.report.leaderboard import LEFT_OUT

CELL = ["epoch", "label", "strength"]


def aggregate(scores: pd.DataFrame, kind: str) -> pd.DataFrame:
    """One row per (epoch, label, strength): likeness, face rate, adherence, copy, diversity.

    ``scores`` has one row per image (epoch, label, strength, prompt_kind, prompt, seed, ...)
    and a ``diversity`` column per (cell, prompt) (same value on each seed's row).
    """
    rows = []
    for (epoch, label, strength), g in scores.groupby(CELL, sort=True):
        like = g[g.prompt_kind == "likeness"]
        adapt = g[g.prompt_kind == "adaptability"]
        row = {"epoch": epoch, "label": label, "strength": strength}
        if kind == "person":
            detected = like.face_detected.astype(bool)
            row["face_rate"] = float(detected.mean()) if len(like) else math.nan
            row["likeness"] = float(like.face_likeness[detected].mean()) if detected.any() else math.nan
        else:
            row["face_rate"] = math.nan
            row["likeness"] = float(like.clip_i.mean()) if len(like) else math.nan
        per_image = like.face_likeness[detected] if kind == "person" else like.clip_i
        row["likeness_se"] = float(per_image.std() / math.sqrt(len(per_image))) if len(per_image) > 1 else math.nan
        for prompt, pg in like.groupby("prompt", sort=False):  # per likeness prompt, for the prompt rule
            values = pg.face_likeness[pg.face_detected.astype(bool)] if kind == "person" else pg.clip_i
            row[f"likeness::{prompt}"] = float(values.mean()) if len(values) else math.nan
        row["clip_i"] = float(like.clip_i.mean()) if len(like) else math.nan
        row["adherence"] = float(adapt.clip_adherence.mean()) if len(adapt) else math.nan
        for prompt, pg in adapt.groupby("prompt", sort=False):
            row[f"adherence::{prompt}"] = float(pg.clip_adherence.mean())
            probs = pg.ask_prob.dropna() if "ask_prob" in pg else pd.Series(dtype=float)
            if len(probs):  # contrastive: the ask against what the subject has instead
                row[f"ask::{prompt}"] = float(probs.mean())
                row[f"ask_won::{prompt}"] = int((probs > 0.5).sum())
                row[f"ask_n::{prompt}"] = int(len(probs))
                if "ask_method" in pg and pg.ask_method.iloc[0] == "vqa":  # a yes/no answer: no versus
                    asked, own = phrases(str(pg.judge.iloc[0]), "")[0], ""
                else:
                    asked, own = phrases(str(pg.judge.iloc[0]), str(pg.versus.iloc[0]))
                row[f"asked::{prompt}"], row[f"own::{prompt}"] = asked, own
        top = g.loc[g.clip_i_max.idxmax()]
        row["copy_similarity"] = float(top.clip_i_max)
        row["copy_reference"] = top.closest_reference
        per_prompt = g.groupby("prompt", sort=False).diversity.first()
        row["diversity"] = float(per_prompt.mean()) if per_prompt.notna().any() else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _baseline(agg: pd.DataFrame) -> Optional[pd.Series]:
    base = agg[agg.strength == 0]
    return None if base.empty else base.iloc[0]


def phrases(ask: str, versus: str) -> tuple[str, str]:
    """The words where an ask's text and its versus text differ ("brown eyes" / "blue eyes"
    from "a photo of a person with brown eyes" / "... with blue eyes")."""
    a, v = ask.split(), versus.split()
    start = 0
    while start < min(len(a), len(v)) - 1 and a[start] == v[start]:
        start += 1
    if not v:  # no versus: the ask past "a photo of a person"
        start = next((i + 1 for i, w in enumerate(a) if w.strip(",") in ("person", "woman", "man")), 0)
        start += int(start < len(a) - 1 and a[start] == "with")
    return " ".join(a[start:]).strip(" ,."), " ".join(v[start:]).strip(" ,.")


def judge(agg: pd.DataFrame, ceiling: float, cfg: JudgeConfig) -> pd.DataFrame:
    """Add ``gain``, ``combined``, ``pick_margin``, ``verdict``, ``reasons`` and ``instead``
    (what the seeds show in place of each lost ask, where the contrastive reading says: "pink
    background"; empty otherwise) to the aggregated table.

    A cell is ``overfit`` when an asked change is lost: with a ``versus`` text (or VQA), the
    images are less than ``1 - ask_drop`` times as likely as the base model's to show the ask
    rather than the subject's own (a probability, so the same on any scorer); for every ask,
    its CLIP score falls more than ``adherence_drop`` below the base model's. Also overfit: a generation
    nearly copies a training image, or diversity across seeds collapses. Otherwise ``underfit``
    when its likeness gain over the base model is below ``underfit_gain`` of the gap to the
    ceiling; otherwise ``good``.
    """
    agg, left_out = informative_likeness(agg, ceiling, cfg)
    base = _baseline(agg)
    out = agg.copy()
    out.attrs["likeness_prompts_left_out"] = left_out
    verdicts, reasons, gains, combined, noise, instead = [], [], [], [], [], []
    prompts = [c.split("::", 1)[1] for c in agg.columns if c.startswith("adherence::")]
    for _, cell in agg.iterrows():
        if cell.strength == 0 or base is None:
            verdicts.append("base")
            reasons.append(["the base model (strength 0): the baseline"])
            gains.append(0.0)
            combined.append(math.nan)
            noise.append(math.nan)
            instead.append("")
            continue
        why_over: List[str] = []
        ratios: List[float] = []
        shown: List[str] = []  # what showed instead of a lost ask, where the seeds' reading says
        for prompt in prompts:
            lost, ratio, own = _ask_lost(prompt, cell, base, cfg)
            if lost:
                why_over.append(lost)
            if own:
                shown.append(own)
            if _ok(ratio):
                ratios.append(ratio)
        # A near copy is judged against what the base model already does: the cell must pass
        # copy_threshold and be at least halfway from the base model's similarity to identity.
        copy_bar = max(cfg.copy_threshold, (1 + base.copy_similarity) / 2) if _ok(base.copy_similarity) \
            else cfg.copy_threshold
        if _ok(cell.copy_similarity) and cell.copy_similarity >= copy_bar:
            why_over.append(f"nearly copies training image {cell.copy_reference} "
                            f"(CLIP-I {cell.copy_similarity:.3f} >= {copy_bar:.3g}; base {base.copy_similarity:.3f})")
        d, d0 = cell.diversity, base.diversity
        if _ok(d) and _ok(d0) and d0 > 0 and d < (1 - cfg.diversity_drop) * d0:
            why_over.append(f"the seeds all look alike: diversity across seeds {d:.3f} vs base {d0:.3f}")
        gain = likeness_gain(cell.likeness, base.likeness, ceiling)
        gains.append(gain)
        rate = cell.face_rate if _ok(cell.face_rate) else 1.0
        adherence_ratio = sum(ratios) / len(ratios) if ratios else 1.0
        combined.append(combined_score(gain, adherence_ratio, cfg, rate))
        se = cell.get("likeness_se", math.nan)
        spread = ceiling - base.likeness if _ok(ceiling) and _ok(base.likeness) else math.nan
        # the tie margin of the pick: pick_noise standard errors of the likeness term
        noise.append(cfg.pick_noise * cfg.likeness_weight * rate * se / spread
                     if _ok(se) and _ok(spread) and spread > 1e-6 else math.nan)
        verdict = rung(bool(why_over), gain, cfg)
        verdicts.append(verdict)
        instead.append(", ".join(shown))
        if verdict == "overfit":
            reasons.append(why_over)
        elif not _ok(cell.likeness):
            reasons.append(["likeness could not be measured: no face detected in the likeness images"
                            if _ok(cell.face_rate) else "likeness could not be measured"])
        elif verdict == "underfit":
            reasons.append([f"too little of the subject yet: likeness {cell.likeness:.3f} is {_short_of(gain, cfg.underfit_gain)} of the way "
                            f"from the base model ({_fmt(base.likeness)}) to the training images ({ceiling:.3f}); "
                            f"needs {cfg.underfit_gain:.0%}", *left_out])
        else:
            reasons.append([f"likeness {cell.likeness:.3f}, {_pct(gain)} of the way from the base model to the "
                            f"training images ({ceiling:.3f}); {_kept(cell, base, prompts)}"])
    out["gain"] = gains
    out["combined"] = combined
    out["pick_margin"] = noise
    out["verdict"] = verdicts
    out["reasons"] = reasons
    out["instead"] = instead
    return out


def informative_likeness(agg: pd.DataFrame, ceiling: float, cfg: JudgeConfig) -> tuple[pd.DataFrame, List[str]]:
    """Likeness from the likeness prompts that show something: a prompt whose best cell comes
    less than ``likeness_prompt_gain`` of the way from the base model to the training images
    is left out of ``likeness`` (all count where none or every one falls short). Returns the
    table (likeness recomputed only when a prompt is left out) and a sentence per prompt left out."""
    base = _baseline(agg)
    cols = [c for c in agg.columns if c.startswith("likeness::")]
    if cfg.likeness_prompt_gain <= 0 or len(cols) < 2 or base is None:
        return agg, []
    lora = agg[agg.strength != 0]
    best = {c: max((g for g in (likeness_gain(v, base[c], ceiling) for v in lora[c]) if _ok(g)), default=math.nan)
            for c in cols}
    short = [c for c in cols if not (_ok(best[c]) and best[c] >= cfg.likeness_prompt_gain)]
    if not short or len(short) == len(cols):
        return agg, []
    out = agg.copy()
    out["likeness"] = out[[c for c in cols if c not in short]].mean(axis=1)
    return out, [f"{LEFT_OUT}'{c.split('::', 1)[1]}': no cell's images came more than {_pct(best[c])} of the "
                 f"way from the base model's to the training images (a prompt counts from "
                 f"{cfg.likeness_prompt_gain:.0%}); the training images may share what it changes"
                 for c in short]


def _ask_lost(prompt: str, cell: pd.Series, base: pd.Series,
              cfg: JudgeConfig) -> tuple[Optional[str], float, str]:
    """(why the ask counts as lost or None, the cell's adherence relative to the base model's,
    what the seeds show instead or "") for one adaptability prompt: by probability where the
    suite gives a ``versus`` (or VQA scored it), and by CLIP score for every ask. The relative
    adherence is the probability's ratio where there is one (scale-free, as the truth's share of
    images that show the ask), else the CLIP score's. Where the CLIP score alone finds the ask
    lost but a versus reading exists, the reason says what that reading shows, so that a user
    sees both signals in words."""
    a, a0 = cell.get(f"adherence::{prompt}", math.nan), base.get(f"adherence::{prompt}", math.nan)
    clip_ratio = a / a0 if _ok(a) and _ok(a0) and a0 > 0 else math.nan
    p, p0 = cell.get(f"ask::{prompt}", math.nan), base.get(f"ask::{prompt}", math.nan)
    contrastive = _ok(p) and _ok(p0) and p0 > 0
    # how likely the ask is, relative to the base model, where there is a probability: what the pick weighs
    ratio = p / p0 if contrastive else clip_ratio
    if contrastive and p < (1 - cfg.ask_drop) * p0:
        asked, own, n, won, n0, won0 = _seeds(cell, base, prompt)
        if not isinstance(own, str) or not own:  # question answering: a yes or a no (a CSV reads "" as NaN)
            return (f"asked {asked}; the answer is no in {n - won} of {n} seeds (P(yes) {p:.2f}); base model: "
                    f"yes in {won0} of {n0} (P {p0:.2f})"), ratio, ""
        return (f"asked {asked}; the images are more like {own} in {n - won} of {n} seeds (P(ask) {p:.2f}); "
                f"base model: {asked} in {won0} of {n0} (P {p0:.2f})"), ratio, own
    if _ok(clip_ratio) and a < (1 - cfg.adherence_drop) * a0:
        blind = "" if contrastive else ("; the suite gives no 'versus' for it, so this is a similarity, blind to "
                                        "a small lost change")
        why = (f"the asked change fades: '{prompt}' matches its text {1 - a / a0:.0%} less than on the base "
               f"model (CLIP {a:.1f} vs base {a0:.1f}{blind})")
        if contrastive:
            why += _reading(cell, base, prompt)
        return why, ratio, ""
    return None, ratio, ""


def _reading(cell: pd.Series, base: pd.Series, prompt: str) -> str:
    """The versus reading in words, beside a lost ask that only the CLIP score caught."""
    asked, own, n, won, n0, won0 = _seeds(cell, base, prompt)
    if not isinstance(own, str) or not own:
        return ""
    return (f"; CLIP's either-or reading still prefers {asked} to {own} in {won} of {n} seeds (base model: "
            f"{won0} of {n0})")


def _seeds(cell: pd.Series, base: pd.Series, prompt: str) -> tuple:
    """(asked, own, seeds, seeds that show the ask, the base model's seeds, its seeds that show it)."""
    return (cell[f"asked::{prompt}"], cell[f"own::{prompt}"], int(cell[f"ask_n::{prompt}"]),
            int(cell[f"ask_won::{prompt}"]), int(base[f"ask_n::{prompt}"]), int(base[f"ask_won::{prompt}"]))


def _kept(cell: pd.Series, base: pd.Series, prompts: List[str]) -> str:
    """The good cell's adherence in words: how many seeds show each ask, or CLIP's score."""
    shown = [(cell[f"asked::{p}"], int(cell[f"ask_won::{p}"]), int(cell[f"ask_n::{p}"]))
             for p in prompts if _ok(cell.get(f"ask::{p}", math.nan))]
    if shown:
        return "asked changes kept: " + ", ".join(f"{asked} in {won} of {n}" for asked, won, n in shown)
    return f"asked changes kept: adherence {_fmt(cell.adherence, 1)} vs base {_fmt(base.adherence, 1)}"


def best_cell(judged: pd.DataFrame) -> Optional[pd.Series]:
    """The cell a user should keep, among non-overfit LoRA cells (None if every cell is
    overfit): of the cells whose combined score is within the seeds' noise of the highest (its
    likeness's standard error times ``pick_noise``: ``pick_margin``), the lowest strength, then the earliest epoch,
    as users keep the gentler of two equally good cells."""
    pool = judged[(judged.strength != 0) & (judged.verdict != "overfit")]
    if pool.empty:
        return None
    ranked = pool.sort_values(["combined", "epoch", "strength"], ascending=[False, True, True])
    top = ranked.iloc[0]
    se = top.get("pick_margin", math.nan)
    if not _ok(top.combined) or not _ok(se):
        return top
    ties = ranked[ranked.combined >= top.combined - se]
    return ties.sort_values(["strength", "epoch"]).iloc[0]


def verdict_document(judged: pd.DataFrame, ceiling: float, cfg: JudgeConfig, files: Dict[str, str],
                     notes: List[str]) -> dict:
    """What ``verdict.json`` holds: the best cell with its A1111 snippet, every cell, settings."""
    best = best_cell(judged)
    doc = {
        "best": None,
        "ceiling": _json(ceiling),
        "thresholds": asdict(cfg),
        "notes": notes + list(judged.attrs.get("likeness_prompts_left_out", [])),
        "cells": [{k: _json(v) for k, v in row.items()} for row in judged.to_dict(orient="records")],
    }
    if best is not None:
        doc["best"] = {
            "epoch": int(best.epoch),
            "strength": float(best.strength),
            "file": files[best.label],
            "snippet": f"<lora:{best.label}:{best.strength:g}>",
            "verdict": best.verdict,
            "combined": _json(best.combined),
            "likeness": _json(best.likeness),
            "adherence": _json(best.adherence),
            "reasons": list(best.reasons),
        }
    return doc


def rung(overfit: bool, gain: float, cfg: JudgeConfig) -> str:
    """The verdict ladder, shared with the truth benchmark: overfit when any overfit sign shows;
    else underfit when the likeness gain is unmeasured or below ``underfit_gain``; else good."""
    if overfit:
        return "overfit"
    if not _ok(gain) or gain < cfg.underfit_gain:
        return "underfit"
    return "good"


def combined_score(gain: float, adherence_ratio: float, cfg: JudgeConfig, rate: float = 1.0) -> float:
    """The score a pick ranks by: weighted likeness gain (0 when unmeasured; times the share of
    images with a detected face) plus weighted adherence relative to the base model (the asks'
    probability ratio where a ``versus`` or VQA gives one, else the CLIP score ratio)."""
    return cfg.likeness_weight * (gain if _ok(gain) else 0.0) * rate + cfg.adherence_weight * adherence_ratio


def likeness_gain(value: float, base: float, ceiling: float) -> float:
    """How far ``value`` is from the base model's likeness to the ceiling (0 = base, 1 = ceiling)."""
    if not (_ok(value) and _ok(base) and _ok(ceiling)) or ceiling - base <= 1e-6:
        return math.nan
    return (value - base) / (ceiling - base)


def _ok(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and not math.isnan(x)


def _pct(x: float) -> str:
    return f"{x:.0%}" if _ok(x) else "n/a"


def _short_of(x: float, bar: float) -> str:
    """``x`` as a percentage with enough decimals that it does not read as the ``bar`` it falls
    short of ("49.7%", not "50%", beside "needs 50%")."""
    if not _ok(x):
        return "n/a"
    for digits in range(3):
        if round(x * 100, digits) < round(bar * 100, digits):
            break
    return f"{x:.{digits}%}"


def _fmt(x: float, digits: int = 3) -> str:
    return fmt(x, f".{digits}f")


def _json(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    if hasattr(v, "item"):
        return _json(v.item())
    return v
