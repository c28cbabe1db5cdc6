"""A procedural world of small drawn characters, each with its attribute record and a caption.

Every image is drawn with Pillow from an :class:`Attributes` record, so the truth about it is
known exactly: hair colour and style, eye colour, skin tone, face shape, a cheek mark,
accessories, background and pose. The subject ``sks`` is one identity whose combination
(purple spiky hair, green eyes, a star on the cheek) never appears in the pretraining
distribution that :func:`sample` draws from.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, replace
from typing import Dict, Tuple

from PIL import Image, ImageDraw

HAIR_COLOURS: Dict[str, Tuple[int, int, int]] = {
    "black": (25, 25, 25), "brown": (110, 65, 30), "blonde": (235, 205, 110), "red": (200, 40, 30),
    "white": (240, 240, 240), "blue": (40, 80, 220), "green": (40, 170, 60), "purple": (140, 50, 190),
}
EYE_COLOURS: Dict[str, Tuple[int, int, int]] = {
    "brown": (100, 60, 20), "blue": (30, 110, 230), "green": (30, 170, 50), "gray": (130, 130, 140),
}
SKIN_TONES: Dict[str, Tuple[int, int, int]] = {
    "pale": (250, 225, 205), "light": (235, 195, 160), "tan": (200, 150, 105), "brown": (150, 100, 65),
    "dark": (95, 60, 40),
}
BACKGROUNDS: Dict[str, Tuple[int, int, int]] = {
    "white": (245, 245, 245), "gray": (150, 150, 150), "yellow": (240, 220, 60), "orange": (240, 140, 40),
    "pink": (240, 150, 190), "cyan": (60, 200, 220), "navy": (30, 40, 100), "olive": (120, 130, 40),
}
HAIR_STYLES = ("short", "long", "spiky", "bun")
FACE_SHAPES = ("round", "oval", "square")
MARKS = ("none", "star", "mole")
PATTERNS = ("plain", "stripes", "dots")


@dataclass(frozen=True)
class Attributes:
    """The ground truth of one drawing."""

    hair_colour: str
    hair_style: str
    eye_colour: str
    skin: str
    face: str
    mark: str
    glasses: bool
    hat: bool
    earrings: bool
    background: str
    pattern: str
    dx: int = 0
    dy: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


SUBJECT = Attributes(hair_colour="purple", hair_style="spiky", eye_colour="green", skin="light", face="oval",
                     mark="star", glasses=False, hat=False, earrings=False, background="white", pattern="plain")


def is_subject_identity(a: Attributes) -> bool:
    """The first subject's identity (``subjects/sks.yaml``): purple spiky hair, green eyes and a
    star on the cheek; the pretraining world never draws it."""
    return (a.hair_colour, a.hair_style, a.eye_colour, a.mark) == ("purple", "spiky", "green", "star")


def sample(rng: random.Random) -> Attributes:
    """A random character of the pretraining world (never the subject's identity)."""
    while True:
        a = Attributes(
            hair_colour=rng.choice(list(HAIR_COLOURS)), hair_style=rng.choice(HAIR_STYLES),
            eye_colour=rng.choice(list(EYE_COLOURS)), skin=rng.choice(list(SKIN_TONES)),
            face=rng.choice(FACE_SHAPES), mark=rng.choice(MARKS), glasses=rng.random() < 0.3,
            hat=rng.random() < 0.2, earrings=rng.random() < 0.25, background=rng.choice(list(BACKGROUNDS)),
            pattern=rng.choice(PATTERNS), dx=rng.randint(-3, 3), dy=rng.randint(-2, 2),
        )
        if not is_subject_identity(a):
            return a


def caption(a: Attributes, token: str = "") -> str:
    """Our users' caption style. With a token (the subject), the identity is left to the token,
    as kohya captions do: only what changes between images is described."""
    wearing = [w for w, on in (("glasses", a.glasses), ("a hat", a.hat), ("earrings", a.earrings)) if on]
    background = f"on a {a.background} background" + ("" if a.pattern == "plain" else f" with {a.pattern}")
    if token:
        parts = [f"photo of {token}"]
    else:
        parts = [f"photo of a person with {a.hair_colour} {a.hair_style} hair and {a.eye_colour} eyes"]
        if a.mark != "none":
            parts.append(f"a {a.mark} on the cheek")
    if wearing:
        parts.append("wearing " + " and ".join(wearing))
    parts.append(background)
    return ", ".join(parts)


def draw(a: Attributes, size: int = 64) -> Image.Image:
    """Draw a character at 4x and downsample (smooth edges); deterministic for a record."""
    s = 4 * size
    k = s / 64  # drawing units: a 64 x 64 canvas
    im = Image.new("RGB", (s, s), BACKGROUNDS[a.background])
    d = ImageDraw.Draw(im)

    def box(x0, y0, x1, y1):
        return [(x0 + a.dx) * k, (y0 + a.dy) * k, (x1 + a.dx) * k, (y1 + a.dy) * k]

    shade = tuple(max(0, c - 40) for c in BACKGROUNDS[a.background])
    if a.pattern == "stripes":
        for x in range(0, 64, 8):
            d.rectangle([x * k, 0, (x + 3) * k, s], fill=shade)
    elif a.pattern == "dots":
        for x in range(4, 64, 12):
            for y in range(4, 64, 12):
                d.ellipse([(x - 2) * k, (y - 2) * k, (x + 2) * k, (y + 2) * k], fill=shade)
    hair, skin = HAIR_COLOURS[a.hair_colour], SKIN_TONES[a.skin]
    d.rectangle(box(24, 48, 40, 64), fill=skin)  # neck
    d.rectangle(box(12, 54, 52, 64), fill=(70, 70, 90))  # shoulders
    if a.hair_style == "long":
        d.rectangle(box(14, 16, 50, 52), fill=hair)
    face = box(18, 14, 46, 48)
    if a.face == "round":
        d.ellipse(face, fill=skin)
    elif a.face == "oval":
        d.ellipse(box(20, 12, 44, 50), fill=skin)
    else:
        d.rounded_rectangle(face, radius=4 * k, fill=skin)
    if a.hair_style == "spiky":
        for x in range(16, 48, 6):
            d.polygon([((x + a.dx) * k, (20 + a.dy) * k), ((x + 3 + a.dx) * k, (4 + a.dy) * k),
                       ((x + 6 + a.dx) * k, (20 + a.dy) * k)], fill=hair)
        d.rectangle(box(17, 14, 47, 21), fill=hair)
    else:
        d.chord(box(16, 8, 48, 34), 180, 360, fill=hair)
    bun = box(26, 1, 38, 12)
    if a.hair_style == "bun" and not a.hat:
        d.ellipse(bun, fill=hair)
    eye = EYE_COLOURS[a.eye_colour]
    for x in (23, 34):  # eyes and marks are drawn large enough to survive 32 px and the VAE
        d.ellipse(box(x, 25, x + 7, 33), fill=(255, 255, 255))
        d.ellipse(box(x + 1, 25.5, x + 6, 32.5), fill=eye)  # the iris: 2.5 x 3.5 px at 32 px
    d.line(box(28, 41, 36, 41), fill=(120, 40, 40), width=int(1.5 * k))
    if a.mark == "star":
        cx, cy, r = 40 + a.dx, 38 + a.dy, 4.5
        pts = [(cx + (r if i % 2 == 0 else r * 0.45) * math.sin(i * math.pi / 5),
                cy - (r if i % 2 == 0 else r * 0.45) * math.cos(i * math.pi / 5)) for i in range(10)]
        d.polygon([(x * k, y * k) for x, y in pts], fill=(230, 200, 0))
    elif a.mark == "mole":
        d.ellipse(box(38.5, 36.5, 41.5, 39.5), fill=(60, 30, 20))
    if a.glasses:
        for x in (22, 33):
            d.rectangle(box(x, 24, x + 9, 34), outline=(20, 20, 20), width=int(1.2 * k))
        d.line(box(31, 28, 33, 28), fill=(20, 20, 20), width=int(1.2 * k))
    if a.hat:
        d.rectangle(box(14, 8, 50, 12), fill=(60, 40, 20))
        d.rectangle(box(20, 0, 44, 9), fill=(60, 40, 20))
        if a.hair_style == "bun":  # worn through the hat, as with a ponytail cap: a hat never hides it
            d.ellipse(bun, fill=hair)
    if a.earrings:
        for x in (17, 46):
            d.ellipse(box(x - 1.5, 36, x + 1.5, 39), fill=(250, 210, 40))
    return im.resize((size, size), Image.LANCZOS)


SIZE = 32  # the toy world's models work at 32 px

# Caption parts that a prompt may name or leave out (pretraining shows the model both).
FIELDS = ("hair", "eyes", "mark", "wearing", "background")
# Attributes a hard-negative caption may change, by caption part.
CHANGEABLE = {"hair": ("hair_colour", "hair_style"), "eyes": ("eye_colour",), "mark": ("mark",),
              "background": ("background", "pattern")}
VALUES = {"hair_colour": tuple(HAIR_COLOURS), "hair_style": HAIR_STYLES, "eye_colour": tuple(EYE_COLOURS),
           "mark": MARKS, "background": tuple(BACKGROUNDS), "pattern": PATTERNS}


def partial_caption(a: Attributes, fields, style: bool = True) -> str:
    """A caption naming only ``fields`` (a subset of :data:`FIELDS`); with ``style`` False the
    hair is named by colour only (``with red hair``)."""
    fields = set(fields)
    people = []
    if "hair" in fields:
        people.append(f"{a.hair_colour} {a.hair_style} hair" if style else f"{a.hair_colour} hair")
    if "eyes" in fields:
        people.append(f"{a.eye_colour} eyes")
    parts = ["photo of a person" + (" with " + " and ".join(people) if people else "")]
    if "mark" in fields and a.mark != "none":
        parts.append(f"a {a.mark} on the cheek")
    wearing = [w for w, on in (("glasses", a.glasses), ("a hat", a.hat), ("earrings", a.earrings)) if on]
    if "wearing" in fields and wearing:
        parts.append("wearing " + " and ".join(wearing))
    if "background" in fields:
        parts.append(f"on a {a.background} background" + ("" if a.pattern == "plain" else f" with {a.pattern}"))
    return ", ".join(parts)


def random_caption(a: Attributes, rng: random.Random) -> Tuple[str, tuple, bool]:
    """Half the time the full caption, else a random non-empty subset of its parts.

    Returns (caption, fields, style)."""
    if rng.random() < 0.5:
        return caption(a), FIELDS, True
    fields = tuple(f for f in FIELDS if rng.random() < 0.5) or (rng.choice(FIELDS),)
    style = rng.random() < 0.5
    return partial_caption(a, fields, style), fields, style


def change_one(a: Attributes, rng: random.Random, fields=FIELDS, style: bool = True) -> Attributes:
    """``a`` with one attribute that a caption of ``fields`` names changed to another value
    (a hard negative for the contrastive loss and the caption-ranking test)."""
    names = [n for f in fields for n in CHANGEABLE.get(f, ()) if style or n != "hair_style"]
    if not names:
        names = ["hair_colour"]
    name = rng.choice(names)
    values = [v for v in VALUES[name] if v != getattr(a, name)]
    if name == "mark" and tuple(fields) != FIELDS:
        values = [v for v in values if v != "none"]  # a partial caption that omits the mark says nothing of it
    value = rng.choice(values)
    return replace(a, **{name: value})
