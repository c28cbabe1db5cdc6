"""The one way lora_lab opens an image: EXIF orientation applied, then RGB.

A phone photo stores its pixels sideways with an EXIF tag saying how to turn them; training,
the likeness references and every page must see it upright, or a face is scored lying down.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps


def open_rgb(path: Path) -> Image.Image:
    """The image at ``path``, upright (EXIF orientation applied) and in RGB, fully loaded."""
    with Image.open(path) as im:
        upright = ImageOps.exif_transpose(im)
        if upright.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale: scale to 8 bits first
            upright = upright.point(lambda v: v / 256).convert("L")
        return upright.convert("RGB")
