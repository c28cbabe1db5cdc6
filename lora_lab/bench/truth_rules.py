"""Ground truth for an evaluation on the toy world: the read-out looks at every rendered image.

The true measurements replace CLIP's in the same rules the judge uses (``eval.judge``):

- true likeness of a cell: on its likeness images, the share of the subject's identity
  attributes (its subject file's ``identity``: for ``sks`` purple hair, spiky style, green
  eyes, star mark) that the read-out sees; the ceiling is the same share on the training
  drawings, the baseline the strength-0 cell;
- true adherence to an adaptability prompt: the share of its images that show what it asks
  (the subject file's ``asks``: ``with red hair`` -> hair colour red ...), against the base
  model's share;
- true verdict: overfit when a prompt's true adherence falls more than ``adherence_drop``
  below the base model's; else underfit when the true likeness gain is under
  ``underfit_gain``; else good. The true combined score ranks the cells.

Copy detection and diversity have no read-out counterpart and are left out of the truth.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pandas as pd
from PIL import Image

from lora_lab.config import JudgeConfig
from lora_lab.evaluate.judge import combined_score, likeness_gain, rung
from lora_lab.toyworld import assets
from lora_lab.toyworld.subjects import Subject

CELL = ["epoch", "label", "strength"]
VERDICTS = ("underfit", "good", "overfit")  # a LoRA cell's verdicts, in the order figures list them


def identity_match(seen: dict, identity: Dict[str, object]) -> float:
    return sum(seen[k] == v for k, v in identity.items()) / len(identity)


def read_scores(scores: pd.DataFrame, readout, root: Path, subject: Subject, second=None,
                context: Optional[Dict[str, str]] = None) -> pd.DataFrame:
    """``scores`` (one row per image, as ``scores.csv``) plus the read-out's view of each image;
    with ``second`` (another read-out) its view too (``identity_b``, ``asked_shown_b``) and, per
    attribute, whether the two read the same (``same_<attribute>``); with ``context`` (the
    training drawings' uncaptioned background, :func:`training_context`) whether it shows
    where the prompt names no background (``leak``, NaN where it does)."""
    paths = [_resolve(p, root) for p in scores.image]
    seen: List[dict] = []
    seen_b: List[dict] = []
    for i in range(0, len(paths), 64):
        batch = [Image.open(p).convert("RGB") for p in paths[i : i + 64]]
        seen += assets.read(readout, batch)
        if second is not None:
            seen_b += assets.read(second, batch)
    out = scores.copy()
    out["identity"] = [identity_match(s, subject.identity) for s in seen]
    for name, value in subject.identity.items():  # which parts of the identity show, one by one
        out[f"shows_{name}"] = [float(s[name] == value) for s in seen]
    out["asked_shown"] = [_shown(subject.asked(prompt), s) for prompt, s in zip(out.prompt, seen)]
    for name in ("hair_colour", "eye_colour", "background", "pattern"):
        out[f"read_{name}"] = [s[name] for s in seen]
    if second is not None:
        out["identity_b"] = [identity_match(s, subject.identity) for s in seen_b]
        out["asked_shown_b"] = [_shown(subject.asked(prompt), s) for prompt, s in zip(out.prompt, seen_b)]
        for name in seen[0] if seen else ():
            out[f"same_{name}"] = [float(a[name] == b[name]) for a, b in zip(seen, seen_b)]
    if context:
        out["leak"] = [math.nan if names_background(prompt, subject) else float(_in_context(s, context))
                       for prompt, s in zip(out.prompt, seen)]
    return out


def names_background(prompt: str, subject: Subject) -> bool:
    """Whether a prompt asks for a background or pattern (then showing the training
    drawings' own is not a leak)."""
    asked = subject.asked(prompt)
    return "background" in prompt.lower() or (asked is not None and asked[0] in ("background", "pattern"))


def _in_context(seen: dict, context: Dict[str, str]) -> bool:
    return all(seen[k] == v for k, v in context.items())


def training_context(readout, reference_images: Sequence[Path], share: float = 0.75) -> Optional[Dict[str, str]]:
    """The background (and pattern, unless plain) that at least ``share`` of the training
    drawings show, as the read-out sees them, when their captions do not name a background
    (under half of the caption files say "background"); else None. A LoRA trained on such
    drawings tends to paint it where no prompt asks for it: the truth's leakage rule."""
    seen = assets.read(readout, [Image.open(p).convert("RGB") for p in reference_images])
    captions = [Path(p).with_suffix(".txt") for p in reference_images]
    said = sum(1 for c in captions if c.exists() and "background" in c.read_text(encoding="utf-8").lower())
    if not seen or said >= len(captions) / 2:
        return None
    context = {}
    for name in ("background", "pattern"):
        values = pd.Series([s[name] for s in seen])
        top = values.mode().iloc[0]
        if (values == top).mean() >= share and not (name == "pattern" and top == "plain"):
            context[name] = top
    return context if "background" in context else None


def _shown(want: Optional[Tuple[str, object]], seen: dict) -> float:
    return math.nan if want is None else float(seen[want[0]] == want[1])


def _resolve(path: str, root: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() or p.exists() else Path(root) / p


def ceiling(readout, reference_images: Sequence[Path], subject: Subject) -> float:
    seen = assets.read(readout, [Image.open(p).convert("RGB") for p in reference_images])
    return sum(identity_match(s, subject.identity) for s in seen) / len(seen)


def truth_cells(read: pd.DataFrame, top: float, cfg: JudgeConfig) -> pd.DataFrame:
    """One row per cell: true likeness, adherence per prompt, gain, combined and verdict."""
    rows = []
    for (epoch, label, strength), g in read.groupby(CELL, sort=True):
        like = g[g.prompt_kind == "likeness"]
        adapt = g[(g.prompt_kind == "adaptability") & g.asked_shown.notna()]
        row = {"epoch": epoch, "label": label, "strength": strength, "true_likeness": like.identity.mean()}
        row.update({c: like[c].mean() for c in like.columns if c.startswith("shows_")})
        for prompt, pg in adapt.groupby("prompt", sort=False):
            row[f"true_adherence::{prompt}"] = pg.asked_shown.mean()
        row["true_adherence"] = adapt.asked_shown.mean() if len(adapt) else math.nan
        leak = g.leak.dropna() if "leak" in g else pd.Series(dtype=float)
        row["true_leak"] = float(leak.mean()) if len(leak) else math.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    base = table[table.strength == 0].iloc[0]
    cols = [c for c in table.columns if c.startswith("true_adherence::")]
    verdicts, gains, combined, reasons = [], [], [], []
    for _, cell in table.iterrows():
        if cell.strength == 0:
            verdicts.append("base"), gains.append(0.0), combined.append(math.nan), reasons.append("")
            continue
        # The read-out's shares are fractions of a few images, so a cell can sit exactly on the
        # bar; rounding keeps float error (3/10 computed as 0.29999999999999993) from deciding it.
        gain = round(likeness_gain(cell.true_likeness, base.true_likeness, top), 9)
        dropped = [c.split("::", 1)[1] for c in cols if base[c] > 0 and cell[c] < (1 - cfg.adherence_drop) * base[c]]
        ratio = cell.true_adherence / base.true_adherence if base.true_adherence > 0 else 1.0
        gains.append(gain)
        combined.append(combined_score(gain, ratio, cfg))
        verdict = rung(bool(dropped), gain, cfg)
        verdicts.append(verdict)
        if verdict == "overfit":
            reasons.append("; ".join(f"'{p}' shown {cell['true_adherence::' + p]:.0%} vs base "
                                     f"{base['true_adherence::' + p]:.0%}" for p in dropped))
        elif verdict == "underfit":
            reasons.append(f"identity {cell.true_likeness:.0%} (base {base.true_likeness:.0%}, "
                           f"references {top:.0%})")
        else:
            reasons.append(f"identity {cell.true_likeness:.0%}, asked changes shown {cell.true_adherence:.0%}")
    table["true_gain"] = gains
    table["true_combined"] = combined
    table["true_verdict"] = verdicts
    table["true_reasons"] = reasons
    # Leakage: the training drawings' uncaptioned background shows, where no prompt asks for
    # it, in a share of images more than adherence_drop above the base model's (a flag beside
    # the verdict; see the README's truth section for why it is not folded into "overfit").
    table["leaks"] = [bool(c.strength != 0 and not math.isnan(c.true_leak) and not math.isnan(base.true_leak)
                           and c.true_leak > base.true_leak + cfg.adherence_drop) for _, c in table.iterrows()]
    return table


def compare(judged: pd.DataFrame, truth: pd.DataFrame, best: Optional[dict]) -> Dict[str, object]:
    """Verdict agreement over the LoRA cells and the true rank of lora_lab's pick."""
    merged = judged[CELL + ["verdict"]].merge(truth, on=CELL)
    cells = merged[merged.strength != 0].copy()
    agree = float((cells.verdict == cells.true_verdict).mean()) if len(cells) else math.nan
    cells["_ok"] = cells.true_verdict != "overfit"
    ranked = cells.sort_values(["_ok", "true_combined"], ascending=[False, False]).reset_index(drop=True)
    rank, share, pick_truth = None, None, None
    top = ranked.iloc[0] if len(ranked) else None
    if best is not None:
        hit = ranked[(ranked.epoch == best["epoch"]) & (ranked.strength == best["strength"])]
        rank = int(hit.index[0]) + 1 if len(hit) else None
        if len(hit) and top is not None and top.true_combined > 0:
            # what the user keeps, as a share of the trial's true best non-overfit cell
            share = float(hit.iloc[0].true_combined / top.true_combined)
            pick_truth = str(hit.iloc[0].true_verdict)
    return {"cells": int(len(cells)), "agreement": agree, "pick_rank": rank, "pick_true_share": share,
            "pick_true_verdict": pick_truth,
            "true_best": None if top is None else {"epoch": int(top.epoch), "strength": float(top.strength)},
            "table": merged}
