"""The judge's thresholds chosen from a user's labels: every candidate setting's verdict on
every cell (stored scores re-judged, no rendering), the setting with the best balanced agreement
with the labels, its cross-validated agreement, and the cells worth labelling next.

Balanced agreement is the mean over the labelled classes of the share of that class's labels
the judge matches, so ten "good" labels cannot outvote two "overfit" ones. Among settings that
agree equally, the one whose grid neighbours agree best wins (inside a plateau of equal
agreement rather than next to a drop), then the one nearest the starting judge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from itertools import product
from typing import Dict, List, Optional, Sequence

import numpy as np

from lora_lab.calibrate.labels import LABELS, Cell
from lora_lab.calibrate.study import StudyScores
from lora_lab.config import JudgeConfig
from lora_lab.evaluate.judge import judge
from lora_lab.numbers import wilson

# Candidate thresholds (underfit_gain first); 1.0 turns a check off.
GRID: Dict[str, List[float]] = {
    "underfit_gain": [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7],
    "adherence_drop": [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 1.0],
    "ask_drop": [0.25, 0.5, 0.75, 1.0],
    "diversity_drop": [0.5, 1.0],
    "copy_threshold": [0.95, 1.0],
}
CODE = {v: i for i, v in enumerate(LABELS)}  # underfit 0, good 1, overfit 2


@dataclass
class Verdicts:
    """``codes[s, c]``: the verdict (0 underfit, 1 good, 2 overfit) of setting ``s`` on cell ``c``."""

    cells: List[Cell]
    codes: np.ndarray
    gain: np.ndarray  # per cell: the likeness gain (the same under every setting)
    grid: Dict[str, List[float]]
    start: JudgeConfig

    @property
    def shape(self) -> tuple:
        return tuple(len(v) for v in self.grid.values())

    def setting(self, s: int) -> JudgeConfig:
        values = np.unravel_index(s, self.shape)
        return replace(self.start, **{k: self.grid[k][int(i)] for k, i in zip(self.grid, values)})

    def index(self, cells: Sequence[Cell]) -> np.ndarray:
        where = {c: i for i, c in enumerate(self.cells)}
        return np.array([where[c] for c in cells], dtype=int)


def verdict_table(study: StudyScores, start: JudgeConfig, grid: Optional[Dict[str, List[float]]] = None) -> Verdicts:
    """Every candidate setting's verdicts on every LoRA cell of the study. The overfit checks do
    not depend on ``underfit_gain``, so each of their combinations is judged once and the
    underfit cut is applied to the stored gains."""
    grid = dict(grid or GRID)
    assert next(iter(grid)) == "underfit_gain"
    cells = study.cells()
    where = {c: i for i, c in enumerate(cells)}
    over_keys = list(grid)[1:]
    combos = list(product(*(grid[k] for k in over_keys)))
    overfit = np.zeros((len(combos), len(cells)), dtype=bool)
    gain = np.full(len(cells), np.nan)
    for j, combo in enumerate(combos):
        cfg = replace(start, underfit_gain=0.0, **dict(zip(over_keys, combo)))
        for t in study.trials.values():
            judged = judge(t.agg, t.ceiling, cfg)
            for r in judged[judged.strength != 0].itertuples():
                i = where[(t.number, int(r.epoch), float(r.strength))]
                overfit[j, i] = r.verdict == "overfit"
                gain[i] = r.gain
    cuts = np.array(grid["underfit_gain"])
    under = ~(gain[None, :] >= cuts[:, None])  # an unmeasured gain is underfit, as the judge says
    codes = np.where(overfit[None, :, :], 2, np.where(under[:, None, :], 0, 1)).astype(np.int8)
    return Verdicts(cells, codes.reshape(-1, len(cells)), gain, grid, start)


def verdicts_of(study: StudyScores, cfg: JudgeConfig, cells: Sequence[Cell]) -> np.ndarray:
    """One judge's verdict codes on ``cells`` (for a judge that is not on the grid)."""
    found = {}
    for t in study.trials.values():
        judged = judge(t.agg, t.ceiling, cfg)
        for r in judged[judged.strength != 0].itertuples():
            found[(t.number, int(r.epoch), float(r.strength))] = CODE[r.verdict]
    return np.array([found[c] for c in cells], dtype=np.int8)


def balanced(codes: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Balanced agreement of each row of ``codes`` (settings x labelled cells) with labels ``y``."""
    codes = np.atleast_2d(codes)
    parts = [(codes[:, y == k] == k).mean(axis=1) for k in np.unique(y)]
    return np.mean(parts, axis=0) if parts else np.zeros(len(codes))


def _plateau(acc: np.ndarray, shape: tuple) -> np.ndarray:
    """Each setting's mean agreement over itself and its grid neighbours (one step along any
    axes); past the grid's ends there is no neighbour, so an end is scored by the settings on
    its one side only."""
    a = acc.reshape(shape).astype(float)
    padded = np.pad(a, 1, mode="constant", constant_values=np.nan)
    total, count = np.zeros_like(a), np.zeros_like(a)
    for shift in product((0, 1, 2), repeat=a.ndim):
        part = padded[tuple(slice(s, s + n) for s, n in zip(shift, a.shape))]
        total += np.nan_to_num(part)
        count += ~np.isnan(part)
    return (total / count).ravel()


def _distance(v: Verdicts) -> np.ndarray:
    """How far each setting is from the starting judge, each threshold scaled by its grid's range."""
    out = np.zeros(v.shape)
    for axis, (key, values) in enumerate(v.grid.items()):
        span = (max(values) - min(values)) or 1.0
        d = np.abs(np.array(values) - getattr(v.start, key)) / span
        out = out + d.reshape([-1 if i == axis else 1 for i in range(len(v.shape))])
    return out.ravel()


def choose(v: Verdicts, idx: np.ndarray, y: np.ndarray) -> int:
    """The setting with the best balanced agreement on cells ``idx`` labelled ``y``; ties: the
    best plateau, then the nearest to the starting judge."""
    if len(idx) == 0:
        return int(np.argmin(_distance(v)))
    acc = np.round(balanced(v.codes[:, idx], y), 9)
    order = np.lexsort((-_distance(v), np.round(_plateau(acc, v.shape), 9), acc))
    return int(order[-1])


def cross_validated(v: Verdicts, idx: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0) -> Optional[np.ndarray]:
    """Each labelled cell's verdict by a judge chosen without its label (k folds, classes spread
    evenly over the folds); None with fewer than 2 labels."""
    n = len(idx)
    if n < 2:
        return None
    k = min(folds, n)
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)])
    fold = np.empty(n, dtype=int)
    fold[order] = np.arange(n) % k
    pred = np.empty(n, dtype=np.int8)
    for f in range(k):
        train = fold != f
        s = choose(v, idx[train], y[train])
        pred[~train] = v.codes[s, idx[~train]]
    return pred


def next_cells(v: Verdicts, idx: np.ndarray, y: np.ndarray, chosen: int, n: int = 5) -> List[dict]:
    """The unlabelled cells whose verdict is least certain: where the settings that agree with
    the labels about as well as the chosen one disagree most among themselves (vote entropy),
    then the closest to the chosen underfit cut; spread over the trials."""
    if len(idx):
        acc = balanced(v.codes[:, idx], y)
        pool = v.codes[acc >= acc.max() - 1.0 / len(idx) - 1e-9]
    else:
        pool = v.codes
    shares = np.stack([(pool == k).mean(axis=0) for k in range(len(LABELS))])
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.nansum(np.where(shares > 0, shares * np.log2(shares), 0.0), axis=0)
    cut = v.setting(chosen).underfit_gain
    closeness = np.abs(np.nan_to_num(v.gain, nan=-1.0) - cut)
    labelled = set(idx.tolist())
    ranked = [i for i in np.lexsort((closeness, -np.round(entropy, 9))) if i not in labelled]
    trials = {c[0] for c in v.cells}
    per_trial = max(1, math.ceil(n / max(1, len(trials))))
    picked: List[int] = []
    for limit in (per_trial, n):  # spread first; fill from the rest when the trials run out
        for i in ranked:
            if len(picked) == n:
                break
            if i not in picked and sum(v.cells[j][0] == v.cells[i][0] for j in picked) < limit:
                picked.append(i)
    out = []
    for i in picked:
        votes = {LABELS[k]: round(float(shares[k, i]), 3) for k in range(len(LABELS)) if shares[k, i] > 0}
        trial, epoch, strength = v.cells[i]
        out.append({"trial": trial, "epoch": epoch, "strength": strength, "entropy": round(float(entropy[i]), 3),
                    "votes": votes, "gain": None if math.isnan(v.gain[i]) else round(float(v.gain[i]), 4),
                    "chosen": LABELS[int(v.codes[chosen, i])]})
    return out


def labels_for_interval(agreement: float, n: int, half: float = 0.10) -> int:
    """How many more labels bring the 95% interval of ``agreement`` (measured on ``n`` labels)
    below +/- ``half``, if agreement stays where it is."""
    p = agreement if agreement == agreement else 0.5
    m = max(n, 1)
    while m < 100_000:
        low, high = wilson(round(p * m), m)
        if (high - low) / 2 < half:
            return m - n
        m += 1
    return m - n
