"""Study folder -> a pandas table of every trial, rebuilt from the trial folders alone.

``python -m lora_lab.leaderboard sweeps/<study>`` prints the table (and saves
``leaderboard.csv`` / ``leaderboard.parquet``); ``--best`` prints the winning LoRA file, its
strength and the A1111 snippet.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from pathlib import Path
from typing import Optional

import pandas as pd

from lora_lab.files import atomic_write_bytes, atomic_write_text, read_json

FIRST = ["trial", "state", "objective", "verdict", "best_epoch", "best_strength", "likeness", "adherence"]
NETWORK = ["network", "trainable_params"]  # the network's type and size (trial.json's "network")
LAST = ["snippet", "lora_file", "reason", "duration_s"]
VALIDATION = ["val_loss_min", "val_loss_epoch"]  # only when the trials held images out


def build(study_dir: Path) -> pd.DataFrame:
    """One row per trial that ran (duplicates of a grid point and retried attempts left out)."""
    study_dir = Path(study_dir)
    rows = []
    for tdir in sorted(study_dir.glob("trial_*"), key=lambda p: int(p.name.split("_")[1])):
        info = read_json(tdir / "trial.json")
        if info is None or info.get("state") in ("duplicate", "retried"):
            continue
        row = {"trial": info["number"], "state": info["state"], "objective": info.get("objective"),
               **{k: v for k, v in info.get("params", {}).items()}}
        verdict = read_json(tdir / "verdict.json") if info["state"] == "complete" else None
        best = (verdict or {}).get("best")
        if best:
            row.update(verdict=best["verdict"], best_epoch=best["epoch"], best_strength=best["strength"],
                       likeness=best["likeness"], adherence=best["adherence"], snippet=best["snippet"],
                       lora_file=best["file"])
        elif verdict is not None:
            row["verdict"] = "all overfit"
        val = {int(k): v for k, v in (info.get("validation_loss") or {}).items()}
        if val:
            row["val_loss_epoch"] = min(val, key=val.get)
            row["val_loss_min"] = val[row["val_loss_epoch"]]
        network = info.get("network") or {}
        row["network"] = network.get("type")
        row["trainable_params"] = network.get("trainable_params")
        row["reason"] = info.get("reason", "")
        row["duration_s"] = info.get("duration_s")
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=FIRST + LAST)
    df = pd.DataFrame(rows)
    for col in FIRST + LAST:
        if col not in df:
            df[col] = None
    params = [c for c in df.columns if c not in FIRST + LAST + VALIDATION + NETWORK]
    network = NETWORK if df["network"].notna().any() else []
    df["trainable_params"] = df["trainable_params"].astype("Int64")
    df = df[FIRST[:2] + params + network + FIRST[2:] + [c for c in VALIDATION if c in df] + LAST]
    direction = (read_json(study_dir / "study.json") or {}).get("direction", "maximize")
    done = df.state == "complete"
    order = df[done].sort_values("objective", ascending=direction == "minimize", na_position="last")
    return pd.concat([order, df[~done].sort_values("trial")], ignore_index=True)


def save(study_dir: Path, table: pd.DataFrame) -> None:
    atomic_write_text(Path(study_dir) / "leaderboard.csv", table.to_csv(index=False))
    buf = io.BytesIO()
    table.astype({c: "string" for c in table.columns if table[c].dtype == object}).to_parquet(buf, index=False)
    atomic_write_bytes(Path(study_dir) / "leaderboard.parquet", buf.getvalue())


# How the judge's note on a likeness prompt it left out begins; the trial's page shows it.
LEFT_OUT = "likeness left out "


def shown(note: str) -> bool:
    """The scorer notes every page shows: random weights, and which adherence ran."""
    return "not meaningful" in note or note.startswith("adherence:")


def notes(study_dir: Path) -> list:
    """Scorer notes from the trials' verdicts (e.g. random scorer weights), each once."""
    seen: list = []
    for path in sorted(Path(study_dir).glob("trial_*/verdict.json")):
        for note in (read_json(path) or {}).get("notes", []):
            if note not in seen and not note.startswith("references:"):
                seen.append(note)
    return seen


def verdict_text(study_dir: Path) -> str:
    """How many epoch x strength cells of the finished trials are underfit, good and overfit,
    with one example reason of each (the overfit one first: it is what a user must avoid). The
    example is the first such cell, except that a cell whose reason says what showed instead of
    a lost ask (the judge's ``instead``) is preferred to one whose reason cannot."""
    counts = {"underfit": 0, "good": 0, "overfit": 0}
    examples: dict = {}
    for path in sorted(Path(study_dir).glob("trial_*/verdict.json"), key=lambda p: int(p.parent.name.split("_")[1])):
        for cell in (read_json(path) or {}).get("cells", []):
            v = cell.get("verdict")
            if v not in counts:
                continue
            counts[v] += 1
            if v not in examples or (cell.get("instead") and not examples[v][1].get("instead")):
                examples[v] = (path.parent.name, cell)
    if not sum(counts.values()):
        return "no evaluated cells yet"
    lines = ["cells (epoch x strength): " + ", ".join(f"{n} {v}" for v, n in counts.items())]
    for v in ("overfit", "underfit", "good"):
        if v in examples:
            trial, cell = examples[v]
            reasons = cell.get("reasons") or []
            why = "; ".join(reasons) if isinstance(reasons, list) else str(reasons)
            lines.append(f"  {v}, e.g. {trial} epoch {int(cell['epoch'])} at strength {cell['strength']:g}: {why}")
    return "\n".join(lines)


def best(table: pd.DataFrame) -> Optional[pd.Series]:
    done = table[(table.state == "complete") & table.snippet.notna()]
    return None if done.empty else done.iloc[0]


def render_text(table: pd.DataFrame) -> str:
    """The table as printed at the end of a sweep."""
    if table.empty:
        return "no trials yet"
    shown = table.drop(columns=["lora_file", "duration_s"]).replace({None: math.nan})  # blanks, not None / NaN
    with pd.option_context("display.max_columns", None, "display.width", 200, "display.max_colwidth", 60):
        return shown.to_string(index=False, na_rep="", float_format=lambda x: f"{x:.4g}" if not math.isnan(x) else "")


def best_text(table: pd.DataFrame) -> str:
    row = best(table)
    if row is None:
        return "no completed trial with a usable cell yet"
    return (f"best: trial {row.trial}, epoch {int(row.best_epoch)} at strength {row.best_strength:g}\n"
            f"  file: {row.lora_file}\n  A1111: {row.snippet}")


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_lab.leaderboard", description=__doc__.splitlines()[0])
    parser.add_argument("study_dir", type=Path, help="a study folder, e.g. sweeps/scheduler")
    parser.add_argument("--best", action="store_true", help="print the winning file, strength and snippet")
    args = parser.parse_args(argv)
    if not args.study_dir.is_dir():
        print(f"error: {args.study_dir} is not a study folder", file=sys.stderr)
        return 2
    table = build(args.study_dir)
    if args.best:
        print(best_text(table))
        return 0 if best(table) is not None else 1
    save(args.study_dir, table)
    print(render_text(table))
    for note in notes(args.study_dir):
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
