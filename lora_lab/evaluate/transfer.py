"""How a LoRA transfers across base checkpoints: the same cell's verdict on each of them.

``python -m lora_lab.evaluate ... eval.checkpoints=[a.safetensors,b.safetensors]`` evaluates the
same X/Y on each checkpoint; this module puts the verdicts side by side (``transfer.csv``) and
says it in words ("epoch 4 at 0.7: good on anything-v3, overfit on counterfeit-v3").
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import pandas as pd

from lora_lab.files import atomic_write_text


def table(judged: Dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per LoRA cell (epoch, label, strength), a verdict column per checkpoint."""
    frames = []
    for name, j in judged.items():
        cells = j[j.strength != 0][["epoch", "label", "strength", "verdict"]].rename(columns={"verdict": name})
        frames.append(cells.set_index(["epoch", "label", "strength"]))
    return pd.concat(frames, axis=1).reset_index().sort_values(["epoch", "strength"]).reset_index(drop=True)


def sentence(row, names: List[str]) -> str:
    verdicts = ", ".join(f"{row[n]} on {n}" for n in names)
    return f"epoch {row['epoch']} at {row['strength']:g}: {verdicts}"


def write(out_dir: Path, judged: Dict[str, pd.DataFrame], best: Dict[str, dict]) -> List[str]:
    """Write ``transfer.csv``; return the lines to print: each checkpoint's best cell, how it
    fares on the others, and the cells whose verdict differs between checkpoints."""
    t = table(judged)
    names = list(judged)
    atomic_write_text(out_dir / "transfer.csv", t.to_csv(index=False))
    lines = []
    for name, b in best.items():
        if not b:
            lines.append(f"on {name}: every LoRA cell is overfit")
            continue
        row = t[(t.epoch == b["epoch"]) & (t.strength == b["strength"])].iloc[0]
        lines.append(f"best on {name}: {sentence(row, names)}")
    differ = t[t[names].nunique(axis=1) > 1]
    lines.append(f"{len(differ)} of {len(t)} cells get another verdict on another checkpoint"
                 + (f", e.g. {sentence(differ.iloc[0], names)}" if len(differ) else ""))
    lines.append(f"transfer: {out_dir / 'transfer.csv'}")
    return lines
