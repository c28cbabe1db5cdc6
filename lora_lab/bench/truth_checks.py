"""How far the truth itself can be trusted, and the leakage it sees: figures of the truth
benchmark beside its verdict figures.

- ``readouts``: a second read-out, built and trained apart (:func:`assets.load_readout2`),
  reads every image too. Per attribute, how often the two read the same thing on the training
  drawings, on the base model's renders and on LoRA renders (blurrier, carrying the training
  drawings' look); and per split, how many cells' true verdicts change with the read-out and
  the verdict figures on the cells where both read-outs give the same true verdict; and the
  second read-out's own true verdicts and best cells scored as if it were a judge
  (``second_readout_as_judge``): how closely two read-outs of the same images agree, the
  resolution of the truth that the verdict and pick targets are measured with.
- ``leakage``: cells where the training drawings' uncaptioned background shows in prompts that
  ask for no background, more than ``adherence_drop`` more often than on the base model
  (:func:`truth_rules.training_context`), and what lora_lab called them.
"""

from __future__ import annotations

from typing import Callable, List

import pandas as pd

from lora_lab.bench import truth_rules as gt
from lora_lab.bench.truth_rules import VERDICTS
from lora_lab.evaluate.judge import best_cell


def readout_figures(trials: List[dict]) -> dict:
    """Per attribute: the two read-outs' agreement on training drawings, base and LoRA renders."""
    have = [t for t in trials if t.get("same") is not None]
    if not have:
        return {}
    images = pd.concat([t["same"] for t in have], ignore_index=True)
    refs = pd.concat([t["same_references"] for t in {t["subject"]: t for t in have}.values()], ignore_index=True)
    attributes = [c[len("same_"):] for c in images.columns if c.startswith("same_")]
    out = {}
    for name, frame in (("training_drawings", refs), ("base_renders", images[images.strength == 0]),
                        ("lora_renders", images[images.strength != 0])):
        out[name] = {"images": int(len(frame)),
                     "by_attribute": {a: round(float(frame[f"same_{a}"].mean()), 4) for a in attributes}}
    return out


def where_readouts_agree(cells: pd.DataFrame, picks: List[dict], figures: Callable) -> dict:
    """The verdict figures on the cells whose true verdict is the same with either read-out,
    and how many are not."""
    if "true_verdict_b" not in cells:
        return {}
    same = cells[cells.true_verdict == cells.true_verdict_b]
    parted = cells[cells.true_verdict != cells.true_verdict_b]
    out = figures(same, picks)
    for key in ("picks_in_true_top3", "picks_regret"):  # picks do not depend on the read-out
        out.pop(key, None)
    out["cells_where_readouts_part"] = int(len(parted))
    out["parted_by_subject"] = {str(k): int(v) for k, v in parted.groupby("subject").size().items()}
    out["parted_as"] = {f"{a} / {b}": int(n) for (a, b), n in
                        parted.groupby(["true_verdict", "true_verdict_b"]).size().items()}
    return out


def second_readout_as_judge(trials: List[dict], figures: Callable) -> dict:
    """The second read-out's true verdicts and picks (its best non-overfit cell by its own true
    combined score, chosen by the judge's own :func:`best_cell`, without a tie margin)
    scored against the first read-out's truth like lora_lab's: agreement, recall and
    ``picks_regret`` on the same images, a judge that reads the images about as well as the
    truth does."""
    have = [t for t in trials if "true_combined_b" in t["truth"]]
    if not have:
        return {}
    tables, picks = [], []
    for t in have:
        truth = t["truth"]
        judged = truth[gt.CELL].assign(verdict=truth.true_verdict_b)
        top = best_cell(truth.assign(verdict=truth.true_verdict_b, combined=truth.true_combined_b))
        best = None if top is None else {"epoch": int(top.epoch), "strength": float(top.strength)}
        result = gt.compare(judged, truth, best)
        table = result["table"]
        tables.append(table[table.strength != 0].assign(subject=t["subject"], trial=t["trial"]))
        picks.append({"subject": t["subject"], "trial": t["trial"], "pick": best, "rank": result["pick_rank"],
                      "true_share": result["pick_true_share"], "pick_true_verdict": result["pick_true_verdict"]})
    out = figures(pd.concat(tables, ignore_index=True), picks)
    keep = ("cells", "trials", "agreement", "recall", "picks_in_true_top3", "picks_regret", "by_subject")
    return {**{k: out[k] for k in keep if k in out},
            "picks_missed": [{k: p[k] for k in ("subject", "trial", "pick", "true_share", "pick_true_verdict")}
                             for p in picks if not (p["true_share"] is not None and p["true_share"] >= 0.95
                                                    and p["pick_true_verdict"] != "overfit")]}


def leakage_figures(cells: pd.DataFrame, trials: List[dict]) -> dict:
    """Cells flagged by the leakage rule, per subject with a training context, and lora_lab's
    verdict on them."""
    contexts = {t["subject"]: t.get("context") for t in trials}
    subjects = sorted(s for s, c in contexts.items() if c)
    if "leaks" not in cells:
        return {"subjects": {}, "cells": 0, "of": 0}
    mine = cells[cells.subject.isin(subjects)]
    leaking = mine[mine.leaks.astype(bool)]
    return {"subjects": {s: contexts[s] for s in subjects},
            "cells": int(len(leaking)), "of": int(len(mine)),
            "by_subject": {str(k): int(v) for k, v in leaking.groupby("subject").size().items()},
            "true_verdicts": {v: int((leaking.true_verdict == v).sum()) for v in VERDICTS},
            "lora_lab_verdicts": {v: int((leaking.verdict == v).sum()) for v in VERDICTS}}
