"""The report's front page in pictures: the winner next to the base model, and every trial at
its best epoch over the strengths (and over the epochs at the winner's strength), each cell
framed in its verdict's colour with its scores as change from the base model; and the
study's progress while it runs. Images are small thumbnails linked to the full-size file.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Dict, Optional

import pandas as pd

from lora_lab.files import read_json
from lora_lab.images import open_rgb
from lora_lab.numbers import fmt, number
from lora_lab.report.labels import cell_key

THUMB = 160  # px, the longer side


def change(value, base, pct: bool = False) -> str:
    """``value`` as change from the base model's: +0.123, or +12% with ``pct``; n/a when unmeasured."""
    v, b = number(value), number(base)
    if v is None or b is None:
        return "n/a"
    if pct:
        return f"{100 * (v - b) / b:+.0f}%" if b else "n/a"
    return f"{v - b:+.3f}"


class Images:
    """Copies an image beside the report once (full size) with a thumbnail; returns both paths."""

    def __init__(self, out: Path, previous: Optional[Path] = None):
        self.out = out
        self.previous = previous  # the report being replaced: its copies are reused when current
        self.done: Dict[str, dict] = {}

    def __call__(self, src: str, name: str) -> Optional[dict]:
        if src in self.done:
            return self.done[src]
        path = Path(src)
        if not path.exists():
            return None
        full = self.out / "img" / f"{name}.png"
        thumb = self.out / "thumbs" / f"{name}.jpg"
        full.parent.mkdir(parents=True, exist_ok=True)
        thumb.parent.mkdir(parents=True, exist_ok=True)
        self.done[src] = {"full": f"img/{full.name}", "thumb": f"thumbs/{thumb.name}"}
        if self.previous is not None:
            old_full, old_thumb = self.previous / "img" / full.name, self.previous / "thumbs" / thumb.name
            try:
                if min(old_full.stat().st_mtime, old_thumb.stat().st_mtime) >= path.stat().st_mtime:
                    shutil.copyfile(old_full, full)
                    shutil.copyfile(old_thumb, thumb)
                    return self.done[src]
            except OSError:
                pass
        im = open_rgb(path)
        im.save(full, format="PNG")
        im.thumbnail((THUMB, THUMB))
        im.save(thumb, format="JPEG", quality=85)
        return self.done[src]


class TrialCells:
    """One completed trial's cells: verdicts and scores (verdict.json) and images (scores.csv)."""

    def __init__(self, tdir: Path):
        self.number = int(tdir.name.split("_")[1])
        doc = read_json(tdir / "verdict.json") or {}
        self.best = doc.get("best")
        self.cells = {(int(c["epoch"]), float(c["strength"])): c for c in doc.get("cells", [])}
        self.epochs = sorted({e for e, _ in self.cells})
        self.strengths = sorted({s for _, s in self.cells})
        self.images: Dict[tuple, str] = {}
        self.prompts: Dict[str, str] = {}
        scores = tdir / "scores.csv"
        if scores.exists():
            df = pd.read_csv(scores, usecols=["epoch", "strength", "prompt_index", "prompt_kind", "prompt", "seed",
                                              "image"])
            seed = df.seed.iloc[0]
            for kind in ("likeness", "adaptability"):
                rows = df[(df.prompt_kind == kind) & (df.seed == seed)]
                if rows.empty:
                    continue
                first = rows.prompt_index.min()
                rows = rows[rows.prompt_index == first]
                self.prompts[kind] = rows.prompt.iloc[0]
                for r in rows.itertuples():
                    self.images[(kind, int(r.epoch), float(r.strength))] = r.image

    def cell(self, images: Images, epoch: int, strength: float) -> dict:
        c = self.cells.get((epoch, strength), {})
        base = self.cells.get((epoch, 0.0), {})
        verdict = c.get("verdict", "missing")
        shown = []
        for kind in ("likeness", "adaptability"):
            src = self.images.get((kind, epoch, strength))
            tag = "base" if strength == 0 else f"t{self.number}_e{epoch}_s{strength:g}"
            picture = images(src, f"{tag}_{kind}") if src else None
            if picture:
                shown.append({**picture, "kind": kind, "prompt": self.prompts.get(kind, "")})
        if strength == 0:
            hover = "the base model (strength 0)"
        else:
            hover = (f"epoch {epoch}, strength {strength:g}: {verdict}. "
                     f"likeness {change(c.get('likeness'), base.get('likeness'))} vs base "
                     f"(raw {fmt(c.get('likeness'))}), adherence {change(c.get('adherence'), base.get('adherence'), True)}"
                     f" vs base (raw {fmt(c.get('adherence'))}). " + "; ".join(c.get("reasons", [])[:1]))
        return {"verdict": verdict, "images": shown, "hover": hover, "trial": self.number, "epoch": epoch,
                "strength": strength, "key": cell_key(self.number, epoch, strength)}


def front_page(study_dir: Path, out: Path, winner: Optional[dict], previous: Optional[Path] = None) -> dict:
    """What the front page shows above the leaderboard (template variables); ``previous``: the
    report folder being replaced, whose image copies are reused while still current."""
    images = Images(out, previous)
    trials = []
    for tdir in sorted(study_dir.glob("trial_*"), key=lambda p: int(p.name.split("_")[1])):
        info = read_json(tdir / "trial.json") or {}
        if info.get("state") == "complete" and (tdir / "verdict.json").exists():
            trials.append(TrialCells(tdir))
    answer = None
    if winner is not None:
        t = next((x for x in trials if x.number == int(winner["trial"])), None)
        if t is not None and t.best:
            e, s = int(t.best["epoch"]), float(t.best["strength"])
            answer = {"lora": t.cell(images, e, s), "base": t.cell(images, e, 0.0), "epoch": e, "strength": s}
    strengths = sorted({s for t in trials for s in t.strengths})
    by_strength = []
    for t in trials:
        epoch = int(t.best["epoch"]) if t.best else (t.epochs[-1] if t.epochs else None)
        if epoch is None:
            continue
        by_strength.append({"trial": t.number, "epoch": epoch,
                            "cells": [t.cell(images, epoch, s) for s in strengths]})
    at = float(winner["best_strength"]) if winner is not None else (max(strengths) if strengths else None)
    epochs = sorted({e for t in trials for e in t.epochs})
    by_epoch = [{"trial": t.number, "cells": [t.cell(images, e, at) if e in t.epochs else None for e in epochs]}
                for t in trials] if at is not None else []
    return {"answer": answer, "strengths": strengths, "by_strength": by_strength, "epochs": epochs,
            "by_epoch": by_epoch, "at_strength": at, "dataset": dataset(study_dir)}


def dataset(study_dir: Path) -> Optional[dict]:
    """The dataset doctor's findings and the bucket table the sweep started with, if written."""
    found = read_json(study_dir / "doctor.json")
    if found is None:
        return None
    for f in found.get("findings", []):
        f["file"] = Path(f["file"]).name if f.get("file") else ""
    return found


def progress(study_dir: Path, table: pd.DataFrame, study: dict, now: Optional[float] = None) -> dict:
    """Trials done / running / pruned / failed, time so far and an estimate of the time left."""
    now = time.time() if now is None else now
    counts = {state: int((table.state == state).sum()) if len(table) else 0
              for state in ("complete", "running", "pruned", "failed")}
    total = study.get("total_trials")
    finished = counts["complete"] + counts["pruned"] + counts["failed"]
    starts, durations = [], []
    for tdir in study_dir.glob("trial_*"):
        info = read_json(tdir / "trial.json") or {}
        if info.get("started"):
            starts.append(float(info["started"]))
        if info.get("duration_s") is not None and info.get("state") in ("complete", "pruned", "failed"):
            durations.append(float(info["duration_s"]))
    elapsed = now - min(starts) if starts else 0.0
    left = None
    if total and durations:
        workers = max(1, counts["running"]) if counts["running"] else 1
        left = max(0.0, (total - finished) * (sum(durations) / len(durations)) / workers)
    return {**counts, "total": total, "finished": finished, "elapsed": _duration(elapsed),
            "left": _duration(left) if left is not None else None,
            "done": finished >= total if total else counts["running"] == 0}


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def progress_text(p: dict) -> str:
    """The progress line the console prints after every trial (the report shows the same)."""
    total = f" of {p['total']}" if p["total"] else ""
    left = f", about {p['left']} left" if p["left"] and not p["done"] else ""
    running = f", {p['running']} running" if p["running"] else ""
    return (f"progress: {p['finished']}{total} trials done ({p['complete']} complete, {p['pruned']} pruned, "
            f"{p['failed']} failed{running}); {p['elapsed']} so far{left}")
