"""A study's stored score tables, read for re-judging (no rendering), and the study rewritten
with a new judge: verdicts, score tables and trial objectives (the previous files kept beside,
named), then the leaderboard and the report rebuilt from them."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List

import pandas as pd
from omegaconf import OmegaConf

from lora_lab.calibrate.labels import Cell, Label, LabelError
from lora_lab.config import JudgeConfig
from lora_lab.evaluate.judge import judge, verdict_document
from lora_lab.files import atomic_write_text, read_json

JUDGED = ["gain", "combined", "pick_margin", "verdict", "reasons", "instead"]  # what the judge adds to the score table


@dataclass
class TrialScores:
    number: int
    dir: Path
    agg: pd.DataFrame  # scores_agg.csv without the judge's columns
    ceiling: float
    doc: dict  # verdict.json
    info: dict  # trial.json

    def cells(self) -> List[Cell]:
        lora = self.agg[self.agg.strength != 0]
        return [(self.number, int(r.epoch), float(r.strength)) for r in lora.itertuples()]


@dataclass
class StudyScores:
    dir: Path
    name: str
    objective: str
    trials: Dict[int, TrialScores] = field(default_factory=dict)

    def cells(self) -> List[Cell]:
        return [c for t in self.trials.values() for c in t.cells()]

    def thresholds(self) -> JudgeConfig:
        """The judge the study's verdicts were made with (the first trial's)."""
        first = next(iter(self.trials.values()))
        fields = JudgeConfig.__dataclass_fields__
        return JudgeConfig(**{k: v for k, v in (first.doc.get("thresholds") or {}).items() if k in fields})


def load_study(study_dir: Path) -> StudyScores:
    """Every finished trial's score table; one sentence when there are none to re-judge."""
    study_dir = Path(study_dir)
    info = read_json(study_dir / "study.json")
    if not study_dir.is_dir() or info is None:
        raise LabelError(f"{study_dir}: not a study folder (no study.json); give the folder a sweep wrote, "
                         "e.g. sweeps/scheduler")
    study = StudyScores(study_dir, info.get("name", study_dir.name), info.get("objective", "combined"))
    for tdir in sorted(study_dir.glob("trial_*"), key=lambda p: int(p.name.split("_")[1])):
        trial, doc = read_json(tdir / "trial.json") or {}, read_json(tdir / "verdict.json")
        table = tdir / "scores_agg.csv"
        if trial.get("state") != "complete" or doc is None or not table.is_file():
            continue
        agg = pd.read_csv(table).drop(columns=JUDGED, errors="ignore")
        agg["label"] = agg.label.astype(str)
        number = int(trial.get("number", tdir.name.split("_")[1]))
        study.trials[number] = TrialScores(number, tdir, agg, float(doc.get("ceiling") or math.nan), doc, trial)
    if not study.trials:
        raise LabelError(f"{study_dir}: no finished trial with score tables (trial_*/scores_agg.csv and "
                         "verdict.json); calibrate re-judges stored scores, so let the sweep finish a trial first")
    return study


def check_cells(study: StudyScores, labels: Dict[Cell, Label]) -> None:
    """Every label names a cell the study scored; else one sentence naming the first that does not."""
    known = set(study.cells())
    for cell, label in labels.items():
        if cell in known:
            continue
        trials = sorted(study.trials)
        t = study.trials.get(cell[0])
        if t is None:
            where = f"the study has no finished trial {cell[0]} (finished: {', '.join(map(str, trials))})"
        else:
            epochs = sorted({int(e) for e in t.agg.epoch})
            strengths = sorted({float(s) for s in t.agg.strength if s != 0})
            where = (f"trial {cell[0]} has epochs {', '.join(map(str, epochs))} and strengths "
                     f"{', '.join(f'{s:g}' for s in strengths)}")
        raise LabelError(f"{label.source}: trial {cell[0]}, epoch {cell[1]}, strength {cell[2]:g} is not a cell of "
                         f"study {study.name}: {where}")


def rewrite(study: StudyScores, cfg: JudgeConfig, record: dict) -> List[str]:
    """Re-judge every trial with ``cfg`` and write its verdicts, score table and objective; the
    files they replace are kept as ``<name>.before-calibration-<time>.<ext>``. Returns the
    trials' new best cells as lines."""
    from lora_lab.sweep.trial import objective_value

    stamp = time.strftime("%Y%m%d-%H%M%S")
    lines = []
    for t in study.trials.values():
        judged = judge(t.agg, t.ceiling, cfg)
        files = _files(t)
        doc = verdict_document(judged, t.ceiling, cfg, files, t.doc.get("notes", []))
        doc = {**{k: v for k, v in t.doc.items() if k not in doc}, **doc, "calibrated": record}
        value = objective_value(doc, judged, study.objective)
        best = doc["best"]
        reason = "; ".join(best["reasons"]) if best else "every LoRA cell is overfit: objective set to 0"
        trial = {**t.info, "objective": value, "reason": reason}
        flat = judged.assign(reasons=judged.reasons.map("; ".join))
        for name in ("verdict.json", "scores_agg.csv", "trial.json"):
            src = t.dir / name
            stem, ext = name.rsplit(".", 1)
            (t.dir / f"{stem}.before-calibration-{stamp}.{ext}").write_bytes(src.read_bytes())
        atomic_write_text(t.dir / "scores_agg.csv", flat.to_csv(index=False))
        atomic_write_text(t.dir / "verdict.json", json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(t.dir / "trial.json", json.dumps(trial, indent=2, default=str) + "\n")
        lines.append(f"trial {t.number}: " + (f"best epoch {best['epoch']} at strength {best['strength']:g} "
                                                f"({best['verdict']}), {study.objective} {value:.4g}" if best
                                                else "every LoRA cell is overfit"))
    return lines


def _files(t: TrialScores) -> Dict[str, str]:
    """LoRA file per epoch label, from the per-image score table (verdict.json names the best only)."""
    scores = t.dir / "scores.csv"
    if scores.is_file():
        s = pd.read_csv(scores, usecols=["label", "lora_file"]).dropna().drop_duplicates("label")
        return dict(zip(s.label.astype(str), s.lora_file))
    best = t.doc.get("best") or {}
    return {str(label): best.get("file", "") for label in t.agg.label}


def reports_root(study: StudyScores) -> Path:
    """Where the sweep wrote the study's report (``sweep.reports`` of its ``sweep.yaml``)."""
    path = study.dir / "sweep.yaml"
    if path.is_file():
        node = OmegaConf.load(path)
        reports = OmegaConf.select(node, "sweep.reports")
        if reports:
            return Path(str(reports))
    return Path("reports")


def judge_yaml(cfg: JudgeConfig, header: List[str]) -> str:
    """The chosen judge as a YAML file ``eval.judge=FILE`` reads."""
    body = OmegaConf.to_yaml(OmegaConf.create(asdict(cfg)))
    return "".join(f"# {line}\n" for line in header) + body
