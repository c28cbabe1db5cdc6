"""Scorer weights: FaceNet (with MTCNN) and CLIP models, from the libraries' own download when
online, a local safetensors file or a registered name; offline, randomly initialised (and
every output says so through :data:`RANDOM_NOTE`). The scoring maths is
:mod:`lora_lab.evaluate.scores`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from lora_lab import plugins
from lora_lab.config import ClipScorerConfig, FaceScorerConfig
from lora_lab.errors import ConfigError

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

    @property
    def logit_scale(self) -> float:
        """The model's own temperature for zero-shot classification (OpenAI CLIP: 100)."""
        scale = getattr(self.model, "logit_scale", None)
        return float(scale.detach().exp().clamp(max=100.0)) if scale is not None else 100.0

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu()
