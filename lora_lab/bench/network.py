"""``python -m lora_lab.bench network``: LoRA, LoCon, LoHa, LoKr and DoRA compared in numbers, on
the toy world, with the read-out's truth (the LyCORIS guideline's columns: fidelity,
flexibility, diversity, size, speed).

One ``+sweep=network`` study per subject (the five types at about the same trainable-parameter
count, every epoch evaluated at strengths 0.5 / 1 / 1.5, no pruning), then per trial:

- fidelity: the read-out's share of the subject's identity attributes in the likeness images,
  at strength 1 of the last epoch (the references' own share is the ceiling);
- flexibility: the share of asked-change images that show the asked change (red hair ...), same
  cell; the base model's share beside it;
- diversity: lora_lab's spread of the likeness images (1 - mean pairwise CLIP similarity), same cell;
- the best cell by the read-out (true combined score) and how many cells are truly good;
- lora_lab's own verdicts, and its pick's true score as a share of the trial's true best;
- trainable parameters, file size, training steps per second (the loop alone).

Figures per type are means over the subjects; every subject's are in ``network.json``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Dict, List

import pandas as pd

from lora_lab.bench import studies
from lora_lab.bench import truth as truthbench

SUBJECTS = ("sks", "dax", "oka", "tal")  # about 7 minutes each on 2 cores; --subjects takes others
TYPES = ("lora", "locon", "loha", "lokr", "dora")


def _cell(table: pd.DataFrame, epoch: int, strength: float) -> pd.Series:
    return table[(table.epoch == epoch) & (table.strength == strength)].iloc[0]


def trial_figures(trial: dict) -> dict:
    """One trial's row: the read-out's figures at strength 1 of the last epoch, its best cell,
    lora_lab's verdicts and pick, and the network's size and speed."""
    info = json.loads((trial["dir"] / "trial.json").read_text(encoding="utf-8"))
    verdict = json.loads((trial["dir"] / "verdict.json").read_text(encoding="utf-8"))
    network = info.get("network") or {}
    truth = trial["truth"]
    last = int(truth.epoch.max())
    at1 = _cell(truth, last, 1.0)
    top = _cell(truth, last, float(truth.strength.max()))  # the strongest cell: where overfitting shows
    base = truth[truth.strength == 0].iloc[0]
    agg = trial["agg"]
    lora_cells = truth[truth.strength != 0]
    best = lora_cells.loc[lora_cells.true_combined.idxmax()]
    pick = verdict.get("best")
    pick_share = math.nan
    if pick and best.true_combined > 0:
        pick_share = float(_cell(truth, pick["epoch"], pick["strength"]).true_combined / best.true_combined)
    judged = [c["verdict"] for c in verdict["cells"] if c["verdict"] != "base"]
    return {
        "subject": trial["subject"], "trial": trial["trial"], "type": network.get("type"),
        "trainable_params": network.get("trainable_params"), "file_mb": (network.get("file_bytes") or 0) / 1e6,
        "steps_per_s": network.get("steps_per_s"),
        "fidelity": float(at1.true_likeness), "fidelity_ceiling": float(trial["true_ceiling"]),
        "flexibility": float(at1.true_adherence), "flexibility_base": float(base.true_adherence),
        "top_strength": float(top.strength), "fidelity_top": float(top.true_likeness),
        "flexibility_top": float(top.true_adherence),
        "diversity": float(_cell(agg, last, 1.0).diversity) if "diversity" in agg else math.nan,
        "true_good_cells": int((lora_cells.true_verdict == "good").sum()), "cells": int(len(lora_cells)),
        "true_best": {"epoch": int(best.epoch), "strength": float(best.strength),
                      "true_combined": round(float(best.true_combined), 4)},
        "lora_lab": {v: judged.count(v) for v in ("underfit", "good", "overfit")},
        "pick": None if not pick else {"epoch": pick["epoch"], "strength": pick["strength"]},
        "pick_true_share": None if math.isnan(pick_share) else round(pick_share, 4),
    }


def by_type(rows: List[dict]) -> Dict[str, dict]:
    """Means over subjects per network type."""
    table = pd.DataFrame(rows)
    out = {}
    for kind in [t for t in TYPES if t in set(table.type)]:
        g = table[table.type == kind]
        out[kind] = {"subjects": int(len(g)),
                     **{c: round(float(g[c].mean()), 4) for c in
                        ("trainable_params", "file_mb", "steps_per_s", "fidelity", "flexibility", "fidelity_top",
                         "flexibility_top", "diversity",
                         "true_good_cells", "pick_true_share") if g[c].notna().any()},
                     "cells": int(g.cells.iloc[0]), "top_strength": float(g.top_strength.iloc[0])}
    return out


def run(argv: List[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m lora_lab.bench network", description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default="sweeps/.cache")
    parser.add_argument("--out", default="sweeps/bench")
    parser.add_argument("--subjects", type=lambda s: s.split(","), default=list(SUBJECTS),
                        help="subjects (shipped names or subject .yaml files), comma-separated")
    parser.add_argument("--jobs", type=int, default=1,
                        help="studies run at once, each on cores/jobs threads (default 1: this benchmark reports "
                             "training speed, which a study beside it would disturb)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every study")
    args = parser.parse_args(argv)
    args.cache_dir = str(Path(args.cache_dir).resolve())
    args.root = Path(args.out).resolve() / "network"
    args.root.mkdir(parents=True, exist_ok=True)
    sources = studies.subject_sources(args.subjects)
    sweep_s = studies.run_studies(args, sources, sweep="network")
    from lora_lab.toyworld import assets

    readout = assets.load_readout()
    rows = []
    for name, source in sources.items():
        for trial in truthbench.collect(args.root, name, Path(args.cache_dir), readout, source,
                                        study=args.root / f"network_{name}"):
            rows.append(trial_figures(trial))
    if not rows:
        raise SystemExit("error: no finished trial: there is no figure to report")
    result = {"sweep_s": round(sweep_s, 1), "subjects": list(sources), "types": by_type(rows), "trials": rows}
    out = Path(args.out).resolve() / "network.json"
    out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    print(text(result))
    print(f"figures: {out}")
    return result


def text(r: dict) -> str:
    lines = ["", f"network types on the toy world, {len(r['subjects'])} subjects ({', '.join(r['subjects'])}), "
                 "read-out figures at strength 1 of the last epoch (means over subjects):",
             f"{'type':<7}{'params':>10}{'file MB':>9}{'steps/s':>9}{'fidelity':>10}{'flexibility':>13}"
             f"{'at top strength':>17}{'diversity':>11}{'truly good':>12}{'pick/true best':>16}"]
    for kind, f in r["types"].items():
        top = f"{f['fidelity_top']:.0%} / {f['flexibility_top']:.0%}"
        lines.append(f"{kind:<7}{f['trainable_params']:>10,.0f}{f['file_mb']:>9.2f}{f['steps_per_s']:>9.2f}"
                     f"{f['fidelity']:>10.0%}{f['flexibility']:>13.0%}{top:>17}{f.get('diversity', math.nan):>11.3f}"
                     f"{f['true_good_cells']:>7.1f} of {f['cells']:<3}{f.get('pick_true_share', math.nan):>12.0%}")
    lines.append("fidelity: identity attributes the read-out sees; flexibility: asked changes shown; at top "
                 "strength: both at the strongest strength evaluated; truly good: cells the read-out calls good; "
                 "pick/true best: lora_lab's pick's true score as a share of the trial's best cell's")
    return "\n".join(lines)
