"""What a run tells its user before any model loads: the dataset, the bucket table (as kohya
prints it), the step count, whether captions are encoded once or every step, and the dataset
doctor's findings. The step maths itself is :mod:`lora_lab.data.steps`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional

from lora_lab.config import Config, TrainConfig
from lora_lab.data.buckets import BucketSpec, describe_table
from lora_lab.data.dataset import Dataset
from lora_lab.data.steps import bucket_table, steps_line

log = logging.getLogger(__name__)
SHOWN_PER_KIND = 3  # doctor findings printed per kind before "... and N more"


def text_encoding(t: TrainConfig, dataset: Dataset) -> Optional[str]:
    """Why captions are encoded every step instead of once (None: the text cache is used)."""
    if t.trains_text_encoder:
        return "the text encoder trains"
    if not t.cache_text_embeddings:
        return "train.cache_text_embeddings=false"
    varying = [s for s in dataset.samples if s.options.varies]
    if varying:
        return ("captions change from step to step (shuffle_caption, caption_dropout_rate or "
                "caption_tag_dropout_rate)")
    return None


def describe(config: Config, dataset: Dataset) -> List[str]:
    """The lines printed before training: dataset, buckets, steps, text encoding."""
    t = config.train
    spec = BucketSpec.from_config(config.data, config.resolution)
    lines = dataset.summary().splitlines() + [spec.describe()]
    if spec.enabled:
        lines += describe_table(*bucket_table(dataset, spec))
    lines.append(steps_line(dataset, config))
    why = text_encoding(t, dataset)
    lines.append(f"captions encoded every step: {why}" if why else "captions encoded once (text cache)")
    return lines


def doctor(config: Config, dataset: Dataset, folder=None) -> Optional[dict]:
    """Run the dataset doctor (``data.doctor``), log its findings (a few per kind) and write
    ``doctor.json`` into ``folder`` for the report; never stops the run."""
    if not config.data.doctor:
        return None
    import json

    from lora_lab.data import doctor as dr

    report = dr.for_run(config, dataset)
    shown: Dict[str, int] = {}
    lines = [f"dataset doctor: {report.counts}"]
    for f in report.findings:
        shown[f.kind] = shown.get(f.kind, 0) + 1
        if shown[f.kind] <= SHOWN_PER_KIND:
            lines.append(f"  {f.file.rsplit('/', 1)[-1] or 'the set'}: {f.message}")
    hidden = sum(max(0, n - SHOWN_PER_KIND) for n in shown.values())
    if hidden:
        where = config.data.path or (str(Path(dataset.folders[0]).parent) if dataset.folders else "<data folder>")
        kind = dr.suite_kind(config, dataset)  # the same checks as this run's, from the command line
        same = f"train.resolution={config.resolution}" + (f" eval.suite={kind}" if kind != "person" else "")
        lines.append(f"  ... and {hidden} more: python -m lora_lab.doctor {where} {same} lists every one")
    lines += [f"  note: {n}" for n in report.notes]
    (log.warning if report.findings else log.info)(lines[0])
    for line in lines[1:]:
        log.info(line)
    data = report.to_json()
    spec = BucketSpec.from_config(config.data, config.resolution)
    if spec.enabled:
        counts, _ = bucket_table(dataset, spec)
        data["buckets"] = [{"resolution": list(reso), "count": n} for reso, n in counts.items()]
    if folder is not None:
        from lora_lab.files import atomic_write_text

        atomic_write_text(folder / "doctor.json", json.dumps(data, indent=2) + "\n")
    return data
