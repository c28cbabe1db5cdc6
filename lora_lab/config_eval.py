"""Schemas of the evaluation (scorers, judge, X/Y settings) and of sweeps; :mod:`lora_lab.config`
composes them into :class:`lora_lab.config.Config` and re-exports them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from lora_lab.config_checks import _choice, _positive, _require


SAMPLERS = (
    "Euler", "Euler a", "DDIM", "Heun", "LMS", "LMS Karras", "DPM2", "DPM2 Karras", "DPM2 a",
    "DPM2 a Karras", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE", "DPM++ 2M SDE Karras",
    "DPM++ SDE", "DPM++ SDE Karras", "UniPC",
)


@dataclass
class FaceScorerConfig:
    """FaceNet weights: ``vggface2`` / ``casia-webface`` (facenet-pytorch's own download, or its
    cached file), a local weights file, or null for random weights (scores not meaningful)."""

    pretrained: Optional[str] = "vggface2"


@dataclass
class ClipScorerConfig:
    """open_clip model name and weights: a pretrained tag (``openai``; downloaded when online),
    a local ``.safetensors`` / ``.pt`` checkpoint, or null for random weights."""

    model: str = "ViT-L-14"
    pretrained: Optional[str] = "openai"


@dataclass
class JudgeConfig:
    """Verdict thresholds (documented in README, "Verdicts").

    Attributes:
        underfit_gain: underfit when the likeness gain over the base model is below this
            fraction of the gap between the base model and the ceiling (references vs centroid).
        adherence_drop: overfit when an adaptability prompt's CLIP score falls more than this
            fraction below the base model's on the same prompt and seeds.
        copy_threshold: overfit when a generation's CLIP image similarity to one training
            image reaches this (a near copy) and is at least halfway from the base model's
            similarity to 1.
        diversity_drop: overfit when diversity across seeds falls more than this fraction
            below the base model's.
        likeness_weight / adherence_weight: the combined score that picks the best cell:
            likeness_weight * likeness gain + adherence_weight * adherence / base adherence.
    """

    underfit_gain: float = 0.3
    adherence_drop: float = 0.2
    copy_threshold: float = 0.95
    diversity_drop: float = 0.5
    likeness_weight: float = 1.0
    adherence_weight: float = 1.0

    def __post_init__(self) -> None:
        for key in ("underfit_gain", "adherence_drop", "diversity_drop"):
            value = getattr(self, key)
            _require(0 <= value <= 1, f"eval.judge.{key}", f"must be between 0 and 1, got {value!r}")
        _require(0 < self.copy_threshold <= 1, "eval.judge.copy_threshold", "must be in (0, 1]")


@dataclass
class EvalConfig:
    """Evaluation: X/Y grids over epochs x strengths, scores, verdicts.

    Attributes:
        suite: A prompt suite in the top-level ``eval/`` folder (person, object, style) or a
            path to a suite YAML file.
        strengths: LoRA strengths (Y axis); 0 is the base model, always rendered.
        sampler: A1111 sampler name (Euler a, DPM++ 2M Karras, DDIM, UniPC ...).
        steps / cfg_scale / seeds / size: identical for every cell; size null = model resolution.
        max_prompts: use only the first N prompts of each kind (a cheap evaluation).
        batch_size: images rendered per pipeline call (all strengths, prompts and seeds of an
            epoch share calls); null: chosen from free memory (RAM or GPU) and one image's
            measured cost, at most 32.
        output_dir: where grids and scores go; null = beside the LoRA folder.
        checkpoints: base checkpoints to evaluate the same X/Y on, one after the other (single
            files or diffusers folders of ``model``'s architecture); empty = ``model`` alone.
    """

    suite: str = "person"
    strengths: List[float] = field(default_factory=lambda: [0.0, 0.5, 0.75, 1.0])
    sampler: str = "Euler a"
    steps: int = 20
    cfg_scale: float = 7.0
    seeds: List[int] = field(default_factory=lambda: [1234, 5678])
    size: Optional[int] = None
    max_prompts: Optional[int] = None
    batch_size: Optional[int] = None
    output_dir: Optional[str] = None
    checkpoints: List[str] = field(default_factory=list)
    face: FaceScorerConfig = field(default_factory=FaceScorerConfig)
    clip: ClipScorerConfig = field(default_factory=ClipScorerConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)

    def __post_init__(self) -> None:
        _require(len(self.strengths) > 0, "eval.strengths", "needs at least one strength")
        for s in self.strengths:
            _require(
                isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s),
                "eval.strengths",
                f"every strength must be a number, got {s!r}",
            )
        _choice(self.sampler, "eval.sampler", SAMPLERS)
        _require(isinstance(self.steps, int) and self.steps >= 1, "eval.steps", "must be a whole number >= 1")
        _require(len(self.seeds) > 0, "eval.seeds", "needs at least one seed")
        _positive(self.cfg_scale, "eval.cfg_scale", allow_zero=True)
        if self.size is not None:
            _require(self.size >= 8 and self.size % 8 == 0, "eval.size", f"must be a multiple of 8, got {self.size}")
        if self.max_prompts is not None:
            _require(self.max_prompts >= 1, "eval.max_prompts", "must be >= 1")
        _require(self.batch_size is None or (isinstance(self.batch_size, int) and self.batch_size >= 1),
                 "eval.batch_size", f"must be a whole number >= 1, or null to choose from free memory; got "
                 f"{self.batch_size!r}")


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
        _require(bool(self.name) and all(c.isalnum() or c in "-_." for c in self.name), "sweep.name",
                 f"must be a folder name of letters, digits, '-', '_' or '.', got {self.name!r}")
        _choice(self.sampler, "sweep.sampler", SWEEP_SAMPLERS)
        _choice(self.pruner, "sweep.pruner", PRUNERS)
        _require(self.pruner_warmup_epochs >= 0 and self.pruner_patience >= 0, "sweep.pruner_warmup_epochs",
                 "warm-up epochs and patience must be >= 0")
        _require(0 < self.pruner_percentile < 100, "sweep.pruner_percentile", "must be between 0 and 100")
        _choice(self.objective, "sweep.objective", OBJECTIVES)
        _choice(self.direction, "sweep.direction", ("maximize", "minimize"))
        _require(self.workers >= 1, "sweep.workers", "must be >= 1")
        if self.sampler == "grid":
            _require(bool(self.grid or self.variants), "sweep.grid",
                     "a grid sweep needs sweep.grid or sweep.variants")
            _require(not self.space, "sweep.space", "is for sampler tpe or random, not grid")
        else:
            _require(bool(self.n_trials), "sweep.n_trials", f"sampler {self.sampler} needs a trial count")
        for key in list(self.grid) + list(self.space) + list(self.fixed) + \
                [k for v in self.variants.values() for k in v]:
            _require(not key.startswith(_NOT_SWEEPABLE), f"sweep key {key}",
                     "cannot vary within a study (the base model and device are loaded once per worker)")
        for key, values in self.grid.items():
            _require(isinstance(values, list) and len(values) > 0, f"sweep.grid.{key}", "needs a list of values")
        for key, spec in self.space.items():
            kind = spec.get("type")
            _require(kind in ("float", "int", "categorical"), f"sweep.space.{key}.type",
                     f"must be float, int or categorical, got {kind!r}")
            if kind == "categorical":
                _require(bool(spec.get("choices")), f"sweep.space.{key}.choices", "needs a list")
            else:
                _require("low" in spec and "high" in spec and spec["low"] < spec["high"],
                         f"sweep.space.{key}", "needs low < high")

    def grid_size(self) -> int:
        n = max(1, len(self.variants))
        for values in self.grid.values():
            n *= len(values)
        return n
