"""A user's labels of cells: ``labels.json`` as the report's "Download labels" button saves it,
or a CSV with columns trial, epoch, strength, label. Every row is checked before anything is
used; a bad one stops with one sentence naming the file, the row and what is allowed."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from lora_lab.errors import LoraLabError

LABELS = ("underfit", "good", "overfit")
Cell = Tuple[int, int, float]  # trial, epoch, strength


class LabelError(LoraLabError):
    """A label file that cannot be used (nothing in the study is changed)."""


@dataclass(frozen=True)
class Label:
    trial: int
    epoch: int
    strength: float
    label: str
    source: str  # "labels.json row 3": named in messages

    @property
    def cell(self) -> Cell:
        return (self.trial, self.epoch, self.strength)


def read_labels(paths: Iterable[Path], study: Optional[str] = None) -> Dict[Cell, Label]:
    """Every labelled cell from the files in order (a later file's label of a cell wins).

    Raises:
        LabelError: a missing or unreadable file, a missing column, a row whose trial, epoch,
            strength or label is not allowed, a file saved from another study's report, or
            no labels at all.
    """
    out: Dict[Cell, Label] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise LabelError(f"{path}: no such label file; give labels.json from the report's 'Download labels' "
                             "button or a CSV with columns trial, epoch, strength, label")
        rows = _csv_rows(path) if path.suffix.lower() == ".csv" else _json_rows(path, study)
        for i, row in enumerate(rows, start=1):
            label = _label(row, f"{path.name} row {i}")
            out[label.cell] = label
    if not out:
        raise LabelError(f"{', '.join(str(p) for p in paths)}: no labels in the file(s); label cells in the "
                         "report (u / g / o) and save them with 'Download labels'")
    return out


def _json_rows(path: Path, study: Optional[str]) -> List[dict]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LabelError(f"{path}: not a JSON label file ({exc}); give the file the report's 'Download labels' "
                         "button saves, or a CSV with columns trial, epoch, strength, label") from None
    rows = doc.get("labels") if isinstance(doc, dict) else doc
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise LabelError(f"{path}: expected a list of labels (or {{\"labels\": [...]}}), each with trial, epoch, "
                         "strength and label")
    names = {r.get("study") for r in rows if r.get("study")} | ({doc["study"]} if isinstance(doc, dict)
                                                                  and doc.get("study") else set())
    if study is not None and names and names != {study}:
        raise LabelError(f"{path}: these labels were saved from the report of study {', '.join(sorted(names))}, "
                         f"not {study}; give this study's labels")
    return rows


def _csv_rows(path: Path) -> List[dict]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip().lower() for h in reader.fieldnames or []]
            missing = [c for c in ("trial", "epoch", "strength", "label") if c not in header]
            if missing:
                raise LabelError(f"{path}: no {', '.join(repr(c) for c in missing)} column; a label CSV needs the "
                                 "columns trial, epoch, strength, label")
            return [{(k or "").strip().lower(): v for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LabelError(f"{path}: cannot read it as CSV ({exc})") from None


def _label(row: dict, where: str) -> Label:
    trial = _whole(row.get("trial"), where, "trial", strip="trial")
    epoch = _whole(row.get("epoch"), where, "epoch")
    try:
        strength = float(row.get("strength"))
    except (TypeError, ValueError):
        raise LabelError(f"{where}: strength {row.get('strength')!r} is not a number") from None
    if strength == 0:
        raise LabelError(f"{where}: strength 0 is the base model, the baseline; only LoRA cells (strength other "
                         "than 0) can be labelled")
    label = str(row.get("label") or "").strip().lower()
    if label not in LABELS:
        raise LabelError(f"{where}: label {row.get('label')!r} is not one of {', '.join(LABELS)}")
    return Label(trial, epoch, strength, label, where)


def _whole(value, where: str, name: str, strip: str = "") -> int:
    text = str(value if value is not None else "").strip().lower()
    if strip:
        text = text.removeprefix(strip).strip(" _#")
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if not math.isfinite(number) or number != int(number):
        raise LabelError(f"{where}: {name} {value!r} is not a whole number")
    if number < 0:
        raise LabelError(f"{where}: {name} {value!r} is negative")
    return int(number)
