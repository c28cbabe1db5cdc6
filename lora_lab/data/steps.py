"""Step maths as kohya counts it: each epoch's order of samples (repeats, regularization
images cycled), each image's bucket placement, micro-batches and optimizer steps."""

from __future__ import annotations

import math
import random
from typing import Dict, Iterable, List, Optional

from lora_lab.config import Config, TrainConfig
from lora_lab.data.buckets import BucketSpec, Placement, batches_per_epoch, place, table
from lora_lab.data.dataset import Dataset, Sample


def epoch_order(dataset: Dataset, seed: int, epoch: int) -> List[Sample]:
    """The samples of one epoch, shuffled: train images x repeats, plus as many reg images.

    As in kohya, regularization images are cycled to match the count of training images.
    """
    rng = random.Random(seed * 100_003 + epoch)
    items: List[Sample] = [s for s in dataset.train for _ in range(s.repeats)]
    reg_pool = [s for s in dataset.reg for _ in range(s.repeats)]
    if reg_pool:
        items += [reg_pool[i % len(reg_pool)] for i in range(len(items))]
    rng.shuffle(items)
    return items


def batches(items: List[Sample], batch_size: int) -> Iterable[List[Sample]]:
    for i in range(0, len(items), batch_size):
        yield items[i : i + batch_size]


def placements(dataset: Dataset, config: Config) -> Dict[str, Placement]:
    """Each image's bucket, size and crop at the run's resolution and bucket settings (the
    held-out validation images: a centre-cropped square, so their loss stacks in one batch)."""
    spec = BucketSpec.from_config(config.data, config.resolution)
    out = {s.id: place(s.size, spec) for s in dataset.samples}
    out.update({s.id: place(s.size, BucketSpec(config.resolution)) for s in dataset.validation})
    return out


def total_steps(dataset: Dataset, cfg: TrainConfig, where: Optional[Dict[str, Placement]] = None) -> tuple[int, int]:
    """(micro-batches per epoch, optimizer steps in all) as kohya counts them: batches are
    drawn within a bucket, so each bucket's last batch may be short."""
    if where is None:
        per_epoch = math.ceil(dataset.images_per_epoch() / cfg.batch_size)
    else:
        per_epoch = batches_per_epoch(epoch_order(dataset, cfg.seed, 1), cfg.batch_size, lambda s: where[s.id].bucket)
    return per_epoch, math.ceil(per_epoch / cfg.gradient_accumulation) * cfg.epochs


def steps_line(dataset: Dataset, config: Config) -> str:
    """kohya's step count in words: images x repeats x epochs / batch (/ accumulation) = steps."""
    t = config.train
    _, steps = total_steps(dataset, t, placements(dataset, config))
    repeats = sorted({s.repeats for s in dataset.train})
    each = f"{repeats[0]} repeats" if len(repeats) == 1 else f"{dataset.images_per_epoch()} with repeats"
    return (f"kohya steps: {len(dataset.train)} images x {each} x {t.epochs} epochs / batch {t.batch_size}"
            + (f" / accumulation {t.gradient_accumulation}" if t.gradient_accumulation > 1 else "")
            + f" = {steps} steps")


def bucket_table(dataset: Dataset, spec: BucketSpec):
    """(images per bucket with repeats, mean aspect-ratio error) of the run's images."""
    return table([s.size for s in dataset.samples], spec, [s.repeats for s in dataset.samples])
