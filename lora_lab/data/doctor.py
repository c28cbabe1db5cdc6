"""The dataset doctor: what is wrong with a training set, file by file, before hours of training.

``python -m lora_lab.doctor PATH [--token sks] [--resolution 512]`` (and automatically before
every training run and sweep, and on the report's front page). Findings:

* an image below the training size (it will be upscaled, and look soft);
* a blurry image (variance of the Laplacian at 256 px on the short side below :data:`BLUR_LIMIT`);
* for a person: no face, more than one face, a head filling less than half of the picture
  (estimated as twice MTCNN's brow-to-chin box), and a face far from the others (leave-one-out
  distance to the others' centroid);
* exact copies (the same bytes under another name: training shows both) and near-duplicates
  (a 64-bit difference hash within :data:`DUPLICATE_BITS` bits);
* captions without the trigger token, identical captions, captions past CLIP's 75 tokens
  (the rest is cut off in training).

Warnings never block: only what makes training impossible (an unreadable image, an empty
folder) stops a run, and that is :func:`lora_lab.data.load_dataset`'s job.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from lora_lab.data.buckets import BucketSpec, place
from lora_lab.images import open_rgb

log = logging.getLogger(__name__)

BLUR_LIMIT = 100.0  # variance of the Laplacian (0-255 grey), at most 256 px on the short side
DUPLICATE_BITS = 6  # of 64 in the difference hash
FACE_SHARE = 0.5  # the guides ask for a face (the head) filling at least half the picture
HEAD_PER_BOX = 2.0  # MTCNN's box runs brow to chin; the head with hair is about twice its area
FACE_PROB = 0.9  # MTCNN's confidence for a face to count
OUTLIER_Z = 2.5  # leave-one-out similarity this many standard deviations below the others'
MAX_TOKENS = 75  # CLIP's context (77) less the start and end tokens
DETECT_SIDE = 384  # images are shrunk to this long side for face detection (a training face is big)


@dataclass
class Finding:
    file: str  # the image (or "" for the whole set)
    kind: str
    message: str


@dataclass
class DoctorReport:
    images: int
    findings: List[Finding] = field(default_factory=list)
    summary: str = ""
    counts: str = ""  # the summary without the step count
    notes: List[str] = field(default_factory=list)
    seconds: float = 0.0

    def lines(self) -> List[str]:
        out = [f"dataset doctor: {self.summary}"]
        by_file: Dict[str, List[Finding]] = defaultdict(list)
        for f in self.findings:
            by_file[f.file].append(f)
        for file, found in by_file.items():
            out.append(f"  {file or 'the set'}:")
            out += [f"    - {f.message}" for f in found]
        out += [f"  note: {n}" for n in self.notes]
        return out

    def to_json(self) -> dict:
        return {"images": self.images, "summary": self.summary, "notes": self.notes, "seconds": self.seconds,
                "findings": [asdict(f) for f in self.findings]}


def sharpness(image: Image.Image) -> float:
    """Variance of the 4-neighbour Laplacian of the grey image, shrunk to 256 px on its short
    side when larger (never enlarged: that would blur it)."""
    grey = image.convert("L")
    scale = min(1.0, 256 / min(grey.size))
    if scale < 1:
        grey = grey.resize((max(1, round(grey.width * scale)), max(1, round(grey.height * scale))),
                           Image.Resampling.BILINEAR)
    a = np.asarray(grey, dtype=np.float32)
    lap = a[1:-1, :-2] + a[1:-1, 2:] + a[:-2, 1:-1] + a[2:, 1:-1] - 4 * a[1:-1, 1:-1]
    return float(lap.var())


def dhash(image: Image.Image) -> int:
    """64-bit difference hash: is each pixel of a 9x8 grey thumbnail brighter than its right neighbour."""
    a = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (a[:, 1:] > a[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def near_duplicates(hashes: Sequence[int], limit: int = DUPLICATE_BITS) -> List[tuple]:
    """Index pairs whose hashes differ in at most ``limit`` bits."""
    return [(i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes))
            if bin(hashes[i] ^ hashes[j]).count("1") <= limit]


def identity_outliers(embeddings: Dict[str, "np.ndarray"], z: float = OUTLIER_Z) -> Dict[str, float]:
    """{file: similarity} for faces far from the others: each face's cosine to the centroid of
    all the other faces (leave-one-out), flagged when it lies ``z`` standard deviations below
    the mean of the rest's. Needs four faces."""
    names = list(embeddings)
    if len(names) < 4:
        return {}
    e = np.stack([embeddings[n] / np.linalg.norm(embeddings[n]) for n in names])
    total = e.sum(axis=0)
    sims = np.array([float(e[i] @ ((total - e[i]) / np.linalg.norm(total - e[i]))) for i in range(len(names))])
    out = {}
    for i, name in enumerate(names):
        rest = np.delete(sims, i)
        spread = max(float(rest.std()), 0.02)
        if sims[i] < rest.mean() - z * spread:
            out[name] = float(sims[i])
    return out


@lru_cache(maxsize=1)
def _clip_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def _token_count(text: str) -> int:
    return len(_clip_tokenizer().encode(text))


def _has_token(caption: str, token: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(token.lower())}(?!\w)", caption.lower()) is not None


class _Faces:
    """MTCNN finds faces (weights ship with facenet-pytorch); FaceNet embeds the single face of
    each image from the same detection, in batches at the end (no second detection)."""

    def __init__(self, face_cfg):
        import torch
        from facenet_pytorch import MTCNN

        from lora_lab.models.scorers import FaceEmbedder

        self.embedder = FaceEmbedder(face_cfg, torch.device("cpu"))
        self.detector = MTCNN(keep_all=True, image_size=160, margin=14, device=torch.device("cpu"))
        self.crops: Dict[str, "object"] = {}

    def find(self, name: str, image: Image.Image):
        """The faces' boxes in ``image``'s pixels; a single face is kept for :meth:`embeddings`."""
        scale = min(1.0, DETECT_SIDE / max(image.size))
        small = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale)))) \
            if scale < 1 else image
        boxes, probs = self.detector.detect(small)
        if boxes is None:
            return []
        kept = np.array([b for b, p in zip(boxes, probs) if p is not None and p >= FACE_PROB])
        if len(kept) == 1 and not self.embedder.random:
            self.crops[name] = self.detector.extract(small, kept, None)[0]
        return [b / scale for b in kept]

    def embeddings(self, batch: int = 16) -> Dict[str, "np.ndarray"]:
        import torch

        names = list(self.crops)
        out: Dict[str, np.ndarray] = {}
        with torch.no_grad():
            for i in range(0, len(names), batch):
                chunk = names[i : i + batch]
                emb = torch.nn.functional.normalize(self.embedder.model(torch.stack([self.crops[n] for n in chunk])), dim=-1)
                out.update(zip(chunk, emb.numpy()))
        return out


def examine(samples, *, resolution: int, token: Optional[str], person: bool, face_cfg=None,
            buckets: Optional[BucketSpec] = None, steps_line: str = "", faces=None) -> DoctorReport:
    """Every finding about ``samples`` (lora_lab.data.Sample; regularization images are
    checked for readability only)."""
    started = time.perf_counter()
    spec = buckets or BucketSpec(resolution)
    # One entry per file, as training counts them: a byte-identical copy is an image of its own
    # (kohya trains both), reported below as a copy.
    train = list({s.path: s for s in samples if not s.is_reg}.values())
    report = DoctorReport(images=len(train))
    add = report.findings.append
    if person and faces is None:
        faces = _Faces(face_cfg)
        if faces.embedder.random:
            report.notes.append(f"identity check skipped: FaceNet weights are {faces.embedder.source}; "
                                "set eval.face.pretrained")
    hashes = []
    for s in train:
        name = str(s.path)
        image = open_rgb(s.path)
        w, h = image.size
        p = place((w, h), spec)
        factor = p.resized[0] / w
        if factor > 1.01:
            add(Finding(name, "small", f"{w}x{h} is below the training size: upscaled x{factor:.2f} to "
                                       f"{p.resized[0]}x{p.resized[1]} (it will look soft)"))
        sharp = sharpness(image)
        if sharp < BLUR_LIMIT:
            add(Finding(name, "blurry", f"blurry (sharpness {sharp:.0f}, below {BLUR_LIMIT:.0f})"))
        hashes.append(dhash(image))
        if faces is not None:
            boxes = faces.find(name, image)
            if not boxes:
                add(Finding(name, "no_face", "no face found"))
            elif len(boxes) > 1:
                add(Finding(name, "faces", f"{len(boxes)} faces: the LoRA learns whoever is in it"))
            if boxes:
                x0, y0, x1, y1 = max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
                box = max(0.0, min(x1, w) - max(x0, 0)) * max(0.0, min(y1, h) - max(y0, 0)) / (w * h)
                share = min(1.0, HEAD_PER_BOX * box)
                if share < FACE_SHARE:
                    add(Finding(name, "small_face", f"the head fills about {share:.0%} of the picture (guides "
                                                    f"ask for at least {FACE_SHARE:.0%}): crop closer"))
        caption = s.caption
        if token and not _has_token(caption, token):
            add(Finding(name, "no_token", f"caption lacks the trigger token {token!r}: \"{caption[:80]}\""))
        n_tokens = _token_count(caption)
        if n_tokens > MAX_TOKENS:
            add(Finding(name, "long_caption", f"caption has {n_tokens} tokens; past {MAX_TOKENS} it is cut off"))
    first_of: Dict[str, int] = {}
    for j, s in enumerate(train):
        i = first_of.setdefault(s.id, j)
        if i != j:
            add(Finding(str(s.path), "copy", f"{s.path.name} is the same image as {train[i].path.name} "
                                             "(an exact copy: training shows it twice as often)"))
    for i, j in near_duplicates(hashes):
        if train[i].id != train[j].id:
            add(Finding(str(train[j].path), "duplicate", f"near-duplicate of {train[i].path.name}"))
    # Random FaceNet weights (offline, no weights file) would flag faces by chance: no check then.
    meaningful = faces is not None and not faces.embedder.random
    for name, sim in identity_outliers(faces.embeddings() if meaningful else {}).items():
        add(Finding(name, "outlier", f"face far from the others (similarity {sim:.2f} to their centroid): "
                                     "someone else, or an unusual angle?"))
    same = defaultdict(list)
    for s in train:
        same[s.caption].append(s.path.name)
    for caption, files in same.items():
        if len(files) > 1 and caption:
            add(Finding("", "same_caption", f"{len(files)} images share the caption \"{caption[:60]}\" "
                                            f"({', '.join(files[:4])}{' ...' if len(files) > 4 else ''})"))
    counts = defaultdict(int)
    for f in report.findings:
        counts[f.kind] += 1
    flagged = len({f.file for f in report.findings if f.file})
    words = ", ".join(f"{n} {_KIND_WORDS[k]}" for k, n in counts.items())
    report.counts = f"{len(train)} images, {flagged} with findings" + (f" ({words})" if words else ": none")
    report.summary = report.counts + (f"; {steps_line}" if steps_line else "")
    report.seconds = time.perf_counter() - started
    return report


_KIND_WORDS = {"small": "below the training size", "blurry": "blurry", "no_face": "without a face",
               "faces": "with several faces", "small_face": "with a small face", "copy": "exact copies",
               "duplicate": "near-duplicates",
               "outlier": "identity outliers", "no_token": "captions without the token",
               "same_caption": "groups of identical captions", "long_caption": "captions past 75 tokens"}


def for_run(config, dataset) -> DoctorReport:
    """The doctor on a run's dataset, with its resolution, buckets, token and step count."""
    from lora_lab.data.steps import steps_line

    person = suite_kind(config, dataset) == "person"
    return examine(dataset.samples, resolution=config.resolution, token=dataset.token, person=person,
                   face_cfg=config.eval.face, buckets=BucketSpec.from_config(config.data, config.resolution),
                   steps_line=steps_line(dataset, config))


def suite_kind(config, dataset) -> str:
    from lora_lab.data.suites import load_suite

    try:
        return load_suite(config.eval.suite, dataset.token or "", dataset.suite).kind
    except Exception:  # a suite problem is the evaluation's to report
        return "person"


def _overrides(path: str, given: List[str]) -> List[str]:
    """The config the doctor judges by: SD 1.5's (512 px) with the default training settings and
    the person suite, unless the command line says otherwise; no model is loaded, so none needs
    a file."""
    keys = {item.split("=", 1)[0].lstrip("+~") for item in given}
    quoted = path.replace("\\", "\\\\").replace("'", "\\'")  # Hydra's quoting: any file name
    out = ["model=sd15", "eval=default", "data=folder", f"data.path='{quoted}'"]
    if "model.pretrained" not in keys:
        out.append("model.pretrained=not-loaded")
    return out + list(given)


def main(argv: Optional[List[str]] = None) -> int:
    from lora_lab.cli import compose, setup_logging
    from lora_lab.errors import LoraLabError

    parser = argparse.ArgumentParser(prog="python -m lora_lab.doctor",
                                     description="Check a training set before training on it.")
    parser.add_argument("path", help="a kohya parent folder, a folder with metadata.jsonl, or a dataset_config.toml")
    parser.add_argument("overrides", nargs="*", help="config overrides, as for lora_lab.train: model=sdxl (its "
                        "resolution; default sd15's 512 px), data.token=sks, train.epochs=10, train.batch_size=2, "
                        "eval.suite=style or object (no face checks; default person)")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    args = parser.parse_intermixed_args(argv)
    setup_logging()
    if "=" in args.path and not Path(args.path).exists():
        print(f"error: {args.path!r} looks like a setting; give the data folder (or dataset_config.toml) first: "
              "python -m lora_lab.doctor PATH [key=value ...]", file=sys.stderr)
        return 2
    try:
        from lora_lab.data.dataset import load_dataset
        from lora_lab.data.kohya_toml import apply

        config = apply(compose(_overrides(args.path, args.overrides)))
        dataset = load_dataset(config.data, Path(config.cache_dir), config.explicit)
        report = for_run(config, dataset)
    except LoraLabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print("\n".join(report.lines()))
        print(f"({report.images} images checked in {report.seconds:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
