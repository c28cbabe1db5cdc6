"""``report.html`` beside an evaluation: the best cell, every cell's verdict with its scores as
change from the base model, the X/Y grids, and, with ``eval.checkpoints``, the transfer table.
Written atomically; every user text (prompts, file names) escaped by Jinja2."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Dict, List, Optional

from lora_lab.files import atomic_write_text
from lora_lab.numbers import fmt
from lora_lab.report.front import change


def _rows(judged) -> List[dict]:
    base = {r.epoch: r for r in judged[judged.strength == 0].itertuples()}
    rows = []
    for r in judged[judged.strength != 0].itertuples():
        b = base.get(r.epoch)
        rows.append({"epoch": int(r.epoch), "label": r.label, "strength": f"{r.strength:g}", "verdict": r.verdict,
                     "likeness": fmt(r.likeness), "adherence": fmt(r.adherence),
                     "likeness_change": change(r.likeness, b.likeness if b is not None else None),
                     "adherence_change": change(r.adherence, b.adherence if b is not None else None, pct=True),
                     "reason": r.reasons[0] if len(r.reasons) else ""})
    return rows


def write(out_dir: Path, lora_dir: Path, results: Dict[str, "object"], transfer_lines: Optional[List[str]] = None,
          transfer_table=None) -> Path:
    """Write ``out_dir/report.html`` for one evaluation per checkpoint (``results``: name ->
    EvalResult; one entry without eval.checkpoints)."""
    from lora_lab.report.leaderboard import shown
    from lora_lab.report.study import jinja_env

    checkpoints, warnings = [], []
    for name, result in results.items():
        prompts = dict(zip(result.scores.prompt_index, result.scores.prompt))
        grids = [{"src": os.path.relpath(g, out_dir), "caption": prompts.get(int(g.stem[1:]), g.stem)}
                 for g in result.grids]
        checkpoints.append({"name": name, "best": result.verdict["best"], "rows": _rows(result.judged),
                            "grids": grids})
        warnings += [n for n in result.verdict["notes"] if shown(n) and n not in warnings]
    transfer = None
    if transfer_table is not None:
        names = list(results)
        transfer = {"names": names, "lines": transfer_lines or [],
                    "rows": [{"epoch": int(r["epoch"]), "label": r["label"], "strength": f"{r['strength']:g}",
                              "verdicts": [r[n] for n in names]} for r in transfer_table.to_dict(orient="records")]}
    html = jinja_env().get_template("evaluation.html.j2").render(
        title=Path(lora_dir).name, lora_dir=str(lora_dir), built=time.strftime("%Y-%m-%d %H:%M:%S"),
        checkpoints=checkpoints, transfer=transfer, warnings=warnings)
    path = out_dir / "report.html"
    atomic_write_text(path, html)
    return path
