"""Schema of a sweep: the grid / search space, sampler, pruner, objective and storage, and the
cheap per-epoch check that feeds the pruner."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from lora_lab.config.checks import choice, require

SWEEP_SAMPLERS = ("grid", "tpe", "random")
PRUNERS = ("none", "median", "percentile")
OBJECTIVES = ("combined", "likeness", "adherence", "gain")
_NOT_SWEEPABLE = ("model.", "cache_dir", "device", "sweep.", "output_dir", "lora_dir")


@dataclass
class PruneEvalConfig:
    """The per-epoch check that feeds the pruner: a smaller evaluation of the same kind.

    Attributes:
        max_prompts: Prompts of each kind (likeness and adaptability), from the suite's start.
        seeds: Seeds; null: the first ``n_seeds`` of ``eval.seeds``.
        n_seeds: How many of ``eval.seeds`` when ``seeds`` is null.
        strengths: Strengths; null: ``eval.strengths``, the ones the objective is chosen from.
        steps: Sampling steps; null: ``eval.steps``.

    A single prompt and seed at strengths 0 and 1 read as saturated as early as epoch 1 and
    ranked trials no better than chance (``bench truth``'s pruning figures), hence these defaults.
    """

    max_prompts: int = 2
    seeds: Optional[List[int]] = None
    n_seeds: int = 2
    strengths: Optional[List[float]] = None
    steps: Optional[int] = None


@dataclass
class SweepConfig:
    """A study: what varies between trials and how trials are chosen (a ``conf/sweep/*.yaml``).

    Attributes:
        name: Study name; results land in ``<root>/<name>/``.
        grid: Config path -> list of values (every combination is one trial).
        variants: Named bundles of config values, swept as one parameter ``variant``
            (prodigy with its lr = 1.0, rank 32 with alpha 16 ...).
        space: Config path -> {type: float|int|categorical, low, high, log, choices} for TPE/random.
        fixed: Config path -> value applied to every trial.
        n_trials: Trials in all (grid: default every combination).
        sampler: grid, tpe or random.
        pruner: none, median or percentile (Optuna's MedianPruner / PercentilePruner on the
            per-epoch check, ``prune_eval``).
        pruner_startup_trials: Trials that always run to the end before pruning starts.
        pruner_warmup_epochs: Epochs of every trial that are never pruned.
        pruner_percentile: With ``percentile``: prune below this percentile of earlier trials.
        pruner_patience: Epochs a trial may stay below the bar before it is pruned (Optuna's
            PatientPruner); 0: pruned at the first.
        objective: combined, likeness, adherence or gain of the best cell (evaluation stage).
        direction: maximize or minimize.
        storage: null = a journal file in the study folder (one machine); a database URL
            (postgresql+psycopg://user@host/db) for workers on several machines.
        workers: Worker processes on this machine.
        root: Folder that holds the studies.
        reports: Folder the HTML report is written to (``<reports>/<name>/index.html``).
    """

    name: str = "sweep"
    grid: Dict[str, List[Any]] = field(default_factory=dict)
    variants: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    space: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    fixed: Dict[str, Any] = field(default_factory=dict)
    n_trials: Optional[int] = None
    sampler: str = "grid"
    pruner: str = "median"
    pruner_startup_trials: int = 2
    pruner_warmup_epochs: int = 0
    pruner_percentile: float = 25.0
    pruner_patience: int = 0
    objective: str = "combined"
    direction: str = "maximize"
    storage: Optional[str] = None
    workers: int = 1
    seed: int = 0
    root: str = "sweeps"
    reports: str = "reports"
    prune_eval: PruneEvalConfig = field(default_factory=PruneEvalConfig)

    def __post_init__(self) -> None:
        require(bool(self.name) and all(c.isalnum() or c in "-_." for c in self.name), "sweep.name",
                 f"must be a folder name of letters, digits, '-', '_' or '.', got {self.name!r}")
        choice(self.sampler, "sweep.sampler", SWEEP_SAMPLERS)
        choice(self.pruner, "sweep.pruner", PRUNERS)
        require(self.pruner_warmup_epochs >= 0 and self.pruner_patience >= 0, "sweep.pruner_warmup_epochs",
                 "warm-up epochs and patience must be >= 0")
        require(0 < self.pruner_percentile < 100, "sweep.pruner_percentile", "must be between 0 and 100")
        choice(self.objective, "sweep.objective", OBJECTIVES)
        choice(self.direction, "sweep.direction", ("maximize", "minimize"))
        require(self.workers >= 1, "sweep.workers", "must be >= 1")
        if self.sampler == "grid":
            require(bool(self.grid or self.variants), "sweep.grid",
                     "a grid sweep needs sweep.grid or sweep.variants")
            require(not self.space, "sweep.space", "is for sampler tpe or random, not grid")
        else:
            require(bool(self.n_trials), "sweep.n_trials", f"sampler {self.sampler} needs a trial count")
        for key in self.swept_keys() + list(self.fixed):
            require(not key.startswith(_NOT_SWEEPABLE), f"sweep key {key}",
                     "cannot vary within a study (the base model and device are loaded once per worker)")
        for key, values in self.grid.items():
            require(isinstance(values, list) and len(values) > 0, f"sweep.grid.{key}", "needs a list of values")
        for key, spec in self.space.items():
            kind = spec.get("type")
            require(kind in ("float", "int", "categorical"), f"sweep.space.{key}.type",
                     f"must be float, int or categorical, got {kind!r}")
            if kind == "categorical":
                require(bool(spec.get("choices")), f"sweep.space.{key}.choices", "needs a list")
            else:
                require("low" in spec and "high" in spec and spec["low"] < spec["high"],
                         f"sweep.space.{key}", "needs low < high")

    def swept_keys(self) -> List[str]:
        """The config paths a trial sets for itself (grid, space and variant keys), in order."""
        return list(dict.fromkeys([*self.grid, *self.space, *(k for v in self.variants.values() for k in v)]))

    def grid_size(self) -> int:
        n = max(1, len(self.variants))
        for values in self.grid.values():
            n *= len(values)
        return n
