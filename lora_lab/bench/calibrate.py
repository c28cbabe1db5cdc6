"""``python -m lora_lab.bench calibrate``: how many labels make the judge agree with an eye.

On each subject of the truth benchmark's held-out split (its studies, run here when missing),
the toy world's read-out stands in for a user's eye. Starting from the real-model default
thresholds (``JudgeConfig()``), the cells ``lora_lab.calibrate`` names to label next are
labelled by the read-out, five at a time, and the judge is chosen again after each five (what
a user does with the report and the command). After 10, 20 and 40 labels it reports the
agreement with the read-out on the cells NOT labelled, next to, on those same cells:

- the real-model defaults (what a user gets without labelling);
- the toy world's own shipped judge (``conf/model/toyworld.yaml``, the one the studies ran with);
- the best possible setting of the grid for that subject (chosen on all its cells: a ceiling);
- the same number of labels on cells drawn at random (the mean of five draws).

Figures land in ``<out>/calibrate.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List

import numpy as np

from lora_lab.bench import studies
from lora_lab.bench import truth as truthbench
from lora_lab.calibrate.labels import LABELS
from lora_lab.calibrate.search import choose, next_cells, verdict_table, verdicts_of
from lora_lab.calibrate.study import load_study
from lora_lab.config import JudgeConfig
from lora_lab.numbers import wilson

STEPS = (10, 20, 40)
BATCH = 5
DRAWS = 5  # random labellings averaged
TARGET_POINTS = 3.0  # with 20 labels: within this many points of the best possible setting


def simulate(v, truth: np.ndarray, steps=STEPS, batch: int = BATCH, rng=None) -> Dict[int, dict]:
    """Label ``batch`` cells at a time (the ones calibrate names next, or random ones with
    ``rng``), choose the judge again after each batch; at each step in ``steps``: the chosen
    setting and the unlabelled cells."""
    labelled: List[int] = []
    chosen = choose(v, np.array([], dtype=int), np.array([], dtype=np.int8))
    out = {}
    while len(labelled) < min(max(steps), len(v.cells) - 1):
        need = min(batch, max(steps) - len(labelled), len(v.cells) - 1 - len(labelled))
        idx = np.array(labelled, dtype=int)
        if rng is None:
            where = {c: i for i, c in enumerate(v.cells)}
            new = [where[(c["trial"], c["epoch"], c["strength"])] for c in next_cells(v, idx, truth[idx], chosen, need)]
        else:
            new = list(rng.choice(sorted(set(range(len(v.cells))) - set(labelled)), need, replace=False))
        labelled += [int(i) for i in new]
        idx = np.array(labelled, dtype=int)
        chosen = choose(v, idx, truth[idx])
        if len(labelled) in steps:
            rest = np.ones(len(v.cells), dtype=bool)
            rest[idx] = False
            out[len(labelled)] = {"setting": chosen, "rest": rest}
    return out


def subject_figures(study_dir: Path, truth: Dict[tuple, str], shipped: JudgeConfig) -> dict:
    """One subject: agreement on the unlabelled cells at each step, for every judge compared."""
    study = load_study(study_dir)
    start = JudgeConfig()
    v = verdict_table(study, start)
    keep = [i for i, c in enumerate(v.cells) if c in truth]
    v.cells = [v.cells[i] for i in keep]
    v.codes, v.gain = v.codes[:, keep], v.gain[keep]
    y = np.array([LABELS.index(truth[c]) for c in v.cells], dtype=np.int8)
    defaults = verdicts_of(study, start, v.cells)
    toy = verdicts_of(study, shipped, v.cells)
    best = int(np.argmax((v.codes == y).mean(axis=1)))
    out = {"cells": len(v.cells), "true": {k: int((y == i).sum()) for i, k in enumerate(LABELS)},
           "best_setting": _thresholds(v.setting(best)), "steps": {}}
    randoms = [simulate(v, y, rng=np.random.default_rng(seed)) for seed in range(DRAWS)]
    for n, step in simulate(v, y).items():
        rest = step["rest"]

        def hits(codes):
            return int((codes[rest] == y[rest]).sum())

        out["steps"][n] = {
            "unlabelled": int(rest.sum()), "calibrated": hits(v.codes[step["setting"]]),
            "defaults": hits(defaults), "toyworld_judge": hits(toy), "best_possible": hits(v.codes[best]),
            "random_labels": float(np.mean([(v.codes[r[n]["setting"]][r[n]["rest"]] == y[r[n]["rest"]]).mean()
                                            for r in randoms if n in r])),
            "setting": _thresholds(v.setting(step["setting"])),
        }
    return out


def _thresholds(cfg: JudgeConfig) -> dict:
    return {k: getattr(cfg, k) for k in ("underfit_gain", "adherence_drop", "ask_drop", "diversity_drop",
                                         "copy_threshold")}


def pooled(subjects: Dict[str, dict]) -> dict:
    """Over the subjects: agreement on their unlabelled cells (hits over cells), with intervals."""
    out = {}
    for n in STEPS:
        rows = [s["steps"][n] for s in subjects.values() if n in s["steps"]]
        total = sum(r["unlabelled"] for r in rows)
        if not total:
            continue
        entry = {"unlabelled": total}
        for key in ("calibrated", "defaults", "toyworld_judge", "best_possible"):
            hits = sum(r[key] for r in rows)
            entry[key] = {"value": round(hits / total, 4), "ci95": wilson(hits, total)}
        entry["random_labels"] = {"value": round(float(np.average([r["random_labels"] for r in rows],
                                                                   weights=[r["unlabelled"] for r in rows])), 4)}
        entry["gap_to_best_points"] = round(100 * (entry["best_possible"]["value"] - entry["calibrated"]["value"]), 1)
        out[n] = entry
    return out


def run(argv: List[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m lora_lab.bench calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default="sweeps/.cache")
    parser.add_argument("--out", default="sweeps/bench")
    parser.add_argument("--subjects", type=lambda s: s.split(","), default=list(truthbench.HELDOUT),
                        help="subjects (shipped names or subject .yaml files); default: the truth benchmark's held-out")
    parser.add_argument("--jobs", type=int, default=studies.default_jobs(),
                        help="studies run at once, each on cores/jobs threads (default: 2 with 2 or more cores)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the studies, as bench truth takes them")
    args = parser.parse_args(argv)
    args.cache_dir = str(Path(args.cache_dir).resolve())
    args.root = Path(args.out).resolve() / "truth"  # bench truth's studies, shared
    args.root.mkdir(parents=True, exist_ok=True)
    sources = studies.subject_sources(args.subjects)
    studies.run_studies(args, sources)  # resumes: finished studies are not run again
    from lora_lab.cli import compose
    from lora_lab.toyworld import assets

    shipped = compose(["model=toyworld", "data=toyworld"]).eval.judge
    readout = assets.load_readout()
    subjects = {}
    for name, source in sources.items():
        trials = truthbench.collect(args.root, name, Path(args.cache_dir), readout, source)
        truth = {(t["number"], int(r.epoch), float(r.strength)): r.true_verdict
                 for t in trials for r in t["truth"].itertuples() if r.strength != 0}
        subjects[name] = subject_figures(args.root / f"truth_{name}", truth, shipped)
        print(f"subject {name}: " + ", ".join(
            f"{n} labels: {s['calibrated'] / s['unlabelled']:.0%} (defaults {s['defaults'] / s['unlabelled']:.0%}, "
            f"best {s['best_possible'] / s['unlabelled']:.0%})" for n, s in subjects[name]["steps"].items()), flush=True)
    result = {"subjects": subjects, "pooled": pooled(subjects), "start": _thresholds(JudgeConfig()),
              "toyworld_judge": _thresholds(shipped), "batch": BATCH, "random_draws": DRAWS}
    out = Path(args.out).resolve() / "calibrate.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(text(result))
    print(f"figures: {out}")
    return result


def text(r: dict) -> str:
    """The pooled table and the target's verdict."""
    def pct(x):
        lo, hi = x.get("ci95", [None, None])
        return f"{x['value']:.1%}" + (f" [{lo:.0%}, {hi:.0%}]" if lo is not None else "")

    lines = ["", f"agreement with the read-out on the cells not labelled, {len(r['subjects'])} subjects "
                 f"({', '.join(r['subjects'])}), labels {r['batch']} at a time as calibrate names them:",
             f"{'labels':<8}{'cells':>6}  {'calibrated':<20}{'real-model defaults':<22}{'toy-world judge':<20}"
             f"{'best possible':<20}{'random labels':<14}"]
    for n, e in r["pooled"].items():
        lines.append(f"{n:<8}{e['unlabelled']:>6}  {pct(e['calibrated']):<20}{pct(e['defaults']):<22}"
                     f"{pct(e['toyworld_judge']):<20}{pct(e['best_possible']):<20}{e['random_labels']['value']:.1%}")
    at20 = r["pooled"].get(20) or r["pooled"].get("20")
    if at20:
        gap = at20["gap_to_best_points"]
        better = 100 * (at20["calibrated"]["value"] - at20["defaults"]["value"])
        lines.append(f"with 20 labels: {gap:.1f} points below the best possible setting (target within "
                     f"{TARGET_POINTS:g}: {'met' if gap <= TARGET_POINTS else 'MISSED'}); {better:+.1f} points "
                     "over the real-model defaults")
    return "\n".join(lines)
