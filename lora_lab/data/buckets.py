"""Aspect-ratio buckets with kohya sd-scripts' meaning, so portrait and landscape photos train
whole instead of being cropped to a square.

With ``enable_bucket`` every image goes to the bucket (width, height) whose aspect ratio is
closest to its own, among kohya's set: sides from ``min_bucket_reso`` to ``max_bucket_reso`` in
steps of ``bucket_reso_steps``, area at most resolution squared. The image is scaled to cover
the bucket and centre-cropped (so a few pixels at most are cut along one side). With
``bucket_no_upscale`` a small image keeps its size (its bucket is its own size rounded down to
the steps) and a large one is scaled down to the area. Batches are drawn within one bucket.
Without buckets every image is scaled to cover resolution x resolution and centre-cropped.

The defaults scale kohya's (256, 1024 and 64 at SD 1.5's 512 px) to the model's native size:
half and twice the resolution, in steps of an eighth of it.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Sequence, Tuple

Size = Tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class BucketSpec:
    resolution: int
    enabled: bool = False
    min_reso: int = 0
    max_reso: int = 0
    steps: int = 64
    no_upscale: bool = False

    @classmethod
    def from_config(cls, data, resolution: int) -> "BucketSpec":
        """The data config's bucket settings at the run's resolution (null: scaled defaults)."""
        steps = data.bucket_reso_steps or max(8, resolution // 8)
        return cls(resolution=resolution, enabled=bool(data.enable_bucket),
                   min_reso=data.min_bucket_reso or max(steps, resolution // 2),
                   max_reso=data.max_bucket_reso or resolution * 2, steps=steps,
                   no_upscale=bool(data.bucket_no_upscale))

    def describe(self) -> str:
        if not self.enabled:
            return f"buckets off: every image scaled and centre-cropped to {self.resolution}x{self.resolution}"
        return (f"buckets: {self.min_reso}-{self.max_reso} px in steps of {self.steps}, area <= "
                f"{self.resolution}x{self.resolution}" + (", no upscaling" if self.no_upscale else ""))


@dataclass(frozen=True)
class Placement:
    """Where one image trains: its bucket, the size it is scaled to, and the crop's top-left."""

    bucket: Size
    resized: Size
    crop: Tuple[int, int]  # (top, left) in the resized image

    def crop_for(self, flipped: bool) -> Tuple[int, int]:
        """The crop's (top, left) as SDXL is told it; a mirrored image's left is counted from
        the other side."""
        top, left = self.crop
        return (top, self.resized[0] - left - self.bucket[0]) if flipped else (top, left)


@lru_cache(maxsize=16)
def resolutions(spec: BucketSpec) -> List[Size]:
    """kohya's bucket set (model_util.make_bucket_resolutions) for ``spec``."""
    area = spec.resolution * spec.resolution
    out = {(int(math.sqrt(area) // spec.steps) * spec.steps,) * 2}
    width = spec.min_reso
    while width <= spec.max_reso:
        height = min(spec.max_reso, int((area // width) // spec.steps) * spec.steps)
        if height >= spec.min_reso:
            out.add((width, height))
            out.add((height, width))
        width += spec.steps
    return sorted(out)  # cached: callers must not change it


def _round(x: float, steps: int) -> int:
    x = int(x + 0.5)
    return x - x % steps


def place(size: Size, spec: BucketSpec) -> Placement:
    """The bucket, resized size and crop of an image of ``size`` (kohya's select_bucket)."""
    w, h = size
    ratio = w / h
    if not spec.enabled or not spec.no_upscale:
        if spec.enabled:
            buckets = resolutions(spec)
            bucket = size if size in buckets else min(buckets, key=lambda b: abs(b[0] / b[1] - ratio))
        else:
            bucket = (spec.resolution, spec.resolution)
        scale = bucket[1] / h if ratio > bucket[0] / bucket[1] else bucket[0] / w
        resized = (max(bucket[0], int(w * scale + 0.5)), max(bucket[1], int(h * scale + 0.5)))
    else:
        area = spec.resolution * spec.resolution
        if w * h > area:
            rw = math.sqrt(area * ratio)
            rh = area / rw
            bw = _round(rw, spec.steps)
            err_w = abs(bw / max(_round(bw / ratio, spec.steps), 1) - ratio)
            bh = _round(rh, spec.steps)
            err_h = abs(_round(bh * ratio, spec.steps) / max(bh, 1) - ratio)
            resized = (bw, int(bw / ratio + 0.5)) if err_w < err_h else (int(bh * ratio + 0.5), bh)
        else:
            resized = (w, h)
        bucket = (resized[0] - resized[0] % spec.steps, resized[1] - resized[1] % spec.steps)
        if min(bucket) < spec.steps:
            bucket = (max(bucket[0], spec.steps), max(bucket[1], spec.steps))
            scale = max(bucket[0] / resized[0], bucket[1] / resized[1])
            resized = (max(bucket[0], int(resized[0] * scale + 0.5)), max(bucket[1], int(resized[1] * scale + 0.5)))
    return Placement(bucket, resized, ((resized[1] - bucket[1]) // 2, (resized[0] - bucket[0]) // 2))


def table(sizes: Sequence[Size], spec: BucketSpec, repeats: Optional[Sequence[int]] = None
          ) -> Tuple[Dict[Size, int], float]:
    """(images per bucket, each counted ``repeats`` times, in kohya's order; the mean
    aspect-ratio error per image, as kohya prints them)."""
    counts: Counter = Counter()
    errors = []
    for size, n in zip(sizes, repeats or [1] * len(sizes)):
        p = place(size, spec)
        counts[p.bucket] += n
        errors.append(abs(p.bucket[0] / p.bucket[1] - size[0] / size[1]))
    return dict(sorted(counts.items())), (sum(errors) / len(errors) if errors else 0.0)


def describe_table(counts: Dict[Size, int], ar_error: float) -> List[str]:
    """The lines kohya prints before training (with the bucket's shape in words)."""
    lines = ["number of images (including repeats) per bucket:"]
    for i, ((w, h), n) in enumerate(counts.items()):
        shape = "square" if w == h else "portrait" if h > w else "landscape"
        lines.append(f"  bucket {i}: resolution ({w}, {h}) {shape}, count: {n}")
    lines.append(f"  mean aspect-ratio error: {ar_error:.4f}")
    return lines


def bucket_batches(items: Sequence, batch_size: int, bucket_of: Callable, rng: random.Random) -> List[list]:
    """Batches of an epoch's (already shuffled) items, each within one bucket; the batch
    order shuffled when there are several buckets, as kohya does."""
    groups: Dict[Size, list] = defaultdict(list)
    for item in items:
        groups[bucket_of(item)].append(item)
    out = [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]
    if len(groups) > 1:
        rng.shuffle(out)
    return out


def batches_per_epoch(items: Sequence, batch_size: int, bucket_of: Callable) -> int:
    counts = Counter(bucket_of(item) for item in items)
    return sum(math.ceil(n / batch_size) for n in counts.values())
