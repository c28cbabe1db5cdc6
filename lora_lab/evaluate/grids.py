"""A1111-style X/Y grids: epochs across, strengths down, seeds side by side in a cell."""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

from lora_lab.evaluate.render import Cell
from lora_lab.images import open_rgb


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def draw_grid(images: List[List[Image.Image]], col_labels: List[str], row_labels: List[str],
              title: str = "") -> Image.Image:
    """An X/Y plot as A1111 draws it: column labels on top, row labels on the left."""
    font = _font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text: str) -> Tuple[int, int]:
        box = probe.textbbox((0, 0), text, font=font)
        return box[2] - box[0], box[3] - box[1]

    cell_w = max(im.width for row in images for im in row)
    cell_h = max(im.height for row in images for im in row)
    col_w = max([cell_w] + [text_size(t)[0] + 12 for t in col_labels])
    left = max(text_size(t)[0] for t in row_labels) + 16
    top = 28 + (24 if title else 0)
    grid = Image.new("RGB", (left + col_w * len(col_labels), top + cell_h * len(row_labels)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((8, 6), title, fill="black", font=font)
    for c, label in enumerate(col_labels):
        w, _ = text_size(label)
        draw.text((left + c * col_w + (col_w - w) // 2, top - 22), label, fill="black", font=font)
    for r, label in enumerate(row_labels):
        _, h = text_size(label)
        draw.text((8, top + r * cell_h + (cell_h - h) // 2), label, fill="black", font=font)
        for c, im in enumerate(images[r]):
            grid.paste(im, (left + c * col_w + (col_w - im.width) // 2, top + r * cell_h))
    return grid


def write_grids(cells: List[Cell], strengths: Sequence[float], out_dir: Path) -> List[Path]:
    """One grid PNG per prompt: X = epoch files, Y = strengths, seeds side by side in a cell."""
    paths = []
    labels = list(dict.fromkeys((c.epoch, c.label) for c in cells))
    prompts = list(dict.fromkeys(c.prompt for c in cells))
    by_key = {(c.label, c.strength, c.prompt.index, c.seed): c.path for c in cells}
    seeds = sorted({c.seed for c in cells}, key=[c.seed for c in cells].index)
    for prompt in prompts:
        rows = []
        for strength in strengths:
            row = []
            for _, label in labels:
                ims = [open_rgb(by_key[(label, float(strength), prompt.index, s)]) for s in seeds]
                strip = Image.new("RGB", (sum(i.width for i in ims), max(i.height for i in ims)), "white")
                x = 0
                for im in ims:
                    strip.paste(im, (x, 0))
                    x += im.width
                row.append(strip)
            rows.append(row)
        col_labels = [f"epoch {e} ({label})" for e, label in labels]
        grid = draw_grid(rows, col_labels, [f"strength {s:g}" for s in strengths], title=prompt.text)
        path = out_dir / "grids" / f"p{prompt.index:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        paths.append(path)
    return paths
