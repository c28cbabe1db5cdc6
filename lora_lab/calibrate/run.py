"""``python -m lora_lab.calibrate STUDY_DIR labels.json [...]``: make the judge agree with your eye.

Re-judges the study's stored score tables (no rendering) with every candidate setting of the
judge's thresholds, keeps the one that agrees best with your labels (balanced over the classes),
and prints the agreement before and after with 95% intervals, the cross-validated agreement
(each label predicted by a judge chosen without it), the confusion tables, the cells where the
judge and your labels still disagree, and the cells to label next. It writes the chosen judge as
a YAML file (``eval.judge=FILE`` for ``lora_lab.sweep`` and ``lora_lab.evaluate``), rewrites the
study's verdicts, leaderboard and report with it (the previous verdicts kept beside, named),
and ``calibration.json`` / ``labels_next.json`` in the study folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from lora_lab.calibrate.labels import LABELS, LabelError, read_labels
from lora_lab.calibrate.search import (GRID, balanced, choose, cross_validated, labels_for_interval, next_cells,
                                       verdict_table, verdicts_of)
from lora_lab.calibrate.study import check_cells, judge_yaml, load_study, reports_root, rewrite
from lora_lab.config import JudgeConfig
from lora_lab.errors import LoraLabError
from lora_lab.files import atomic_write_text
from lora_lab.numbers import wilson

TUNED = list(GRID)


def calibrate(study_dir: Path, label_files: List[Path], start: Optional[JudgeConfig] = None, n_next: int = 5) -> dict:
    """Everything ``calibrate`` prints and writes, computed; nothing written yet."""
    study = load_study(study_dir)
    labels = read_labels(label_files, study.name)
    check_cells(study, labels)
    start = start or study.thresholds()
    v = verdict_table(study, start)
    cells = list(labels)
    idx = v.index(cells)
    y = np.array([LABELS.index(labels[c].label) for c in cells], dtype=np.int8)
    before = verdicts_of(study, start, cells)
    chosen = choose(v, idx, y)
    after = v.codes[chosen, idx]
    cv = cross_validated(v, idx, y)
    cfg = v.setting(chosen)
    cv_share = _share(cv, y) if cv is not None else None
    return {
        "study": study, "labels": labels, "cells": cells, "y": y, "start": start, "judge": cfg,
        "tried": int(v.codes.shape[0]), "before": _share(before, y), "after": _share(after, y), "cv": cv_share,
        "confusion": {"before": _confusion(before, y), "after": _confusion(after, y)},
        "verdicts": {"before": before, "after": after},
        "next": next_cells(v, idx, y, chosen, n_next),
        "more_for_10_points": labels_for_interval(cv_share["value"] if cv_share else float("nan"), len(y)),
    }


def _share(pred: np.ndarray, y: np.ndarray) -> dict:
    hits = int((pred == y).sum())
    return {"value": hits / len(y), "hits": hits, "n": int(len(y)), "ci95": wilson(hits, len(y)),
            "balanced": float(balanced(pred[None, :], y)[0])}


def _confusion(pred: np.ndarray, y: np.ndarray) -> Dict[str, Dict[str, int]]:
    return {LABELS[t]: {LABELS[p]: int(((y == t) & (pred == p)).sum()) for p in range(3)} for t in range(3)}


def text(r: dict, reasons: Dict[tuple, str]) -> str:
    """The printed report of one calibration."""
    study, labels, y = r["study"], r["labels"], r["y"]
    counts = ", ".join(f"{int((y == k).sum())} {name}" for k, name in enumerate(LABELS))
    lines = [f"calibrate: study {study.name}, {len(study.trials)} finished trials, {len(study.cells())} LoRA cells; "
             f"{len(y)} labels ({counts})",
             f"tried {r['tried']} settings of {', '.join(TUNED)}", "",
             "                  agreement with your labels          balanced"]
    rows = [("before", r["before"], "the judge the study was judged with"),
            ("after", r["after"], "the chosen judge, fitted on these labels"),
            ("cross-validated", r["cv"], "each label predicted by a judge chosen without it")]
    for name, s, note in rows:
        if s is None:
            lines.append(f"{name:<17} n/a (needs 2 labels or more)")
            continue
        low, high = s["ci95"]
        lines.append(f"{name:<17} {s['value']:>4.0%} (95% CI {low:.0%}-{high:.0%}), {s['hits']} of {s['n']}"
                     f"{'':<4}{s['balanced']:>4.0%}   {note}")
    start, cfg = r["start"], r["judge"]
    lines += ["", "chosen judge: " + ", ".join(
        f"{k} {getattr(cfg, k):g}" + (f" (was {getattr(start, k):g})" if getattr(cfg, k) != getattr(start, k) else "")
        for k in TUNED) + "  (1 turns a check off)", ""]
    lines.append("confusion (rows: your label; columns: the judge's verdict, before -> after)")
    lines.append(f"{'':<10}" + "".join(f"{name:^16}" for name in LABELS))
    for t in LABELS:
        lines.append(f"{t:<10}" + "".join(f"{r['confusion']['before'][t][p]:>6} -> {r['confusion']['after'][t][p]:<6}"
                                          for p in LABELS).rstrip())
    wrong = [(c, labels[c].label, LABELS[int(p)]) for c, p in zip(r["cells"], r["verdicts"]["after"])
             if LABELS[int(p)] != labels[c].label]
    lines += ["", f"still disagree: {len(wrong)} of {len(y)}"]
    for (trial, epoch, strength), said, verdict in wrong:
        why = reasons.get((trial, epoch, strength), "")
        lines.append(f"  trial {trial}, epoch {epoch}, strength {strength:g}: you said {said}, the judge says "
                     f"{verdict}" + (f" ({why})" if why else ""))
    lines += ["", "label next (least certain; the report frames them dashed):"]
    for c in r["next"]:
        votes = " / ".join(f"{k} {share:.0%}" for k, share in sorted(c["votes"].items(), key=lambda kv: -kv[1]))
        lines.append(f"  trial {c['trial']}, epoch {c['epoch']}, strength {c['strength']:g}: the settings that fit "
                     f"your labels split {votes}; the chosen judge says {c['chosen']}")
    if not r["next"]:
        lines.append("  none: every cell is labelled")
    more = r["more_for_10_points"]
    lines.append(f"about {more} more labels would bring the 95% interval below +/-10 points" if more
                 else "the 95% interval is within +/-10 points")
    return "\n".join(lines)


def record(r: dict, label_files: List[Path], judge_file: Path) -> dict:
    """What ``calibration.json`` and each rewritten verdict.json keep of the calibration."""
    return {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "labels": [str(p) for p in label_files],
            "n_labels": int(len(r["y"])), "judge_file": str(judge_file), "judge": asdict(r["judge"]),
            "start": asdict(r["start"]), "tried": r["tried"],
            **{k: r[k] for k in ("before", "after", "cv", "confusion", "next", "more_for_10_points")}}


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_lab.calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("study_dir", type=Path, help="a study folder, e.g. sweeps/scheduler")
    parser.add_argument("labels", type=Path, nargs="+",
                        help="labels.json from the report's 'Download labels', or a CSV with trial, epoch, strength, label")
    parser.add_argument("--judge", type=Path, default=None,
                        help="the judge YAML to start from (default: the thresholds the study was judged with)")
    parser.add_argument("--out", type=Path, default=None, help="where the chosen judge goes (default STUDY_DIR/judge.yaml)")
    parser.add_argument("--next", type=int, default=5, help="how many cells to name for labelling next")
    parser.add_argument("--reports", type=Path, default=None, help="reports folder (default: the sweep's sweep.reports)")
    parser.add_argument("--dry-run", action="store_true", help="print the figures; write and change nothing")
    args = parser.parse_args(argv)
    try:
        start = read_judge(args.judge) if args.judge else None
        r = calibrate(args.study_dir, args.labels, start, args.next)
        out = args.out or args.study_dir / "judge.yaml"
        if not args.dry_run and not _writable(out.parent):
            raise LabelError(f"--out: cannot write to {out.parent}; choose a writable folder")
    except LoraLabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    study = r["study"]
    from lora_lab.evaluate.judge import judge

    reasons = {}
    for t in study.trials.values():
        for row in judge(t.agg, t.ceiling, r["judge"]).itertuples():
            reasons[(t.number, int(row.epoch), float(row.strength))] = "; ".join(row.reasons)
    print(text(r, reasons))
    running = still_running(study.dir)
    if running:
        print(f"note: trial {', '.join(map(str, running))} of this study is still running; trials that finish from "
              "now on are judged with the sweep's own thresholds: rerun calibrate when the sweep ends, or give "
              "the sweep eval.judge=FILE when you start it again")
    if args.dry_run:
        return 0
    header = [f"lora_lab judge, chosen by python -m lora_lab.calibrate on study {study.name} with {len(r['y'])} labels "
              f"({time.strftime('%Y-%m-%d')})", f"use it: eval.judge={out}"]
    atomic_write_text(out, judge_yaml(r["judge"], header))
    doc = record(r, args.labels, out)
    atomic_write_text(study.dir / "calibration.json", json.dumps(doc, indent=2) + "\n")
    atomic_write_text(study.dir / "labels_next.json", json.dumps({"study": study.name, "cells": r["next"]}, indent=2) + "\n")
    print(f"\njudge: {out}  (use it: python -m lora_lab.sweep ... eval.judge={out})")
    stamp_lines = rewrite(study, r["judge"], {k: doc[k] for k in ("when", "judge_file", "n_labels")})
    print(f"rewrote the verdicts of {len(stamp_lines)} trials with it (the previous files kept beside as "
          "verdict.before-calibration-<time>.json, scores_agg..., trial...):")
    for line in stamp_lines:
        print(f"  {line}")
    from lora_lab.report import leaderboard
    from lora_lab.report.study import build_report

    table = leaderboard.build(study.dir)
    leaderboard.save(study.dir, table)
    print(leaderboard.best_text(table))
    print(f"report: {build_report(study.dir, args.reports or reports_root(study))}")
    print("note: the Optuna database keeps the values the trials ran with; the leaderboard and the report read "
          "the new verdicts")
    return 0


def still_running(study_dir: Path) -> List[int]:
    """The trials whose trial.json says running (a sweep still at work on the study)."""
    from lora_lab.files import read_json

    found = []
    for path in sorted(Path(study_dir).glob("trial_*/trial.json")):
        info = read_json(path) or {}
        if info.get("state") == "running":
            found.append(int(info.get("number", path.parent.name.split("_")[1])))
    return sorted(found)


def read_judge(path: Path) -> JudgeConfig:
    """A judge YAML (``calibrate``'s own, or any with JudgeConfig's keys) as a JudgeConfig."""
    from lora_lab.config.judge_file import judge_values

    return JudgeConfig(**judge_values(path, "--judge"))


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".calibrate-write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
        return True
    except OSError:
        return False
