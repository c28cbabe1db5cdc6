"""Labelling in the report: which study the browser's labels belong to, and the cells
``python -m lora_lab.calibrate`` asked to label next (framed dashed on the pages).

The labels themselves live in the browser (localStorage, keyed by the study's name and folder),
so they survive reloads and the report's live rewrites, and work from ``file://`` with no
server; "Download labels" saves them as ``labels.json`` for ``lora_lab.calibrate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Set

from lora_lab.files import read_json


def labelling(study_dir: Path, name: str) -> dict:
    """Template variables of the labels bar: the study's name, its storage key, the cells to
    label next as ``trial/epoch/strength`` keys (the format the page's script uses)."""
    return {"study": name, "key": f"{name}:{Path(study_dir).resolve()}", "next": next_keys(study_dir)}


def next_keys(study_dir: Path) -> Set[str]:
    doc = read_json(Path(study_dir) / "labels_next.json") or {}
    return {cell_key(c["trial"], c["epoch"], c["strength"]) for c in doc.get("cells", [])
            if {"trial", "epoch", "strength"} <= set(c)}


def cell_key(trial, epoch, strength) -> str:
    """``3/2/0.75``: as the page's script writes it (JavaScript's number formatting)."""
    return f"{int(trial)}/{int(epoch)}/{_js_number(float(strength))}"


def _js_number(x: float) -> str:
    return str(int(x)) if x == int(x) else repr(x)
