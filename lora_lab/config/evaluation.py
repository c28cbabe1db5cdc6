"""Schemas of the evaluation: scorers, judge and X/Y settings; :mod:`lora_lab.config` composes
them into :class:`lora_lab.config.Config` and re-exports them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

from lora_lab.config.checks import choice, positive, require

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


ADHERENCE = ("clip", "vqa")


@dataclass
class VqaScorerConfig:
    """A transformers image-text-to-text model that answers, for each adaptability image,
    ``question`` with the ask's judge text filled in; adherence is its probability of "yes"
    (VQAScore, Lin et al. 2024). ``model``: a local folder or a hub id (safetensors weights
    only); ``batch_size``: images per forward pass."""

    model: Optional[str] = None
    question: str = "Does this image show {judge}? Answer yes or no."
    batch_size: int = 8

    def __post_init__(self) -> None:
        require("{judge}" in self.question, "eval.vqa.question", "must contain {judge} (the ask's judge text)")
        require(isinstance(self.batch_size, int) and self.batch_size >= 1, "eval.vqa.batch_size",
                "must be a whole number >= 1")


@dataclass
class JudgeConfig:
    """Verdict thresholds (documented in README, "Verdicts").

    Attributes:
        underfit_gain: underfit when the likeness gain over the base model is below this
            fraction of the gap between the base model and the ceiling (references vs centroid).
        adherence_drop: overfit when an ask's CLIP score falls more than this fraction below
            the base model's on the same prompt and seeds.
        ask_drop: overfit when an ask with a ``versus`` (or scored by ``eval.adherence=vqa``) is
            lost: its images are less than ``1 - ask_drop`` times as likely as the base model's
            to show the ask rather than the subject's own (a probability, so the cut-off means
            the same on any scorer; 0.5: "fewer than half as likely"); 1 turns it off.
        copy_threshold: overfit when a generation's CLIP image similarity to one training
            image reaches this (a near copy) and is at least halfway from the base model's
            similarity to 1.
        diversity_drop: overfit when diversity across seeds falls more than this fraction
            below the base model's.
        likeness_weight / adherence_weight: the combined score that picks the best cell:
            likeness_weight * likeness gain + adherence_weight * adherence / base adherence
            (per ask: its probability over the base model's where the suite gives a ``versus``
            or VQA scored it, else its CLIP score over the base model's; then the mean).
        pick_noise: the best cell is the gentlest (lowest strength, then earliest epoch) of
            the cells whose combined score is within this many standard errors of the
            likeness (across seeds and prompts) of the highest; 0 picks the highest.
        likeness_prompt_gain: a likeness prompt counts towards likeness only when at least one
            cell brings its images this far from the base model's towards the training images
            (a share of the gap, as ``underfit_gain``): a prompt in which no cell looks more
            like the training images than the base model does (it replaces the one room they
            all share, say) says nothing of how much was learnt. Where every prompt falls
            short, all count. 0 keeps every prompt.
    """

    underfit_gain: float = 0.3
    adherence_drop: float = 0.2
    ask_drop: float = 0.5
    pick_noise: float = 0.0
    copy_threshold: float = 0.95
    diversity_drop: float = 0.5
    likeness_weight: float = 1.0
    adherence_weight: float = 1.0
    likeness_prompt_gain: float = 0.2

    def __post_init__(self) -> None:
        positive(self.pick_noise, "eval.judge.pick_noise", allow_zero=True)
        for key in ("underfit_gain", "adherence_drop", "ask_drop", "diversity_drop", "likeness_prompt_gain"):
            value = getattr(self, key)
            require(0 <= value <= 1, f"eval.judge.{key}", f"must be between 0 and 1, got {value!r}")
        require(0 < self.copy_threshold <= 1, "eval.judge.copy_threshold", "must be in (0, 1]")


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
        adherence: ``clip`` (CLIP zero-shot: the ask against the suite's ``versus``, or CLIP
            similarity where a prompt has none) or ``vqa`` (a question-answering model's
            P(yes) that the image shows the ask, ``eval.vqa``; for real models).
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
    adherence: str = "clip"
    vqa: VqaScorerConfig = field(default_factory=VqaScorerConfig)

    def __post_init__(self) -> None:
        require(len(self.strengths) > 0, "eval.strengths", "needs at least one strength")
        for s in self.strengths:
            require(
                isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s),
                "eval.strengths",
                f"every strength must be a number, got {s!r}",
            )
        choice(self.sampler, "eval.sampler", SAMPLERS)
        require(isinstance(self.steps, int) and self.steps >= 1, "eval.steps", "must be a whole number >= 1")
        require(len(self.seeds) > 0, "eval.seeds", "needs at least one seed")
        positive(self.cfg_scale, "eval.cfg_scale", allow_zero=True)
        if self.size is not None:
            require(self.size >= 8 and self.size % 8 == 0, "eval.size", f"must be a multiple of 8, got {self.size}")
        if self.max_prompts is not None:
            require(self.max_prompts >= 1, "eval.max_prompts", "must be >= 1")
        choice(self.adherence, "eval.adherence", ADHERENCE)
        if self.adherence == "vqa":
            require(bool(self.vqa.model), "eval.vqa.model",
                    "eval.adherence=vqa needs a question-answering model: a local folder or a hub id of a "
                    "transformers image-text-to-text model (safetensors weights)")
        require(self.batch_size is None or (isinstance(self.batch_size, int) and self.batch_size >= 1),
                 "eval.batch_size", f"must be a whole number >= 1, or null to choose from free memory; got "
                 f"{self.batch_size!r}")
