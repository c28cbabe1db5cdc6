"""``python -m lora_lab.bench truth``: lora_lab's judgement against the toy world's ground truth.

One study per subject (``truth_<subject>``: the settings of ``conf/sweep/truth.yaml``, every
epoch evaluated, no pruning), then:

1. the read-out looks at every rendered image (:mod:`lora_lab.toyworld.truth`): true verdicts,
   true likeness and adherence, a true ranking of the cells;
2. the judge's thresholds are chosen on the calibration subjects only (the best balanced
   recall over a grid of candidates), and every figure is reported on the held-out subjects;
3. the pruner's per-epoch check is replayed from the stored images: its rank correlation with
   the trial's final objective, and what each pruner would have saved or lost (Optuna's own
   pruners, fed the recorded values);
4. the validation loss's pick of an epoch is compared with the true best epoch;
5. ``disagreements.html`` shows every cell where lora_lab and the read-out part, with images.

By default only the held-out subjects' studies run, judged with the thresholds the toy world
ships (``conf/model/toyworld.yaml``: what a ``--full`` run chose); ``--full`` (or
``--calibration``) also runs the calibration subjects' studies and chooses the thresholds
again (step 2), and says whether it chose the shipped ones. The held-out figures are the same
either way when it does.

The figures land in ``<out>/truth.json`` (keys documented in the README), the studies, every
cell's two verdicts and the disagreements page in ``<out>/truth/``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, replace
from itertools import product
from pathlib import Path
from typing import Dict, List, Optional

import pandas as pd

from lora_lab.bench import truth_rules as gt
from lora_lab.bench import truth_search
from lora_lab.bench.studies import run_studies, subject_sources
from lora_lab.bench.truth_checks import (leakage_figures, readout_figures, second_readout_as_judge,
                                         where_readouts_agree)
from lora_lab.bench.truth_pruning import pruning
from lora_lab.bench.truth_text import text
from lora_lab.config import JudgeConfig
from lora_lab.evaluate.judge import aggregate, best_cell, judge
from lora_lab.numbers import wilson
from lora_lab.toyworld import assets, subjects

CALIBRATION = ("sks", "vek", "mox", "zev", "pim")
HELDOUT = ("qor", "lum", "dax", "ryn", "tal", "oka")
VERDICTS = gt.VERDICTS
TRUTH_RULES = JudgeConfig()  # what "truly underfit / overfit" means; never tuned
# Judge settings tried on the calibration subjects; 1.0 turns a check off.
# The grid reaches past where the search has chosen so far (underfit_gain 0.5 and ask_drop 0.1
# were its edges once), so that a choice at an edge is not the grid's doing.
CANDIDATES = {"underfit_gain": [0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7],
              "adherence_drop": [0.05, 0.1, 0.15, 0.2, 0.25, 0.3],
              "ask_drop": [0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.5, 0.75, 1.0],
              "diversity_drop": [0.5, 1.0], "copy_threshold": [0.95, 1.0]}
# Where the calibration subjects cannot tell candidates apart (equal balanced recall and
# agreement), the judge takes the one whose sentence is nearest the truth's own: an ask is
# truly lost when it shows in fewer than 1 - adherence_drop (80%) as many images as on the base
# model, so ask_drop's tie goes towards that same 0.2 ("less than 0.8 times as likely").
MEANING = {"underfit_gain": TRUTH_RULES.underfit_gain, "adherence_drop": TRUTH_RULES.adherence_drop,
           "ask_drop": TRUTH_RULES.adherence_drop, "diversity_drop": TRUTH_RULES.diversity_drop,
           "copy_threshold": TRUTH_RULES.copy_threshold}


def _share(hits: int, n: int) -> dict:
    return {"value": round(hits / n, 4) if n else None, "ci95": wilson(hits, n), "n": int(n)}


def collect(root: Path, name: str, cache_dir: Path, readout, source: Optional[str] = None,
            study: Optional[Path] = None, second=None) -> List[dict]:
    """Every finished trial of one subject's study (default ``root/truth_<name>``), with the
    read-out's truth (and, with ``second``, the second read-out's verdicts beside it)."""
    subject = subjects.load(source or name)
    folder = subjects.data_folder(cache_dir, source or name)
    refs = sorted((folder / subject.folder_name).glob("*.png"))
    top = gt.ceiling(readout, refs, subject)
    top_b = gt.ceiling(second, refs, subject) if second is not None else None
    context = gt.training_context(readout, refs)
    references = gt.read_scores(pd.DataFrame({"image": [str(p) for p in refs], "prompt": ""}), readout,
                                Path.cwd(), subject, second) if second is not None else None
    trials = []
    study = study or root / f"truth_{name}"
    for tdir in sorted(study.glob("trial_*"), key=lambda p: int(p.name.split("_")[1])):
        if not (tdir / "verdict.json").exists():
            continue
        doc = json.loads((tdir / "verdict.json").read_text(encoding="utf-8"))
        info = json.loads((tdir / "trial.json").read_text(encoding="utf-8"))
        scores = pd.read_csv(tdir / "scores.csv")
        read = gt.read_scores(scores, readout, Path.cwd(), subject, second, context)
        truth = gt.truth_cells(read, top, TRUTH_RULES)
        if second is not None:
            other = gt.truth_cells(read.assign(identity=read.identity_b, asked_shown=read.asked_shown_b), top_b,
                                   TRUTH_RULES)
            truth = truth.merge(other[gt.CELL + ["true_verdict", "true_combined"]].rename(
                columns={"true_verdict": "true_verdict_b", "true_combined": "true_combined_b"}), on=gt.CELL)
        agg = aggregate(scores, "object")  # from every image's scores: the judge as it is now, on stored images
        trials.append({"subject": name, "trial": tdir.name, "dir": tdir, "params": info.get("params", {}),
                       "duration_s": float(info.get("duration_s") or 0.0),
                       "number": int(info["number"]), "scores": scores, "agg": agg,
                       "ceiling": doc["ceiling"], "true_ceiling": top, "truth": truth, "context": context,
                       # one row per image (the base model's rows repeat once per epoch)
                       "same": read.drop_duplicates("image").filter(regex="^same_|^strength$")
                       if second is not None else None,
                       "same_references": references.filter(regex="^same_") if references is not None else None,
                       "validation_loss": {int(k): v for k, v in (info.get("validation_loss") or {}).items()},
                       "kind": "object"})
    return trials


def judged_cells(trials: List[dict], cfg: JudgeConfig) -> tuple[pd.DataFrame, List[dict]]:
    """Re-judge every trial with ``cfg``: (LoRA cells with both verdicts, one pick per trial)."""
    tables, picks = [], []
    for t in trials:
        judged = judge(t["agg"], t["ceiling"], cfg)
        best = best_cell(judged)
        pick = None if best is None else {"epoch": int(best.epoch), "strength": float(best.strength)}
        judged = judged.assign(reasons=judged.reasons.map("; ".join))  # one sentence per cell
        result = gt.compare(judged, t["truth"], pick)
        table = result["table"].merge(judged[gt.CELL + ["reasons", "combined"]], on=gt.CELL)
        tables.append(table[table.strength != 0].assign(subject=t["subject"], trial=t["trial"]))
        picks.append({"subject": t["subject"], "trial": t["trial"], "pick": pick, "rank": result["pick_rank"],
                      "true_share": result["pick_true_share"], "pick_true_verdict": result["pick_true_verdict"],
                      "true_best": result["true_best"]})
    cells = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    return cells, picks


def figures(cells: pd.DataFrame, picks: List[dict]) -> dict:
    """Agreement, per-class counts / recall / precision and picks in the true top 3, with 95% intervals."""
    n = len(cells)
    out = {"cells": int(n), "trials": len(picks),
           "agreement": _share(int((cells.verdict == cells.true_verdict).sum()) if n else 0, n),
           "count": {}, "recall": {}, "precision": {}}
    for v in VERDICTS:
        true_v = cells[cells.true_verdict == v] if n else cells
        said_v = cells[cells.verdict == v] if n else cells
        out["count"][v] = int(len(true_v))
        out["recall"][v] = _share(int((true_v.verdict == v).sum()), len(true_v))
        out["precision"][v] = _share(int((said_v.true_verdict == v).sum()), len(said_v))
    ranked = [p for p in picks if p["rank"] is not None]
    out["picks_in_true_top3"] = _share(sum(1 for p in ranked if p["rank"] <= 3), len(picks))
    # picks.regret: the pick's true combined score as a share of the trial's true best
    # non-overfit cell; a trial without a pick, or whose pick is truly overfit, is a miss
    shares = [p["true_share"] for p in picks if p["true_share"] is not None]
    within = sum(1 for p in picks if p["true_share"] is not None and p["true_share"] >= 0.95
                 and p["pick_true_verdict"] != "overfit")
    out["picks_regret"] = {"within_5pct": _share(within, len(picks)),
                           "median_share": round(float(pd.Series(shares).median()), 4) if shares else None,
                           "worst_share": round(min(shares), 4) if shares else None}
    out["confusion"] = {t: {v: int(((cells.true_verdict == t) & (cells.verdict == v)).sum()) for v in VERDICTS}
                        for t in VERDICTS} if n else {}
    if n and "subject" in cells.columns:  # agreement per subject: where the figure above comes from
        out["by_subject"] = {str(s): _share(int((g.verdict == g.true_verdict).sum()), len(g))
                             for s, g in cells.groupby("subject", sort=False)}
    return out


def calibrate(trials: List[dict], jobs: int = 1) -> tuple[JudgeConfig, dict]:
    """The candidate thresholds with the best balanced recall (ties: agreement) on ``trials``,
    the candidates judged on ``jobs`` processes."""
    cfgs = [replace(TRUTH_RULES, **dict(zip(CANDIDATES, values))) for values in product(*CANDIDATES.values())]
    best, best_key = None, None
    for cfg, (balanced, agreement) in zip(cfgs, truth_search.keys(trials, cfgs, jobs)):
        # Ties go to the candidate nearest the truth's own bars (MEANING).
        nearest = -sum(abs(getattr(cfg, k) - MEANING[k]) for k in CANDIDATES)
        key = (balanced, agreement, nearest)
        if best_key is None or key > best_key:
            best, best_key = cfg, key
    noise, regret = choose_pick_noise(trials, best)
    return replace(best, pick_noise=noise), {"candidates": CANDIDATES, "tried": len(cfgs),
                                             "balanced_recall": round(best_key[0], 4),
                                             "agreement": round(best_key[1], 4),
                                             "pick_noise": {"candidates": PICK_NOISE, "within_5pct": regret}}


PICK_NOISE = [0.0, 0.5, 1.0, 2.0]  # tie margins of the pick, in standard errors of the likeness


def choose_pick_noise(trials: List[dict], cfg: JudgeConfig) -> tuple[float, dict]:
    """The pick's tie margin with the most calibration picks within 5% of their trial's true
    best (ties: the smaller margin)."""
    scores = {}
    for noise in PICK_NOISE:
        _, picks = judged_cells(trials, replace(cfg, pick_noise=noise))
        scores[noise] = sum(1 for p in picks if p["true_share"] is not None and p["true_share"] >= 0.95
                            and p["pick_true_verdict"] != "overfit")
    best = max(PICK_NOISE, key=lambda n: (scores[n], -n))
    return best, {str(k): v for k, v in scores.items()}


def validation_loss(trials: List[dict], picks: List[dict]) -> dict:
    """How often the epoch with the lowest validation loss is the true best epoch, beside lora_lab's pick."""
    by_trial = {(p["subject"], p["trial"]): p for p in picks}
    rows = []
    for t in trials:
        p = by_trial[(t["subject"], t["trial"])]
        if not t["validation_loss"] or p["true_best"] is None:
            continue
        val_epoch = min(t["validation_loss"], key=t["validation_loss"].get)
        rows.append({"trial": f"{t['subject']}/{t['trial']}", "true_best_epoch": p["true_best"]["epoch"],
                     "validation_loss_epoch": val_epoch, "lora_lab_epoch": p["pick"] and p["pick"]["epoch"],
                     "validation_loss_last_epoch_lowest": val_epoch == max(t["validation_loss"])})
    n = len(rows)
    return {"trials": n,
            "validation_loss_picks_true_best_epoch": _share(sum(r["validation_loss_epoch"] == r["true_best_epoch"]
                                                                for r in rows), n),
            "lora_lab_picks_true_best_epoch": _share(sum(r["lora_lab_epoch"] == r["true_best_epoch"] for r in rows), n),
            "lowest_at_last_epoch": sum(r["validation_loss_last_epoch_lowest"] for r in rows),
            "by_trial": rows}


def disagreement_page(cells: pd.DataFrame, trials: List[dict], split: Dict[str, str], out: Path) -> Path:
    """An HTML page of every cell where the verdicts part, with its images and both reasons."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    scores = {(t["subject"], t["trial"]): t["scores"] for t in trials}
    rows = []
    for _, c in cells[cells.verdict != cells.true_verdict].iterrows():
        s = scores[(c.subject, c.trial)]
        images = []
        for prompt, g in s.groupby("prompt", sort=False):
            base = g[g.strength == 0].drop_duplicates("image")  # the base rows repeat once per epoch
            shown = pd.concat([base, g[(g.epoch == c.epoch) & (g.strength == c.strength)]])
            images.append((prompt, [{"src": os.path.relpath(Path(p).resolve(), out.resolve()),
                                     "label": ("base" if st == 0 else f"s{st:g}") + f" seed {seed}"}
                                    for p, st, seed in zip(shown.image, shown.strength, shown.seed)]))
        rates = [(k.replace("true_adherence::", "asked: "), f"{c[k]:.0%}") for k in cells.columns
                 if (k.startswith("shows_") or k.startswith("true_adherence::")) and pd.notna(c[k])]
        rows.append({**c.to_dict(), "split": split[c.subject], "rates": rates, "images": images,
                     "anchor": f"{c.subject}-{c.trial}-e{c.epoch}-s{c.strength:g}"})
    env = Environment(loader=FileSystemLoader(str(Path(__file__).parent / "templates")), autoescape=select_autoescape(default=True))
    page = out / "disagreements.html"
    page.write_text(env.get_template("disagreements.html.j2").render(cells=rows, total=len(cells)),
                    encoding="utf-8")
    return page


class Reading:
    """The read-out's view of each finished study and the threshold search on the calibration
    subjects. :func:`run_studies` hands it the cores that the last studies leave free
    (:meth:`step`: one subject, or the search, at a time, on those cores' threads);
    :meth:`finish` does what is left once every study is done. The same figures either way:
    only when they are computed changes."""

    def __init__(self, root: Path, cache_dir: Path, sources: Dict[str, str], calibration: List[str]):
        self.root, self.cache_dir, self.sources, self.calibration = root, cache_dir, sources, calibration
        self.readout, self.second = assets.load_readout(), assets.load_readout2()
        self.trials: Dict[str, List[dict]] = {}
        self.chosen: Optional[tuple] = None
        self.busy_s = 0.0

    def _collect(self, name: str) -> None:
        self.trials[name] = collect(self.root, name, self.cache_dir, self.readout, self.sources[name],
                                    second=self.second)

    def step(self, finished: List[str], threads: int) -> bool:
        """One piece of work on ``threads`` free cores; whether more is left for now."""
        import torch

        started, before = time.perf_counter(), torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            todo = [n for n in finished if n not in self.trials]
            if todo:
                self._collect(todo[0])
                return True
            if self.calibration and self.chosen is None and all(n in self.trials for n in self.calibration):
                self.chosen = self._calibrate(threads)
            return False
        finally:
            torch.set_num_threads(before)
            self.busy_s += time.perf_counter() - started

    def _calibrate(self, jobs: int) -> tuple:
        cal = [t for n in self.calibration for t in self.trials[n]]
        if not cal:
            raise SystemExit("error: a split has no finished trial: there is no figure to report")
        return calibrate(cal, jobs)

    def finish(self, calibration: List[str], heldout: List[str], jobs: int) -> tuple:
        """({split: trials}, (chosen thresholds, search) or None without calibration subjects)
        once every study is done."""
        for name in list(calibration) + list(heldout):
            if name not in self.trials:
                self._collect(name)
        trials = {part: [t for n in names for t in self.trials[n]]
                  for part, names in (("calibration", calibration), ("heldout", heldout)) if names}
        if not all(trials.values()) or "heldout" not in trials:
            raise SystemExit("error: a split has no finished trial: there is no figure to report")
        if not calibration:
            return trials, None
        return trials, self.chosen or self._calibrate(jobs)


def shipped_thresholds() -> JudgeConfig:
    """The judge ``model=toyworld`` ships (conf/model/toyworld.yaml), which the studies ran with."""
    from lora_lab.cli import compose

    return compose(["model=toyworld", "data=toyworld"]).eval.judge


def thresholds_record(chosen: Optional[tuple]) -> tuple[JudgeConfig, dict]:
    """The thresholds to judge with and how they came: the shipped ones, or those chosen on
    calibration with where they differ from the shipped ones."""
    shipped = shipped_thresholds()
    if chosen is None:
        return shipped, {**asdict(shipped), "source": "shipped (conf/model/toyworld.yaml); --full chooses them"}
    cfg, search = chosen
    differ = {k: {"chosen": v, "shipped": getattr(shipped, k)} for k, v in asdict(cfg).items()
              if v != getattr(shipped, k)}
    return cfg, {**asdict(cfg), "search": search, "source": "chosen on the calibration subjects",
                 "same_as_shipped": not differ, "differ_from_shipped": differ}


def run(args) -> dict:
    """The whole benchmark; writes truth.json and prints its figures."""
    args.root = Path(args.out).resolve() / "truth"  # the studies; truth.json goes beside the folder
    args.root.mkdir(parents=True, exist_ok=True)
    full = bool(getattr(args, "full", False) or getattr(args, "calibration", None))
    asked = list(getattr(args, "calibration", None) or CALIBRATION) if full else []
    sources = subject_sources(asked + list(args.heldout))
    calibration = list(subject_sources(asked)) if asked else []
    heldout = list(subject_sources(list(args.heldout)))
    if set(calibration) & set(heldout):
        raise SystemExit(f"error: {sorted(set(calibration) & set(heldout))[0]!r} is both a calibration and a "
                         "held-out subject; a held-out figure needs subjects no choice looked at")
    reading = Reading(args.root, Path(args.cache_dir), sources, calibration)
    sweep_s = run_studies(args, sources, on_idle=reading.step)
    trials, searched = reading.finish(calibration, heldout, getattr(args, "jobs", 1))
    chosen, thresholds = thresholds_record(searched)
    split = {n: "calibration" for n in calibration} | {n: "heldout" for n in heldout}
    parts = [part for part in ("calibration", "heldout") if part in trials]
    everything = [t for part in parts for t in trials[part]]
    # sweep_s is this invocation's (a rerun resumes finished studies), reading_while_studies_s
    # the reading and calibration done in it on cores the last studies left free; trials_s is
    # what the trials took when they ran.
    result = {"run": "full" if full else "default",
              "sweep_s": round(sweep_s, 1), "reading_while_studies_s": round(reading.busy_s, 1),
              "trials_s": round(sum(t["duration_s"] for t in everything), 1),
              "split": {"calibration": calibration, "heldout": heldout},
              "truth_rules": {"underfit_gain": TRUTH_RULES.underfit_gain, "adherence_drop": TRUTH_RULES.adherence_drop},
              "thresholds": thresholds}
    all_cells, all_picks = [], []
    for part in parts:
        cells, picks = judged_cells(trials[part], chosen)
        result[part] = figures(cells, picks)
        result[part]["picks"] = picks
        result[part]["where_readouts_agree"] = where_readouts_agree(cells, picks, figures)
        result[part]["second_readout_as_judge"] = second_readout_as_judge(trials[part], figures)
        # the same thresholds with every likeness prompt counted (eval.judge.likeness_prompt_gain 0)
        every, every_picks = judged_cells(trials[part], replace(chosen, likeness_prompt_gain=0.0))
        result[part]["every_likeness_prompt"] = {k: v for k, v in figures(every, every_picks).items()
                                                 if k in ("agreement", "recall", "picks_regret")}
        result[part]["leakage"] = leakage_figures(cells, trials[part])
        all_cells.append(cells.assign(split=part))
        all_picks += picks
    cells = pd.concat(all_cells, ignore_index=True)
    result["pruning"] = pruning(everything, chosen, cells, split)
    result["validation_loss"] = validation_loss(everything, all_picks)
    result["readouts"] = readout_figures(everything)
    cells.to_csv(args.root / "truth_cells.csv", index=False)
    page = disagreement_page(cells, everything, split, args.root)
    out = args.root.parent / "truth.json"
    out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    print(text(result))
    print(f"\nevery cell, both verdicts: {args.root / 'truth_cells.csv'}\ndisagreements: {page}\nfigures: {out}")
    return result
