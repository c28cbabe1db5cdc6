"""Images -> numbers: face likeness (MTCNN + FaceNet), CLIP adherence (CLIP-T), CLIP-I, diversity.

Conventions (../shared/reference.md): CLIP score = 100 * max(cos(image, text), 0), recorded
with the CLIP model's name; face likeness = cosine to the centroid of the reference faces, an
image without a detected face is a miss (NaN), never a zero averaged in. Weights that cannot be
had offline run randomly initialised and :attr:`Scorer.notes` says so in plain words.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from lora_lab.config import ClipScorerConfig, FaceScorerConfig, VqaScorerConfig
from lora_lab.images import open_rgb
from lora_lab.models.scorers import RANDOM_NOTE, ClipEmbedder, FaceEmbedder  # noqa: F401 (RANDOM_NOTE: importers' name)

log = logging.getLogger(__name__)


@dataclass
class References:
    """Embeddings of the training images (a scorer computes them once per set of files)."""

    names: List[str]
    clip: torch.Tensor  # (n, d)
    clip_centroid: torch.Tensor
    clip_ceiling: float  # mean cosine of the references to their centroid
    faces: Optional[torch.Tensor] = None  # (m, 512), detected faces only
    face_centroid: Optional[torch.Tensor] = None
    face_ceiling: float = float("nan")
    face_rate: float = float("nan")


def _centroid(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    c = F.normalize(x.mean(dim=0), dim=0)
    return c, float((x @ c).mean())


@dataclass
class Scorer:
    """All scorers for one evaluation (and reused across trials in one worker)."""

    kind: str
    face_cfg: FaceScorerConfig
    clip_cfg: ClipScorerConfig
    device: torch.device
    adherence: str = "clip"  # or "vqa": a question-answering model's P(yes) (eval.vqa)
    vqa_cfg: Optional[VqaScorerConfig] = None
    face: Optional[FaceEmbedder] = field(init=False, default=None)
    clip: ClipEmbedder = field(init=False)
    vqa: Optional[object] = field(init=False, default=None)
    _references: Dict[tuple, "References"] = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.clip = ClipEmbedder(self.clip_cfg, self.device)
        if self.kind == "person":
            self.face = FaceEmbedder(self.face_cfg, self.device)
        if self.adherence == "vqa":
            from lora_lab.models.vqa import YesNoScorer

            self.vqa = YesNoScorer(self.vqa_cfg or VqaScorerConfig(), self.device)

    @property
    def random_weights(self) -> bool:
        return self.clip.random or (self.face is not None and self.face.random)

    @property
    def notes(self) -> List[str]:
        out = [f"CLIP: {self.clip.source}"]
        if self.vqa is not None:
            out.append(f"adherence: question answering, P(yes) that the image shows the ask ({self.vqa.source})")
        else:
            out.append("adherence: CLIP zero-shot, the probability that an image shows the ask rather than its "
                       "'versus' (what the subject has instead); asks without a versus: CLIP similarity")
        if self.face is not None:
            out.append(f"FaceNet: {self.face.source}")
        if self.random_weights:
            out.append(RANDOM_NOTE)
        return out

    def references(self, paths: Sequence[Path]) -> References:
        """Embeddings of the training images, computed once per set of files (a worker's trials
        on one dataset share them; a changed file is embedded again)."""
        key = tuple((str(p), os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in paths)
        if key not in self._references:
            self._references[key] = self._embed_references(paths)
        return self._references[key]

    def _embed_references(self, paths: Sequence[Path]) -> References:
        images = [open_rgb(p) for p in paths]
        clip = self.clip.images(images)
        centroid, ceiling = _centroid(clip)
        ref = References([Path(p).name for p in paths], clip, centroid, ceiling)
        if self.face is not None:
            embs = self.face.embed(images)
            found = [e for e in embs if e is not None]
            ref.face_rate = len(found) / len(embs)
            if found:
                ref.faces = torch.stack(found)
                ref.face_centroid, ref.face_ceiling = _centroid(ref.faces)
        return ref

    def score(self, images: Sequence[Image.Image], judge_texts: Sequence[Optional[str]],
              ref: References, versus_texts: Optional[Sequence[Optional[str]]] = None) -> List[Dict[str, object]]:
        """Per image: face_detected, face_likeness, clip_i, clip_i_max (+ which reference),
        clip_adherence (vs its judge text; NaN for likeness prompts), ask_prob (with a
        ``versus`` text: the probability that the image shows the judge text rather than
        the versus text, CLIP zero-shot over the pair with the model's own logit scale;
        NaN without) and the image embedding."""
        versus_texts = list(versus_texts) if versus_texts is not None else [None] * len(images)
        emb = self.clip.images(images)
        texts = sorted({t for t in list(judge_texts) + versus_texts if t})
        text_emb = dict(zip(texts, self.clip.texts(texts))) if texts else {}
        scale = self.clip.logit_scale
        asked = [i for i, j in enumerate(judge_texts) if j]
        yes = dict(zip(asked, self.vqa.yes([images[i] for i in asked], [judge_texts[i] for i in asked]))) \
            if self.vqa is not None and asked else {}
        sims = emb @ ref.clip.T  # (n, refs)
        faces = self.face.embed(images) if self.face is not None else [None] * len(images)
        rows = []
        for i, judge in enumerate(judge_texts):
            best = int(sims[i].argmax())
            row = {
                "clip_i": float(emb[i] @ ref.clip_centroid),
                "clip_i_max": float(sims[i, best]),
                "closest_reference": ref.names[best],
                "clip_adherence": (100.0 * max(float(emb[i] @ text_emb[judge]), 0.0)) if judge else float("nan"),
                **_ask_fields(i, emb[i], judge, versus_texts[i], text_emb, scale, yes),
                "clip_model": self.clip.source,
                "embedding": emb[i],
            }
            if self.face is not None:
                f = faces[i]
                row["face_detected"] = f is not None
                row["face_likeness"] = (float(f @ ref.face_centroid)
                                        if f is not None and ref.face_centroid is not None else float("nan"))
            rows.append(row)
        return rows


def _ask_fields(i, image, judge, versus, text_emb, scale, yes) -> Dict[str, object]:
    """How an adaptability image's adherence is measured: a VQA model's P(yes), CLIP zero-shot
    against the versus text, or (no versus) only the CLIP score, ``ask_prob`` then NaN."""
    if i in yes:
        return {"ask_prob": yes[i], "ask_method": "vqa"}
    if judge and versus:
        return {"ask_prob": ask_probability(image, text_emb[judge], text_emb[versus], scale), "ask_method": "versus"}
    return {"ask_prob": float("nan"), "ask_method": "clip" if judge else None}


def ask_probability(image: torch.Tensor, ask: torch.Tensor, versus: torch.Tensor, logit_scale: float) -> float:
    """P(the image shows ``ask`` rather than ``versus``): a softmax over the two cosines at the
    model's logit scale, as CLIP's zero-shot classification. 0.5 means as much one as the
    other on any CLIP model, whatever its similarity scale."""
    logits = logit_scale * torch.stack([image @ ask, image @ versus])
    return float(torch.softmax(logits, dim=0)[0])


def diversity(embeddings: Sequence[torch.Tensor]) -> float:
    """1 - mean pairwise cosine of image embeddings across seeds (NaN with one image)."""
    if len(embeddings) < 2:
        return float("nan")
    x = torch.stack(list(embeddings))
    sims = x @ x.T
    n = len(embeddings)
    off = (sims.sum() - sims.diag().sum()) / (n * (n - 1))
    return float(1.0 - off)

