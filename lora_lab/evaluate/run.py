"""Evaluate a folder of LoRA files: render the X/Y grid, score every cell, judge it.

``python -m lora_lab.evaluate lora_dir=sweeps/runs/<run>/lora model=tiny data=demo`` writes,
beside the LoRA folder: ``grids/p00.png`` ... (one X/Y grid per prompt), ``cells/`` (every
image, with A1111 infotext), ``scores.csv`` / ``scores.parquet`` (one row per epoch, strength,
prompt, seed), ``scores_agg.csv`` (one row per epoch and strength, with verdicts) and
``verdict.json`` (the best epoch and strength, and why). LoRA folders trained by kohya
sd-scripts evaluate the same way.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pandas as pd
import torch

from lora_lab.config import Config
from lora_lab.data.dataset import Dataset, load_dataset
from lora_lab.data.suites import Suite, load_suite
from lora_lab.device import pick_device
from lora_lab.errors import LoraLabError
from lora_lab.evaluate.grids import write_grids
from lora_lab.evaluate.judge import aggregate, judge, verdict_document
from lora_lab.evaluate.render import RenderSettings, label_of, render
from lora_lab.evaluate.scores import RANDOM_NOTE, Scorer, diversity
from lora_lab.files import atomic_write_bytes, atomic_write_text
from lora_lab.images import open_rgb
from lora_lab.lora import formats as lora_formats
from lora_lab.lora import kohya as kohya_io
from lora_lab.models.base import BaseModel, checkpoint_identity, load_base
from lora_lab.report import evaluation as eval_report
from lora_lab.report.tensorboard import log_evaluation

log = logging.getLogger(__name__)
_EPOCH_SUFFIX = re.compile(r"-(\d+)$")
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


@dataclass
class EvalResult:
    out_dir: Path
    scores: pd.DataFrame
    judged: pd.DataFrame
    verdict: dict
    grids: List[Path]
    timing: dict  # render_s (png_s inside), switch_s, attach_s, write_s, score_s, judge_s, images, batch_size


def list_lora_files(lora_dir: Path) -> List[Tuple[int, Path, Dict[str, torch.Tensor], Dict[str, str]]]:
    """(epoch, path, kohya tensors, metadata) for every LoRA file in the folder, in order.

    Files are read by their keys, whatever tool wrote them (see :mod:`lora_lab.lora_formats`):
    ``metadata["lora_lab_format"]`` says which. The epoch comes from ``ss_epoch`` metadata, else a
    ``-000003`` suffix, else file order. A folder of diffusers ``checkpoint-N/`` folders (its
    training script's saves) is ordered by N, with N as the X-axis value, and the final
    ``pytorch_lora_weights.safetensors`` beside them last.
    """
    lora_dir = Path(lora_dir)
    if not lora_dir.is_dir():
        raise LoraLabError(f"lora_dir: {lora_dir} is not a folder of LoRA files")
    paths = sorted(lora_dir.glob("*.safetensors"))
    checkpoints = sorted(((int(m.group(1)), d) for d in lora_dir.iterdir()
                          if d.is_dir() and (m := _CHECKPOINT.fullmatch(d.name))), key=lambda x: x[0])
    checkpoints = [(n, d, sorted(d.glob("*.safetensors"))) for n, d in checkpoints]
    checkpoints = [(n, d, files[0]) for n, d, files in checkpoints if files]
    if not paths and not checkpoints:
        others = sorted(p.name for p in lora_dir.iterdir() if p.suffix in (".ckpt", ".pt", ".bin"))
        hint = f" (found {', '.join(others)}: only .safetensors LoRA files are read)" if others else ""
        raise LoraLabError(f"lora_dir: {lora_dir} holds no .safetensors LoRA files{hint}")
    out = []
    for n, folder, path in checkpoints:
        tensors, meta = _read_any(path)
        out.append((n, path, tensors, {**meta, "lora_lab_label": folder.name}))
    last = checkpoints[-1][0] if checkpoints else 0
    for i, path in enumerate(paths):
        tensors, meta = _read_any(path)
        if checkpoints:
            epoch = last + 1 + i  # the training script's final save, after its checkpoints
        elif "ss_epoch" in meta and meta["ss_epoch"].isdigit():
            epoch = int(meta["ss_epoch"])
        elif _EPOCH_SUFFIX.search(path.stem):
            epoch = int(_EPOCH_SUFFIX.search(path.stem).group(1))
        else:
            epoch = i + 1
        out.append((epoch, path, tensors, meta))
    out.sort(key=lambda x: (x[0], x[1].name))
    return out


def _read_any(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    tensors, meta = kohya_io.read_kohya(path)
    tensors, fmt = lora_formats.to_kohya(tensors, meta, str(path))
    return tensors, {**meta, "lora_lab_format": fmt}


def read_files(lora_dir: Path, unet, text_encoders, epochs: Optional[List[int]] = None) -> list:
    """(epoch, path, kohya tensors, metadata) of every LoRA file in ``lora_dir`` (only ``epochs``
    when given), each in the form rendering takes: other formats converted, DoRA against this
    model's base weights."""
    files = list_lora_files(lora_dir)
    if epochs is not None:
        files = [f for f in files if f[0] in epochs]
    return [(e, path, lora_formats.dora_to_kohya(
                t, lambda name: kohya_io.base_weight(unet, text_encoders, name), str(path)), m)
            if m.get("lora_lab_format") == lora_formats.DORA else (e, path, t, m) for e, path, t, m in files]


def default_out_dir(lora_dir: Path) -> Path:
    """Our runs keep LoRA files in ``<run>/lora``: results go to ``<run>``; elsewhere beside them."""
    lora_dir = Path(lora_dir)
    return lora_dir.parent if lora_dir.name == "lora" else lora_dir / "lora_lab_eval"


def evaluate(config: Config, base: BaseModel, dataset: Dataset, lora_dir: Path, out_dir: Path,
             scorer: Optional[Scorer] = None, suite: Optional[Suite] = None, progress: bool = True,
             epochs: Optional[List[int]] = None, tb_dir: Optional[Path] = None,
             base_renders: Optional[dict] = None, render_plan: Optional[dict] = None) -> EvalResult:
    """Render, score and judge every LoRA file in ``lora_dir``; write the results to ``out_dir``.

    Args:
        epochs: Only these epochs (the sweep's cheap per-epoch evaluation).
        tb_dir: Also log scores per epoch and the grids to this TensorBoard run.
        base_renders: Base-model images already rendered by this worker, reused (see render).
        render_plan: The batch size this worker chose, reused (see render).
        scorer / suite: Reuse ones already built (a sweep worker builds them once).
    """
    e = config.eval
    suite = suite or load_suite(e.suite, dataset.token or "", dataset.suite).limited(e.max_prompts)
    files = read_files(lora_dir, base.unet, base.text_encoders, epochs)
    strengths = [float(s) for s in e.strengths]
    if 0.0 not in strengths:
        strengths.append(0.0)  # the base model is always the baseline
    scorer = scorer or Scorer(suite.kind, e.face, e.clip, base.device, e.adherence, e.vqa)
    checkpoint = checkpoint_identity(base.source)  # A1111's "Model" and "Model hash"
    settings = RenderSettings(
        sampler=e.sampler, steps=e.steps, cfg_scale=e.cfg_scale, size=e.size or config.resolution,
        seeds=list(e.seeds), negative_prompt=suite.negative_prompt, model_name=checkpoint[0],
        model_hash=checkpoint[1],
        mixed_precision=None if config.train.mixed_precision == "no" else config.train.mixed_precision,
        clip_skip=config.train.clip_skip, batch_size=e.batch_size,
    )
    timing: dict = {}
    cells = render(base.pipe, files, strengths, suite.prompts, settings, out_dir, progress=progress, timing=timing,
                   base_renders=base_renders, plan=render_plan)
    clock = time.perf_counter()
    grids = write_grids(cells, strengths, out_dir)
    timing["write_s"] = timing["png_s"] + time.perf_counter() - clock  # cell PNGs (in render_s), grids

    clock = time.perf_counter()
    refs = scorer.references(sorted({s.path for s in dataset.train}))
    unique = list(dict.fromkeys(c.path for c in cells))
    cell_of = {c.path: c for c in cells}
    by_path: Dict[Path, dict] = {}
    for i in range(0, len(unique), 16):
        chunk = unique[i : i + 16]
        images = [open_rgb(p) for p in chunk]
        rows = scorer.score(images, [cell_of[p].prompt.judge for p in chunk], refs,
                            [cell_of[p].prompt.versus for p in chunk])
        by_path.update(zip(chunk, rows))
    weights_note = RANDOM_NOTE if scorer.random_weights else "pretrained scorer weights"
    records = []
    for c in cells:
        s = by_path[c.path]
        records.append({
            "epoch": c.epoch, "label": c.label, "strength": c.strength, "lora_file": str(c.lora_file),
            "prompt_index": c.prompt.index, "prompt_kind": c.prompt.kind, "prompt": c.prompt.text,
            "judge": c.prompt.judge, "versus": c.prompt.versus, "seed": c.seed, "image": str(c.path),
            **{k: v for k, v in s.items() if k != "embedding"}, "scorer_weights": weights_note,
        })
    scores = pd.DataFrame(records)
    div = {}
    for key, group in pd.DataFrame([(c.label, c.strength, c.prompt.index, c.path) for c in cells],
                                   columns=["label", "strength", "prompt_index", "path"]).groupby(
                                       ["label", "strength", "prompt_index"]):
        div[key] = diversity([by_path[p]["embedding"] for p in group.path])
    scores["diversity"] = [div[(r.label, r.strength, r.prompt_index)] for r in scores.itertuples()]
    if "face_detected" not in scores:
        scores["face_detected"] = False
        scores["face_likeness"] = float("nan")

    timing["score_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    agg = aggregate(scores, suite.kind)
    ceiling = refs.face_ceiling if suite.kind == "person" else refs.clip_ceiling
    judged = judge(agg, ceiling, e.judge)
    notes = scorer.notes + [f"references: {len(refs.names)} training images"
                            + (f", faces detected in {refs.face_rate:.0%}" if suite.kind == "person" else "")]
    files_by_label = {label_of(path, meta): str(path) for _, path, _, meta in files}
    doc = verdict_document(judged, ceiling, e.judge, files_by_label, notes)
    doc["suite"] = suite.name
    doc["strengths"] = strengths
    doc["settings"] = {"sampler": e.sampler, "steps": e.steps, "cfg_scale": e.cfg_scale, "seeds": list(e.seeds),
                       "size": settings.size}
    timing["judge_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    _write_tables(out_dir, scores, judged, doc)
    if tb_dir is not None:
        log_evaluation(tb_dir, judged, grids)
    timing["write_s"] += time.perf_counter() - clock
    return EvalResult(out_dir, scores, judged, doc, grids, timing)


def _write_tables(out_dir: Path, scores: pd.DataFrame, judged: pd.DataFrame, doc: dict) -> None:
    atomic_write_text(out_dir / "scores.csv", scores.to_csv(index=False))
    buf = io.BytesIO()
    scores.to_parquet(buf, index=False)
    atomic_write_bytes(out_dir / "scores.parquet", buf.getvalue())
    flat = judged.copy()
    flat["reasons"] = flat.reasons.map(lambda r: "; ".join(r))
    atomic_write_text(out_dir / "scores_agg.csv", flat.to_csv(index=False))
    atomic_write_text(out_dir / "verdict.json", json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


def summary(result: EvalResult) -> str:
    """The lines printed at the end of an evaluation."""
    j = result.judged
    lines = ["epoch  strength  verdict   likeness  adherence  reason"]
    for r in j[j.strength != 0].itertuples():
        lines.append(f"{r.epoch:>5}  {r.strength:>8g}  {r.verdict:<8}  {_f(r.likeness):>8}  {_f(r.adherence, 1):>9}"
                     f"  {r.reasons[0]}")
    best = result.verdict["best"]
    if best:
        lines.append(f"best: epoch {best['epoch']} at strength {best['strength']:g}: {best['file']}  "
                     f"{best['snippet']}")
    else:
        lines.append("best: none (every LoRA cell is overfit)")
    lines += [f"note: {n}" for n in result.verdict["notes"]]
    lines.append(f"grids: {result.out_dir / 'grids'}  scores: {result.out_dir / 'scores.csv'}  "
                 f"verdict: {result.out_dir / 'verdict.json'}")
    return "\n".join(lines)


def _f(x: float, digits: int = 3) -> str:
    return "n/a" if x != x else f"{x:.{digits}f}"


def run(config: Config) -> EvalResult:
    """The ``python -m lora_lab.evaluate`` job: check everything, load once, evaluate."""
    from lora_lab.data import kohya_toml

    config = kohya_toml.apply(config)
    if not config.lora_dir:
        raise LoraLabError("lora_dir: which LoRA folder? e.g. lora_dir=sweeps/runs/<run>/lora")
    lora_dir = Path(config.lora_dir).expanduser()
    files = list_lora_files(lora_dir)  # fail early on a bad folder
    device = pick_device(config.device)
    dataset = load_dataset(config.data, Path(config.cache_dir), config.explicit)
    load_suite(config.eval.suite, dataset.token or "", dataset.suite)
    out_dir = Path(config.eval.output_dir) if config.eval.output_dir else default_out_dir(lora_dir)
    if config.eval.checkpoints:
        return _on_checkpoints(config, dataset, lora_dir, out_dir, device, len(files))
    log.info(f"evaluating {len(files)} LoRA files in {lora_dir} -> {out_dir}")
    base = load_base(config.model, Path(config.cache_dir), device)
    result = evaluate(config, base, dataset, lora_dir, out_dir, tb_dir=out_dir / "tb")
    log.info(summary(result))
    log.info(f"report: {eval_report.write(out_dir, lora_dir, {config.model.name: result})}")
    return result


def _on_checkpoints(config: Config, dataset: Dataset, lora_dir: Path, out_dir: Path, device, n_files: int):
    """The same X/Y on every checkpoint of ``eval.checkpoints``, one loaded at a time, each in
    ``out_dir/<checkpoint name>/``, then how the verdicts transfer (``transfer.csv``)."""
    from dataclasses import replace

    from lora_lab.evaluate import transfer
    from lora_lab.models.base import checkpoint_identity, resolve_source

    models = []
    for ckpt in config.eval.checkpoints:  # every checkpoint checked before any work
        model = replace(config.model, pretrained=str(Path(ckpt).expanduser()), builtin=None)
        resolve_source(model, Path(config.cache_dir))
        models.append((checkpoint_identity(model.pretrained)[0], model))
    names = [n for n, _ in models]
    if len(set(names)) < len(names):
        raise LoraLabError(f"eval.checkpoints: two checkpoints share a name ({', '.join(names)}); "
                           "their results would share a folder")
    judged, best, results, result = {}, {}, {}, None
    for name, model in models:
        log.info(f"evaluating {n_files} LoRA files in {lora_dir} on {name} -> {out_dir / name}")
        base = load_base(model, Path(config.cache_dir), device)
        result = evaluate(replace(config, model=model), base, dataset, lora_dir, out_dir / name,
                          tb_dir=out_dir / name / "tb")
        del base
        log.info(summary(result))
        judged[name], best[name], results[name] = result.judged, result.verdict["best"], result
    lines = transfer.write(out_dir, judged, best)
    for line in lines:
        log.info(line)
    log.info(f"report: {eval_report.write(out_dir, lora_dir, results, lines[:-1], transfer.table(judged))}")
    return result


def main() -> None:
    from lora_lab.cli import exit_now, hydra_entry

    hydra_entry(run, "lora_lab.evaluate")()
    exit_now()


if __name__ == "__main__":
    main()
