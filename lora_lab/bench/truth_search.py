"""The calibration search of ``bench truth``: every candidate's verdicts against the truth, on
as many cores as the benchmark may use.

Each candidate needs only the judge's verdicts (no pick, no reasons table), so a trial's cells
are aligned with its true verdicts once, and a candidate costs one ``judge`` call per trial.
The candidates are cut into one contiguous slice per process (each gets the aggregated tables,
not the trials); the results come back in candidate order, so the choice is the same on any
number of processes.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from typing import List, Sequence, Tuple

import numpy as np

from lora_lab.bench import truth_rules as gt
from lora_lab.config import JudgeConfig
from lora_lab.evaluate.judge import judge

VERDICTS = gt.VERDICTS


def aligned(trial: dict) -> Tuple[np.ndarray, np.ndarray]:
    """(rows of the judged table, their true verdicts) for the trial's LoRA cells, in the order
    the truth table's merge gives them. The judge keeps the aggregated table's rows and order."""
    rows = trial["agg"][gt.CELL].reset_index(drop=True).reset_index()
    merged = rows.merge(trial["truth"][gt.CELL + ["true_verdict"]], on=gt.CELL)
    merged = merged[merged.strength != 0]
    return merged["index"].to_numpy(), merged["true_verdict"].to_numpy()


def confusion(tables: Sequence[tuple], cfg: JudgeConfig) -> np.ndarray:
    """3 x 3 counts, true verdict by lora_lab's verdict, over the LoRA cells of every
    (aggregated table, ceiling, rows, true verdicts)."""
    counts = np.zeros((3, 3), dtype=int)
    for agg, ceiling, rows, truth in tables:
        said = judge(agg, ceiling, cfg)["verdict"].to_numpy()[rows]
        for i, v in enumerate(VERDICTS):
            mine = said[truth == v]
            counts[i] += [int((mine == w).sum()) for w in VERDICTS]
    return counts


def key(counts: np.ndarray) -> Tuple[float, float]:
    """(balanced recall over the verdicts that truly occur, agreement)."""
    recalls = [counts[i, i] / counts[i].sum() for i in range(3) if counts[i].sum()]
    total = counts.sum()
    return (sum(recalls) / len(recalls) if recalls else 0.0, counts.trace() / total if total else float("nan"))


def _keys(tables: Sequence[tuple], cfgs: Sequence[JudgeConfig]) -> List[Tuple[float, float]]:
    return [key(confusion(tables, cfg)) for cfg in cfgs]


def keys(trials: Sequence[dict], cfgs: Sequence[JudgeConfig], jobs: int = 1) -> List[Tuple[float, float]]:
    """Every candidate's (balanced recall, agreement) on ``trials``, in the order of ``cfgs``,
    on ``jobs`` processes (each gets one contiguous slice of the candidates)."""
    tables = [(t["agg"], t["ceiling"], *aligned(t)) for t in trials]  # all a process needs
    jobs = max(1, min(int(jobs or 1), len(cfgs)))
    if jobs == 1:
        return _keys(tables, cfgs)
    step = -(-len(cfgs) // jobs)
    slices = [list(cfgs[i:i + step]) for i in range(0, len(cfgs), step)]
    with ProcessPoolExecutor(len(slices)) as pool:
        return [k for part in pool.map(_keys, [tables] * len(slices), slices) for k in part]
