"""TensorBoard: evaluation scores, grids and hyperparameters written into a trial's training run,
and scalars read back from event files (reports and tests)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np


def log_evaluation(tb_dir: Path, judged, grids: Sequence[Path]) -> None:
    """Likeness and adherence per epoch at each strength, and the X/Y grids as images."""
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tb_dir))
    try:
        for row in judged.itertuples():
            for name in ("likeness", "adherence", "face_rate", "diversity"):
                value = getattr(row, name, math.nan)
                if value is not None and not (isinstance(value, float) and math.isnan(value)):
                    writer.add_scalar(f"eval/{name}/strength_{row.strength:g}", float(value), int(row.epoch))
        last = int(judged.epoch.max()) if len(judged) else 0
        for grid in grids:
            with Image.open(grid) as im:
                writer.add_image(f"grids/{Path(grid).stem}", np.asarray(im.convert("RGB")), last, dataformats="HWC")
    finally:
        writer.close()


def log_hparams(tb_dir: Path, params: Dict[str, object], metrics: Dict[str, float]) -> None:
    """The HParams tab, written into the trial's own run (``add_hparams`` would start a
    sub-run of its own, splitting hyperparameters from the training scalars)."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
    values = {f"hparam/{k}": float(v) for k, v in metrics.items() if v is not None and not math.isnan(float(v))}
    writer = SummaryWriter(log_dir=str(tb_dir))
    try:
        experiment, start, end = hparams(clean, values)
        for summary in (experiment, start, end):
            writer.file_writer.add_summary(summary)
        for k, v in values.items():
            writer.add_scalar(k, v)
    finally:
        writer.close()


def read_scalars(tb_dir: Path) -> Dict[str, List[Tuple[int, float]]]:
    """Every scalar tag in a run as (step, value) lists, from the event files alone."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not Path(tb_dir).is_dir():
        return {}
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
