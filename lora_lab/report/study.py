"""Study folder -> a self-contained HTML report (Jinja2), rebuilt from the files alone.

``python -m lora_lab.report sweeps/<study>`` writes ``reports/<study>/index.html``: the sweep's
definition, a sortable leaderboard, the winner with its file and ``<lora:...>`` snippet, how each
swept parameter relates to the objective, a likeness-vs-adherence Pareto front, and one page
per trial (verdict table, heatmaps, loss curve, X/Y grids, the error of a failed trial). No
server, no network: CSS and JavaScript are inlined, images are copied beside the pages. All
user text (captions, prompts, tokens, file names) is escaped by Jinja2's autoescaping.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import pandas as pd

from lora_lab.files import DIR_MODE, read_json
from lora_lab.report import leaderboard
from lora_lab.report.front import Images, TrialCells, change, front_page, progress
from lora_lab.report.labels import labelling
from lora_lab.report.tensorboard import read_scalars

TEMPLATES = Path(__file__).resolve().parent / "templates"


@functools.lru_cache(maxsize=None)
def jinja_env():
    """One environment per process: its templates are compiled once, not at every rebuild."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    return Environment(loader=FileSystemLoader(str(TEMPLATES)),
                       autoescape=select_autoescape(["html", "j2"], default_for_string=True, default=True))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_INTEGER = ("best_epoch", "val_loss_epoch", "trial", "trainable_params")  # whole numbers, even in a column with blanks


def _missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _fmt(value, digits: int = 4, integer: bool = False) -> str:
    if _missing(value):
        return ""
    if integer and isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    _plt().close(fig)


def _param_figures(table: pd.DataFrame, params: List[str], out: Path, study: dict) -> List[dict]:
    figs = []
    done = table[table.state == "complete"]
    if done.empty:  # nothing to draw yet: matplotlib is not even imported
        return figs
    plt = _plt()
    for p in params:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        values = done[p].astype(str)
        ax.scatter(values, done.objective.astype(float), s=40)
        for x, y, n in zip(values, done.objective.astype(float), done.trial):
            ax.annotate(f"t{n}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(p)
        ax.set_ylabel(study.get("objective", "objective"))
        ax.tick_params(axis="x", rotation=20)
        name = f"param_{len(figs)}.png"
        _save(fig, out / name)
        figs.append({"src": name, "caption": f"{study.get('objective', 'objective')} by {p} (completed trials)"})
    return figs


def _pareto_figure(study_dir: Path, out: Path) -> Optional[dict]:
    """Likeness vs adherence of every LoRA cell of every trial, Pareto front highlighted."""
    points = []
    for path in study_dir.glob("trial_*/verdict.json"):
        trial = int(path.parent.name.split("_")[1])
        for c in (read_json(path) or {}).get("cells", []):
            if c.get("strength") and c.get("likeness") is not None and c.get("adherence") is not None:
                points.append((c["likeness"], c["adherence"], trial, c["verdict"]))
    if not points:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    colours = {"good": "tab:green", "underfit": "tab:orange", "overfit": "tab:red"}
    for verdict, colour in colours.items():
        sel = [(x, y) for x, y, _, v in points if v == verdict]
        if sel:
            ax.scatter(*zip(*sel), c=colour, label=verdict, s=30)
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q[:2] != p[:2] for q in points)]
    front.sort()
    ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=1, label="Pareto front")
    ax.set_xlabel("likeness")
    ax.set_ylabel("adherence (CLIP score)")
    ax.legend(fontsize=8)
    _save(fig, out / "pareto.png")
    return {"src": "pareto.png", "caption": "likeness vs adherence of every cell of every trial"}


def _shade(value: float, low: float, high: float) -> dict:
    """A cell's background on a light-to-dark blue scale (``low`` lightest), with readable text."""
    t = 0.5 if high <= low else (value - low) / (high - low)
    light, dark = (237, 243, 251), (33, 78, 140)
    rgb = [round(a + (b - a) * t) for a, b in zip(light, dark)]
    return {"background": "#%02x%02x%02x" % tuple(rgb), "color": "#fff" if t > 0.55 else "#111"}


def _heatmap(cells: List[dict], metric: str) -> Optional[dict]:
    """``metric`` over strength (rows) x epoch (columns), each cell with its verdict, shaded from
    the lowest to the highest value of the trial: an HTML table, nothing drawn."""
    rows = [c for c in cells if c.get(metric) is not None and c.get("verdict") != "base"]
    if not rows:
        return None
    values = [float(c[metric]) for c in rows]
    low, high = min(values), max(values)
    by_cell = {(c.get("strength"), c.get("epoch")): c for c in rows}
    strengths = sorted({c.get("strength") for c in rows})
    epochs = sorted({c.get("epoch") for c in rows})
    table = []
    for s in strengths:
        line = []
        for e in epochs:
            c = by_cell.get((s, e))
            line.append(None if c is None else {"text": _fmt(c[metric]), "verdict": c.get("verdict", ""),
                                                **_shade(float(c[metric]), low, high)})
        table.append({"strength": _fmt(s), "cells": line})
    return {"metric": metric, "epochs": epochs, "rows": table, "low": _fmt(low), "high": _fmt(high)}


def _loss_figure(tb_dir: Path, path: Path) -> bool:
    scalars = read_scalars(tb_dir)
    if "loss/current" not in scalars:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3))
    steps, values = zip(*scalars["loss/current"])
    ax.plot(steps, values, lw=0.8, alpha=0.6, label="loss/current")
    if "loss/average" in scalars:
        s2, v2 = zip(*scalars["loss/average"])
        ax.plot(s2, v2, lw=1.5, label="loss/average (epoch)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def _trial_page(env, study: dict, tdir: Path, out: Path, warnings: List[str], labels: dict) -> None:
    info = read_json(tdir / "trial.json") or {}
    verdict = read_json(tdir / "verdict.json") or {}
    page_dir = out / tdir.name
    page_dir.mkdir(parents=True, exist_ok=True)
    figures, grids = [], []
    cells = [c for c in verdict.get("cells", [])]
    heatmaps = [h for h in (_heatmap(cells, m) for m in ("likeness", "adherence")) if h]
    if _loss_figure(tdir / "tb", page_dir / "loss.png"):
        figures.append({"src": "loss.png", "caption": "training loss"})
    prompts = {}
    scores = tdir / "scores.csv"
    if scores.exists():
        s = pd.read_csv(scores, usecols=["prompt_index", "prompt"]).drop_duplicates()
        prompts = dict(zip(s.prompt_index, s.prompt))
    for grid in sorted((tdir / "grids").glob("*.png")):
        shutil.copy2(grid, page_dir / grid.name)
        idx = int(grid.stem[1:]) if grid.stem[1:].isdigit() else None
        grids.append({"src": grid.name, "caption": prompts.get(idx, grid.stem)})
    error = (tdir / "error.txt").read_text(encoding="utf-8", errors="replace") if (tdir / "error.txt").exists() else ""
    tags = []
    lora_files = sorted((tdir / "lora").glob("*.safetensors"))
    if lora_files:
        from safetensors import safe_open

        with safe_open(str(lora_files[-1]), framework="numpy") as fh:  # the header only
            meta = fh.metadata() or {}
        freq = json.loads(meta.get("ss_tag_frequency", "{}") or "{}")
        for folder, counts in freq.items():
            for tag, n in sorted(counts.items(), key=lambda kv: -kv[1]):
                tags.append((f"{folder} ({n}x)", tag))
    # The base model's row is the same for every epoch: shown once, first.
    base_rows = [c for c in cells if c.get("verdict") == "base"][:1]
    base_of = {c.get("epoch"): c for c in cells if c.get("verdict") == "base"}
    shown_cells = []
    for c in base_rows + [c for c in cells if c.get("verdict") != "base"]:
        b = base_of.get(c.get("epoch"), {})
        is_base = c.get("verdict") == "base"
        shown_cells.append({**c, "epoch": "any" if is_base else c.get("epoch"),
                            "likeness": _fmt(c.get("likeness")), "adherence": _fmt(c.get("adherence")),
                            "likeness_change": "baseline" if is_base else change(c.get("likeness"), b.get("likeness")),
                            "adherence_change": "baseline" if is_base else
                            change(c.get("adherence"), b.get("adherence"), pct=True)})
    xy = None
    if verdict.get("cells"):
        tc, images = TrialCells(tdir), Images(page_dir)
        xy = {"strengths": tc.strengths,
              "rows": [{"epoch": e, "cells": [tc.cell(images, e, s) for s in tc.strengths]} for e in tc.epochs]}
    t = {"number": info.get("number", tdir.name.split("_")[1]), "state": info.get("state", "unknown"),
         "params": info.get("params", {}), "objective_text": _fmt(info.get("objective")),
         "reason": info.get("reason", ""), "duration": info.get("duration_s"), "error": error}
    html = env.get_template("trial.html.j2").render(study=study, t=t, best=verdict.get("best"), cells=shown_cells,
                                                   figures=figures, heatmaps=heatmaps, grids=grids, captions=tags[:200], xy=xy,
                                                   labels=labels,
                                                   warnings=[n for n in verdict.get("notes", []) if n in warnings
                                                             or n.startswith(leaderboard.LEFT_OUT)])
    (page_dir / "index.html").write_text(html, encoding="utf-8")


def _stamp(tdir: Path, info: dict) -> str:
    """What a trial page is drawn from, as sizes and times: equal stamps, equal pages."""
    files = []
    for name in ("trial.json", "verdict.json", "scores.csv", "error.txt", "../labels_next.json"):
        try:
            st = (tdir / name).stat()
            files.append([name, st.st_size, st.st_mtime_ns])
        except OSError:
            pass
    return json.dumps({"state": info.get("state"), "files": files})


def _read_text(path: Path) -> Optional[str]:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None


def build_report(study_dir: Path, reports_root: Path = Path("reports")) -> Path:
    """Write ``reports_root/<study>/index.html`` and its trial pages; returns the index path.

    The report is built in a temp folder and swapped in, so a reader never sees half a report.
    """
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise FileNotFoundError(f"{study_dir} is not a study folder")
    study = read_json(study_dir / "study.json") or {"name": study_dir.name}
    study.setdefault("name", study_dir.name)
    reports_root = Path(reports_root)
    reports_root.mkdir(parents=True, exist_ok=True)
    target = reports_root / study_dir.name
    tmp = Path(tempfile.mkdtemp(prefix=f".{study_dir.name}-", dir=reports_root))
    try:
        env = jinja_env()
        labels = labelling(study_dir, study["name"])
        table = leaderboard.build(study_dir)
        warnings = [n for n in leaderboard.notes(study_dir) if leaderboard.shown(n)]
        params = [c for c in table.columns if c not in leaderboard.FIRST + leaderboard.LAST + leaderboard.NETWORK]
        network = [c for c in leaderboard.NETWORK if c in table.columns]  # what the trial trained, not a swept key
        columns = ["trial", "state"] + params + network + ["objective", "verdict", "best_epoch", "best_strength", "likeness",
                                                  "adherence", "snippet", "reason"]
        rows = []
        for r in table.to_dict(orient="records"):
            text = {c: _fmt(r.get(c), integer=c in _INTEGER) for c in columns}
            sort = {c: ("" if _missing(r.get(c)) else r.get(c)) for c in columns}
            rows.append({"trial": r["trial"], "state": r["state"], "text": text, "sort": sort})
        winner_row = leaderboard.best(table)
        winner = None
        if winner_row is not None:
            winner = {**winner_row.to_dict(), "objective_text": _fmt(winner_row.objective),
                      "best_epoch_text": _fmt(winner_row.best_epoch, integer=True)}
        front = front_page(study_dir, tmp, winner, previous=target)
        figures = _param_figures(table, params, tmp, study)
        pareto = _pareto_figure(study_dir, tmp)
        if pareto:
            figures.append(pareto)
        definition = [(k, json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in study.items()]
        html = env.get_template("index.html.j2").render(
            study=study, rows=rows, columns=columns, winner=winner, figures=figures, definition=definition,
            warnings=warnings, built=time.strftime("%Y-%m-%d %H:%M:%S"), front=front,
            progress=progress(study_dir, table, study), labels=labels)
        (tmp / "index.html").write_text(html, encoding="utf-8")
        for tdir in sorted(study_dir.glob("trial_*")):
            info = read_json(tdir / "trial.json") or {}
            if info.get("state") in ("duplicate", "retried"):
                continue
            stamp = _stamp(tdir, info)
            previous = target / tdir.name
            if info.get("state") != "running" and _read_text(previous / ".stamp") == stamp:
                shutil.copytree(previous, tmp / tdir.name)  # unchanged since the last build: no redrawing
                continue
            _trial_page(env, study, tdir, tmp, warnings, labels)
            (tmp / tdir.name / ".stamp").write_text(stamp, encoding="utf-8")
        os.chmod(tmp, DIR_MODE)
        old = reports_root / f".{study_dir.name}-old-{os.getpid()}"
        try:
            if target.exists():
                os.rename(target, old)
            os.rename(tmp, target)
        except OSError:
            pass  # another worker swapped its report in at this moment: that one stands
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target / "index.html"


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_lab.report", description=__doc__.splitlines()[0])
    parser.add_argument("study_dir", type=Path, help="a study folder, e.g. sweeps/scheduler")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="reports folder (default: reports)")
    args = parser.parse_args(argv)
    try:
        index = build_report(args.study_dir, args.out)
    except (FileNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
