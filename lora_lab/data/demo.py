"""The built-in demo data set: one real face, made offline.

Crops, flips and colour jitter of scikit-image's public-domain astronaut photo (Eileen
Collins, NASA), captioned in kohya's style, in a kohya folder ``<cache>/demo/10_sks woman/``.
Every crop keeps the whole face, so the face scorer has a real face to detect.
"""

from __future__ import annotations

import random
from pathlib import Path

DEMO_VERSION = "demo-v1"
DEMO_FOLDER = "10_sks woman"
NUM_IMAGES = 12
IMAGE_SIZE = 128
# MTCNN's box for the face in skimage.data.astronaut() (512 x 512): x0, y0, x1, y1.
_FACE = (181, 62, 268, 172)
_SCENES = (
    "white spacesuit",
    "american flag in background",
    "smiling",
    "short brown hair",
    "looking at viewer",
    "indoors",
)


def demo_folder(cache_dir: Path) -> Path:
    """The kohya parent folder of the demo set under ``cache_dir``, generated on first use."""
    from lora_lab.files import publish_dir

    return publish_dir(Path(cache_dir) / DEMO_VERSION, lambda tmp: _write(tmp / DEMO_FOLDER), DEMO_FOLDER)


def _write(folder: Path) -> None:
    from PIL import Image, ImageEnhance, ImageOps
    from skimage import data

    folder.mkdir(parents=True)
    photo = Image.fromarray(data.astronaut())
    rng = random.Random(0)
    x0, y0, x1, y1 = _FACE
    for i in range(NUM_IMAGES):
        side = rng.randint(150, 360)
        # Any square of this side that still contains the whole face box.
        left = rng.randint(max(0, x1 - side), min(x0, 512 - side))
        top = rng.randint(max(0, y1 - side), min(y0, 512 - side))
        im = photo.crop((left, top, left + side, top + side)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)
        tags = ["photo of sks woman"]
        if rng.random() < 0.5:
            im = ImageOps.mirror(im)
        im = ImageEnhance.Color(im).enhance(rng.uniform(0.7, 1.3))
        im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.85, 1.15))
        tags.append("close-up" if side < 220 else "upper body")
        tags += rng.sample(_SCENES, 2)
        im.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(", ".join(tags) + "\n", encoding="utf-8")
