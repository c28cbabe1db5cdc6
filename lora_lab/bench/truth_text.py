"""The truth benchmark's figures as the lines it prints (``truth.json`` holds every figure)."""

from __future__ import annotations

from lora_lab.bench.truth_rules import VERDICTS


def _pct(share: dict) -> str:
    if share["value"] is None:
        return "n/a (0 cases)"
    lo, hi = share["ci95"]
    return f"{share['value']:.1%} [{lo:.0%}, {hi:.0%}] of {share['n']}"


def text(r: dict) -> str:
    th = r["thresholds"]
    full = bool(r["split"]["calibration"])
    lines = ["", "truth benchmark: lora_lab's verdicts (the toy world's CLIP) against the read-out's ground truth",
             f"sweeps: {r['sweep_s']:.0f} s now ({r.get('reading_while_studies_s', 0):.0f} s of it reading finished "
             f"studies on cores the last ones left free), the trials took {r['trials_s']:.0f} s; "
             + (f"calibration subjects {', '.join(r['split']['calibration'])}; " if full else "")
             + f"held out {', '.join(r['split']['heldout'])}",
             (f"thresholds chosen on calibration ({th['search']['tried']} candidates" + (
                 ", the shipped ones" if th["same_as_shipped"] else ", NOT the shipped ones: " + ", ".join(
                     f"{k} {d['chosen']} (shipped {d['shipped']})" for k, d in th["differ_from_shipped"].items()))
              if full else "thresholds shipped with the toy world (conf/model/toyworld.yaml; --full chooses them again "
                           "on the calibration subjects")
             + f"): underfit_gain {th['underfit_gain']:g}, adherence_drop {th['adherence_drop']:g}, ask_drop "
             f"{'off' if th['ask_drop'] >= 1 else th['ask_drop']}, pick_noise {th['pick_noise']:g}, diversity check "
             f"{'off' if th['diversity_drop'] >= 1 else th['diversity_drop']}, copy check "
             f"{'off' if th['copy_threshold'] >= 1 else th['copy_threshold']}"]
    for part in [p for p in ("heldout", "calibration") if p in r]:
        f = r[part]
        lines += ["", f"{part} ({f['trials']} trials, {f['cells']} cells), 95% intervals:",
                  f"  agreement {_pct(f['agreement'])} (target 90%)",
                  f"  picks in the true top 3: {_pct(f['picks_in_true_top3'])} (target 90%)",
                  f"  picks within 5% of the trial's true best (picks.regret): {_pct(f['picks_regret']['within_5pct'])}"
                  f" (target 90%); median share {f['picks_regret']['median_share']}, worst "
                  f"{f['picks_regret']['worst_share']}"]
        for v in VERDICTS:
            lines.append(f"  {v:8s} true cells {f['count'][v]:3d}; recall {_pct(f['recall'][v])}; "
                         f"precision {_pct(f['precision'][v])}")
        if f.get("by_subject"):
            lines.append("  agreement by subject: " + ", ".join(f"{s} {b['value']:.1%}"
                                                               for s, b in f["by_subject"].items()))
        w = f.get("where_readouts_agree") or {}
        if w:
            lines.append(f"  on the {w['cells']} cells where the second read-out gives the same true verdict "
                         f"({w['cells_where_readouts_part']} part): agreement {_pct(w['agreement'])}; recall "
                         + ", ".join(f"{v} {_pct(w['recall'][v])}" for v in VERDICTS))
        b = f.get("second_readout_as_judge") or {}
        if b:
            lines.append(f"  the second read-out as if it were a judge (the truth's own resolution): agreement "
                         f"{_pct(b['agreement'])}; picks within 5% {_pct(b['picks_regret']['within_5pct'])}; "
                         f"in the true top 3 {_pct(b['picks_in_true_top3'])}")
        k = f.get("leakage") or {}
        if k.get("of"):
            lines.append(f"  leakage (the training drawings' uncaptioned background where no prompt asks for it): "
                         f"{k['cells']} of {k['of']} cells of {', '.join(k['subjects'])}; lora_lab called them "
                         + ", ".join(f"{v} {n}" for v, n in k["lora_lab_verdicts"].items()))
    p = r["pruning"]
    lines += ["", "pruning: Spearman correlation of the per-epoch check with the final objective, by epoch"]
    for label, by_epoch in p["spearman_by_epoch"].items():
        lines.append(f"  check {label:7s} " + ", ".join(f"epoch {e}: {v}" for e, v in by_epoch.items()))
    for part, pruners in p["pruners"].items():
        lines.append(f"  {part}: " + "; ".join(f"{name}: saves {v['trial_epochs_saved']:.0%}, true best pruned "
                                                f"{v['true_best_pruned']} of {v['studies']}"
                                                for name, v in pruners.items() if v["trial_epochs_saved"] is not None))
    if p.get("true_best"):  # a study's best is lost only when every trial tied for it is pruned
        lines.append("  each study's true best trial (ties: all of them): " + "; ".join(
            f"{name} {', '.join(key.split('/', 1)[1] for key in keys)}" for name, keys in p["true_best"].items()))
    ro = r.get("readouts") or {}
    if ro:
        lines += ["", "the two read-outs read the same, by attribute (training drawings / base renders / LoRA renders):"]
        for a in ro["lora_renders"]["by_attribute"]:
            lines.append(f"  {a:12s} " + " / ".join(f"{ro[k]['by_attribute'][a]:.1%}"
                                                   for k in ("training_drawings", "base_renders", "lora_renders")))
    v = r["validation_loss"]
    if v["trials"]:
        lines += ["", f"validation loss: its lowest epoch is the true best epoch in "
                      f"{_pct(v['validation_loss_picks_true_best_epoch'])} trials; lora_lab's pick in "
                      f"{_pct(v['lora_lab_picks_true_best_epoch'])}; lowest at the last epoch in "
                      f"{v['lowest_at_last_epoch']} of {v['trials']}"]
    return "\n".join(lines)
