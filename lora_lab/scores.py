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

from lora_lab import plugins
from lora_lab.config import ClipScorerConfig, FaceScorerConfig
from lora_lab.errors import ConfigError
from lora_lab.images import open_rgb

log = logging.getLogger(__name__)

RANDOM_NOTE = "scores not meaningful: random scorer weights"
_CLIP_CONFIGS = Path(__file__).resolve().parent / "clip_configs"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or \
        os.environ.get("LORA_LAB_OFFLINE", "0") not in ("0", "", "false")


class FaceEmbedder:
    """MTCNN (weights shipped in facenet-pytorch) + InceptionResnetV1 (512-d, L2-normalised)."""

    def __init__(self, cfg: FaceScorerConfig, device: torch.device):
        from facenet_pytorch import MTCNN, InceptionResnetV1

        self.device = device
        self.mtcnn = MTCNN(image_size=160, margin=14, keep_all=False, post_process=True, device=device)
        self.model = InceptionResnetV1(pretrained=None, classify=False).eval().to(device)
        self.random, self.source = self._load_weights(cfg.pretrained)

    def _load_weights(self, pretrained: Optional[str]):
        if not pretrained:
            return True, "random (face.pretrained is null)"
        urls = {"vggface2": "20180402-114759-vggface2.pt", "casia-webface": "20180408-102900-casia-webface.pt"}
        if pretrained in urls:
            from facenet_pytorch.models.inception_resnet_v1 import get_torch_home

            path = Path(get_torch_home()) / "checkpoints" / urls[pretrained]
            if not path.exists():
                if _offline():
                    return True, f"random ({pretrained} weights are not cached and this machine is offline)"
                try:
                    from facenet_pytorch.models.inception_resnet_v1 import load_weights

                    load_weights(self.model, pretrained)
                except Exception as exc:  # no network, blocked host ...
                    return True, f"random ({pretrained} weights could not be downloaded: {exc.__class__.__name__})"
                return False, pretrained
        else:
            path = Path(pretrained).expanduser()
            if not path.exists():
                raise ConfigError(f"eval.face.pretrained: {path} does not exist; allowed: vggface2, casia-webface, "
                                  "a local weights file, or null")
        self.model.load_state_dict(_safe_state_dict(path), strict=False)
        return False, str(pretrained)

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image]) -> List[Optional[torch.Tensor]]:
        """One 512-d unit vector per image, or None where no face was detected."""
        out: List[Optional[torch.Tensor]] = []
        for im in images:
            face = self.mtcnn(im.convert("RGB"))
            if face is None:
                out.append(None)
                continue
            emb = self.model(face.unsqueeze(0).to(self.device))[0]
            out.append(F.normalize(emb.float().cpu(), dim=0))
        return out


def _safe_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _registered_clip(cfg: ClipScorerConfig) -> Optional[Path]:
    """Weights a package registers under a tag (lora_lab.plugins), e.g. ``toyworld`` for the
    toy world's ``lora-lab-toyworld-clip``: a local file like any other."""
    if cfg.pretrained not in plugins.names("clip"):
        return None
    return Path(plugins.provider("clip", cfg.pretrained)(cfg.model))


class ClipEmbedder:
    """open_clip image and text towers; unit-norm embeddings."""

    def __init__(self, cfg: ClipScorerConfig, device: torch.device):
        import open_clip

        if (_CLIP_CONFIGS / f"{cfg.model}.json").exists():
            open_clip.add_model_config(_CLIP_CONFIGS)
        if cfg.model not in open_clip.list_models():
            raise ConfigError(f"eval.clip.model: unknown open_clip model {cfg.model!r} (see open_clip.list_models())")
        self.device = device
        self.name = cfg.model
        self.random, pretrained = True, None
        shipped = _registered_clip(cfg)
        if shipped:
            pretrained = str(shipped)
        elif cfg.pretrained:
            local = Path(cfg.pretrained).expanduser()
            if local.suffix in (".safetensors", ".pt", ".pth", ".bin"):
                if not local.exists():
                    raise ConfigError(f"eval.clip.pretrained: {local} does not exist")
                pretrained = str(local)
            elif not _offline():
                pretrained = cfg.pretrained
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(cfg.model, pretrained=pretrained)
            self.random = pretrained is None
        except Exception as exc:  # download failed: fall back to random weights, and say so
            if pretrained and Path(pretrained).exists():
                raise ConfigError(f"eval.clip.pretrained: cannot load {pretrained}: {exc}") from None
            model, _, preprocess = open_clip.create_model_and_transforms(cfg.model, pretrained=None)
        self.source = f"{cfg.model}/{cfg.pretrained}" if not self.random else f"{cfg.model}/random"
        self.model = model.eval().to(device)
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(cfg.model)

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        batch = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
        return F.normalize(self.model.encode_image(batch).float(), dim=-1).cpu()

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu()


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
    face: Optional[FaceEmbedder] = field(init=False, default=None)
    clip: ClipEmbedder = field(init=False)
    _references: Dict[tuple, "References"] = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.clip = ClipEmbedder(self.clip_cfg, self.device)
        if self.kind == "person":
            self.face = FaceEmbedder(self.face_cfg, self.device)

    @property
    def random_weights(self) -> bool:
        return self.clip.random or (self.face is not None and self.face.random)

    @property
    def notes(self) -> List[str]:
        out = [f"CLIP: {self.clip.source}"]
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
              ref: References) -> List[Dict[str, object]]:
        """Per image: face_detected, face_likeness, clip_i, clip_i_max (+ which reference),
        clip_adherence (vs its judge text; NaN for likeness prompts) and the image embedding."""
        emb = self.clip.images(images)
        texts = sorted({t for t in judge_texts if t})
        text_emb = dict(zip(texts, self.clip.texts(texts))) if texts else {}
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


def diversity(embeddings: Sequence[torch.Tensor]) -> float:
    """1 - mean pairwise cosine of image embeddings across seeds (NaN with one image)."""
    if len(embeddings) < 2:
        return float("nan")
    x = torch.stack(list(embeddings))
    sims = x @ x.T
    n = len(embeddings)
    off = (sims.sum() - sims.diag().sum()) / (n * (n - 1))
    return float(1.0 - off)

