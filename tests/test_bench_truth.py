"""The truth benchmark: its figures from constructed cells, its pruner replay, and a small real run."""

from __future__ import annotations

import json
import math
import sys

import pandas as pd
import pytest

from conftest import run_cli
from lora_lab.bench import truth as truthbench
from lora_lab.bench import truth_search
from lora_lab.bench import truth_checks
from lora_lab.bench import truth_pruning


def test_wilson_interval_matches_the_textbook_values():
    assert truthbench.wilson(8, 10) == pytest.approx([0.4902, 0.9433], abs=1e-4)
    assert truthbench.wilson(0, 10)[0] == 0.0 and truthbench.wilson(10, 10)[1] == 1.0
    assert truthbench.wilson(0, 0) == [None, None]


def test_figures_count_recall_precision_and_picks():
    cells = pd.DataFrame({"true_verdict": ["underfit", "underfit", "good", "good", "overfit", "overfit"],
                          "verdict": ["underfit", "good", "good", "good", "overfit", "good"]})
    picks = [{"rank": 1, "true_share": 1.0, "pick_true_verdict": "good"},
             {"rank": 4, "true_share": 0.96, "pick_true_verdict": "good"},
             {"rank": 2, "true_share": 1.02, "pick_true_verdict": "overfit"},
             {"rank": None, "true_share": None, "pick_true_verdict": None}]
    f = truthbench.figures(cells, picks)
    assert f["count"] == {"underfit": 2, "good": 2, "overfit": 2}
    assert f["agreement"]["value"] == pytest.approx(4 / 6, abs=1e-4) and f["agreement"]["n"] == 6
    assert f["recall"]["overfit"]["value"] == 0.5 and f["recall"]["good"]["value"] == 1.0
    assert f["precision"]["good"]["value"] == 0.5  # 2 of the 4 cells called good are good
    assert f["picks_in_true_top3"]["value"] == pytest.approx(2 / 4, abs=1e-4)  # no pick counts as a miss
    # picks.regret: within 5% of the true best, and not truly overfit (a pick that loses an ask is a miss)
    assert f["picks_regret"]["within_5pct"]["value"] == pytest.approx(2 / 4) and f["picks_regret"]["worst_share"] == 0.96
    assert f["confusion"]["overfit"] == {"underfit": 0, "good": 1, "overfit": 1}
    assert "by_subject" not in f  # cells without a subject column
    by = truthbench.figures(cells.assign(subject=["a", "a", "a", "b", "b", "b"]), picks)["by_subject"]
    assert by["a"]["value"] == pytest.approx(2 / 3, abs=1e-4) and by["b"]["value"] == pytest.approx(2 / 3, abs=1e-4)
    assert by["a"]["n"] == 3 and list(by) == ["a", "b"]


def _truth_table(a_verdicts, a_combined, b_verdicts, b_combined):
    """A trial's truth: the base cell and one LoRA cell per value, epochs 1.., strength 1."""
    n = len(a_verdicts)
    return pd.DataFrame({"epoch": [0] + list(range(1, n + 1)), "label": ["base"] + [f"e{i}" for i in range(1, n + 1)],
                         "strength": [0.0] + [1.0] * n,
                         "true_verdict": ["base"] + a_verdicts, "true_combined": [float("nan")] + a_combined,
                         "true_verdict_b": ["base"] + b_verdicts, "true_combined_b": [float("nan")] + b_combined})


def test_the_second_read_out_is_scored_as_a_judge_against_the_first():
    trials = [  # B picks epoch 1 (its best), 1.9 of A's 2.0: within 5%; one verdict parts
        {"subject": "a", "trial": "trial_0",
         "truth": _truth_table(["good", "good", "underfit"], [1.9, 2.0, 1.1],
                               ["good", "good", "good"], [2.0, 1.8, 1.2])},
        # B's best (epoch 2) is truly overfit for A: a miss; A's best non-overfit is epoch 1
        {"subject": "b", "trial": "trial_0",
         "truth": _truth_table(["good", "overfit", "good"], [1.8, 2.2, 1.5],
                               ["good", "good", "good"], [1.5, 2.0, 1.9])},
        # ties in B's score go to the earliest epoch (as the judge's pick): epoch 1, 1.5 of A's 2.0
        {"subject": "b", "trial": "trial_1",
         "truth": _truth_table(["good", "good"], [1.5, 2.0], ["good", "good"], [1.7, 1.7])}]
    f = truth_checks.second_readout_as_judge(trials, truthbench.figures)
    assert f["cells"] == 8 and f["trials"] == 3
    assert f["agreement"]["value"] == pytest.approx(6 / 8, abs=1e-4)  # a's epoch 3 and b's epoch 2 part
    assert f["recall"]["overfit"]["value"] == 0.0 and f["recall"]["underfit"]["value"] == 0.0
    assert f["picks_regret"]["within_5pct"]["value"] == pytest.approx(1 / 3, abs=1e-4)
    assert f["picks_regret"]["worst_share"] == 0.75
    assert [(m["subject"], m["trial"], m["pick"]["epoch"], m["pick_true_verdict"]) for m in f["picks_missed"]] == \
        [("b", "trial_0", 2, "overfit"), ("b", "trial_1", 1, "good")]
    assert f["by_subject"]["a"]["value"] == pytest.approx(2 / 3, abs=1e-4)
    assert truth_checks.second_readout_as_judge([{"subject": "a", "trial": "t", "truth": trials[0]["truth"].drop(
        columns=["true_combined_b"])}], truthbench.figures) == {}  # one read-out only: no figure


def test_calibration_ties_go_to_the_thresholds_that_mean_what_the_truth_means(monkeypatch):
    # Every candidate judges alike: the tie-break alone chooses. An ask is truly lost below 80%
    # of the base model's share, so ask_drop goes to 0.2, not to the shipped default (0.5); the
    # other thresholds to the truth's own values.
    seen = []
    monkeypatch.setattr(truth_search, "keys", lambda trials, cfgs, jobs: seen.append(jobs) or [(0.5, 0.5)] * len(cfgs))
    monkeypatch.setattr(truthbench, "judged_cells", lambda trials, cfg: (pd.DataFrame(), []))
    chosen, search = truthbench.calibrate([], jobs=2)
    assert (chosen.ask_drop, chosen.underfit_gain, chosen.adherence_drop) == (0.2, 0.3, 0.2)
    assert (chosen.diversity_drop, chosen.copy_threshold) == (0.5, 0.95)
    assert truthbench.MEANING["ask_drop"] == truthbench.TRUTH_RULES.adherence_drop == 0.2
    assert search["tried"] == 13 * 6 * 10 * 2 * 2 and search["balanced_recall"] == 0.5 and seen == [2]


def test_the_default_run_judges_with_the_shipped_thresholds_and_full_says_where_it_chose_otherwise():
    from dataclasses import replace

    from pathlib import Path

    from omegaconf import OmegaConf

    shipped = OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "model" / "toyworld.yaml").eval.judge
    cfg, record = truthbench.thresholds_record(None)  # the default run: nothing searched
    for key in ("underfit_gain", "adherence_drop", "ask_drop", "pick_noise", "diversity_drop", "copy_threshold"):
        assert getattr(cfg, key) == shipped[key] == record[key]
    assert record["source"].startswith("shipped") and "search" not in record
    # what differs from the real-model defaults is only what the calibration search chooses
    searched = set(truthbench.CANDIDATES) | {"pick_noise"}
    assert replace(truthbench.TRUTH_RULES, **{k: getattr(cfg, k) for k in searched}) == cfg
    _, same = truthbench.thresholds_record((cfg, {"tried": 1}))
    assert same["same_as_shipped"] and same["differ_from_shipped"] == {} and same["search"] == {"tried": 1}
    _, other = truthbench.thresholds_record((replace(cfg, underfit_gain=0.3), {"tried": 1}))
    assert not other["same_as_shipped"] and other["underfit_gain"] == 0.3
    assert other["differ_from_shipped"] == {"underfit_gain": {"chosen": 0.3, "shipped": 0.45}}


def _trial(likeness, true_verdicts):
    """A trial of a base cell and LoRA cells at strength 1 with the given likeness (base 0.2,
    ceiling 0.8), its truth rows in the reverse order of its aggregated rows."""
    rows = [{"epoch": 1, "label": "e1", "strength": 0.0, "likeness": 0.2}] + [
        {"epoch": e, "label": f"e{e}", "strength": 1.0, "likeness": v} for e, v in enumerate(likeness, 1)]
    agg = pd.DataFrame([{**r, "face_rate": 1.0, "adherence": 28.0, "copy_similarity": 0.5, "copy_reference": "a.png",
                         "diversity": 0.3} for r in rows])
    truth = pd.DataFrame([{"epoch": r["epoch"], "label": r["label"], "strength": r["strength"], "true_verdict": v}
                          for r, v in zip(rows, ["base"] + list(true_verdicts))][::-1])
    return {"agg": agg, "ceiling": 0.8, "truth": truth}


def test_the_threshold_search_counts_each_candidate_alike_on_one_process_or_two():
    from dataclasses import replace

    from lora_lab.config import JudgeConfig

    # gains 0.1, 0.4, 0.7 and 0.05, 0.5 (of the way from 0.2 to 0.8)
    trials = [_trial([0.26, 0.44, 0.62], ["underfit", "good", "good"]), _trial([0.23, 0.5], ["underfit", "overfit"])]
    cfgs = [replace(JudgeConfig(), underfit_gain=g) for g in (0.02, 0.3, 0.45, 0.6, 0.9)]
    one = truth_search.keys(trials, cfgs, jobs=1)
    assert truth_search.keys(trials, cfgs, jobs=2) == one  # the same answers, in candidate order
    # at 0.3: both underfit cells caught (recall 1), both good cells good (1), the overfit cell
    # called good (0): balanced 2/3, 4 of 5 agree; at 0.02 only the goods are right, at 0.9
    # only the underfits; at 0.45 the good cell of gain 0.4 is lost
    assert one[1] == pytest.approx((2 / 3, 4 / 5))
    assert one[0] == pytest.approx((1 / 3, 2 / 5)) and one[4] == pytest.approx((1 / 3, 2 / 5))
    assert one[2] == pytest.approx(((1 + 0.5) / 3, 3 / 5))
    counts = truth_search.confusion([(t["agg"], t["ceiling"], *truth_search.aligned(t)) for t in trials], cfgs[1])
    assert counts.tolist() == [[2, 0, 0], [0, 2, 0], [0, 1, 0]]  # true by said: underfit, good, overfit


def test_the_pruner_replay_feeds_optuna_the_recorded_checks():
    import optuna

    trials = [{"trial_key": f"s/trial_{i}"} for i in range(4)]
    values = {"s/trial_0": {1: 1.0, 2: 1.2}, "s/trial_1": {1: 1.1, 2: 1.3},
              "s/trial_2": {1: 0.2, 2: 0.3}, "s/trial_3": {1: 1.5, 2: 1.6}}
    finals = {"s/trial_0": 1.3, "s/trial_1": 1.4, "s/trial_2": 0.4, "s/trial_3": 1.7}
    make = lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)  # noqa: E731
    out = truth_pruning.replay_pruner(make, {"s": trials}, values, finals, {"s": ["s/trial_3"]})
    assert out["pruned"] == ["s/trial_2"]  # below the median at epoch 1; trial 3 is above it
    assert out["trial_epochs_saved"] == pytest.approx(2 / 12, abs=1e-4)  # 3 epochs each; trial 2 stopped after 1
    assert out["true_best_pruned"] == 0
    lost = truth_pruning.replay_pruner(make, {"s": trials}, values, finals, {"s": ["s/trial_2"]})
    assert lost["true_best_pruned"] == 1
    # trial 2 ties trial 1 for the true best: trial 1 is kept, so nothing is lost
    tied = truth_pruning.replay_pruner(make, {"s": trials}, values, finals, {"s": ["s/trial_1", "s/trial_2"]})
    assert tied["true_best_pruned"] == 0


def test_the_true_best_trial_keeps_ties_and_skips_truly_overfit_cells():
    cells = pd.DataFrame([
        {"subject": "s", "trial": "trial_0", "true_combined": math.nan, "true_verdict": "base"},
        {"subject": "s", "trial": "trial_0", "true_combined": 1.85, "true_verdict": "good"},
        {"subject": "s", "trial": "trial_1", "true_combined": 1.7, "true_verdict": "good"},
        {"subject": "s", "trial": "trial_1", "true_combined": 1.9, "true_verdict": "overfit"},  # not a keeper
        {"subject": "s", "trial": "trial_2", "true_combined": 1.8500000000000001, "true_verdict": "good"},
        {"subject": "t", "trial": "trial_0", "true_combined": 1.2, "true_verdict": "overfit"},
        {"subject": "t", "trial": "trial_1", "true_combined": 1.4, "true_verdict": "overfit"},
    ])
    assert truth_pruning.true_best_trials(cells, "s") == ["s/trial_0", "s/trial_2"]
    assert truth_pruning.true_best_trials(cells, "t") == ["t/trial_1"]  # every cell overfit: all count


@pytest.mark.slow
def test_a_small_truth_run_writes_every_documented_key(tmp_path):
    # One calibration and one held-out subject, two settings, two epochs, two seeds, 4 steps:
    # small, but the whole path (studies, read-out, calibration, pruning, validation, page).
    # The held-out subject is given as a file of one's own (here a copy of dax's).
    from lora_lab.toyworld.subjects import subject_path

    mine = tmp_path / "mydax.yaml"
    mine.write_text(subject_path("dax").read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / "bench"
    proc = run_cli(
        [sys.executable, "-m", "lora_lab.bench", "truth", "--out", str(out), "--jobs", "2", "--calibration", "sks",
         "--heldout", str(mine), "--cache-dir", str(tmp_path / "cache"),
         "sweep.variants={a:{train.learning_rate:1e-3},b:{train.learning_rate:1e-2}}",
         "sweep.fixed={train.epochs:2,data.repeats:1,data.validation_split:0.25}",
         "eval.seeds=[1,2]", "eval.steps=4", "eval.strengths=[0,1]"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = json.loads((out / "truth.json").read_text())
    for part in ("heldout", "calibration"):
        f = doc[part]
        assert f["trials"] == 2 and f["cells"] == 4  # 2 trials x 2 epochs x strength 1
        assert set(f["recall"]) == set(f["count"]) == {"underfit", "good", "overfit"}
        assert sum(f["count"].values()) == 4
        assert set(f["agreement"]) == {"value", "ci95", "n"} and set(f["picks_in_true_top3"]) == {"value", "ci95", "n"}
        assert set(f["picks_regret"]["within_5pct"]) == {"value", "ci95", "n"} and f["picks_regret"]["within_5pct"]["n"] == 2
        shares = [pick["true_share"] for pick in f["picks"] if pick["true_share"] is not None]
        assert all(x >= 0 for x in shares)  # a share of the trial's true best
    assert {"underfit_gain", "adherence_drop", "diversity_drop", "copy_threshold"} <= set(doc["thresholds"])
    assert doc["run"] == "full" and doc["thresholds"]["source"] == "chosen on the calibration subjects"
    assert doc["thresholds"]["same_as_shipped"] == (doc["thresholds"]["differ_from_shipped"] == {})
    assert set(doc["pruning"]) >= {"spearman_by_epoch", "pruners", "true_best"}
    assert len(doc["pruning"]["true_best"]) == 2 and all(doc["pruning"]["true_best"].values())
    now = doc["pruning"]["pruners"]["heldout"]["25th percentile, 1 warm-up epoch"]
    assert set(now) >= {"trial_epochs_saved", "true_best_pruned"}
    assert doc["validation_loss"]["trials"] == 4
    assert set(doc["validation_loss"]) >= {"validation_loss_picks_true_best_epoch", "lora_lab_picks_true_best_epoch"}
    for where in ("training_drawings", "base_renders", "lora_renders"):  # the second read-out's check
        shares = doc["readouts"][where]["by_attribute"]
        assert set(shares) >= {"hair_colour", "hair_style", "background"} and all(0 <= v <= 1 for v in shares.values())
    assert doc["readouts"]["lora_renders"]["images"] == 2 * 2 * 2 * 5 * 2  # subjects x trials x epochs x prompts x seeds
    assert doc["reading_while_studies_s"] >= 0 and doc["sweep_s"] >= doc["reading_while_studies_s"]
    second = doc["heldout"]["second_readout_as_judge"]  # the truth's resolution, beside lora_lab's figures
    assert second["cells"] == 4 and second["picks_regret"]["within_5pct"]["n"] == 2
    assert 0 <= second["agreement"]["value"] <= 1 and "second read-out as if it were a judge" in proc.stdout
    agree = doc["heldout"]["where_readouts_agree"]
    assert agree["cells"] + agree["cells_where_readouts_part"] == 4
    leak = doc["heldout"]["leakage"]  # dax's drawings share one uncaptioned yellow background
    assert leak["subjects"] == {"mydax": {"background": "yellow"}} and leak["of"] == 4
    assert sum(leak["lora_lab_verdicts"].values()) == leak["cells"]
    assert doc["calibration"]["leakage"]["subjects"] == {}  # sks's captions name its backgrounds
    cells = pd.read_csv(out / "truth" / "truth_cells.csv")
    assert len(cells) == 8 and set(cells.split) == {"calibration", "heldout"}
    assert {"true_verdict_b", "leaks", "true_leak"} <= set(cells.columns)
    page = (out / "truth" / "disagreements.html").read_text()
    parted = int((cells.verdict != cells.true_verdict).sum())
    assert page.count('<div class="cell"') == parted
    assert "[&#39;" not in page  # reasons read as sentences, not Python lists
    if parted:
        first = page.split('<div class="cell"')[1]
        assert first.count(">base seed 1<") == 5  # the base model's image once per prompt (5 prompts)
    assert "agreement" in proc.stdout and "held out mydax" in proc.stdout and (out / "truth" / "truth_mydax").is_dir()
    assert "picks within 5% of the trial's true best" in proc.stdout
    for name in ("sks", "mydax"):  # two studies at once, each one's output in its own file
        assert f"study truth_{name}:" in (out / "truth" / f"truth_{name}.log").read_text()
        assert f"subject {name}: done in" in proc.stdout

    # The default run: the held-out study only (here resumed, not trained again), judged with
    # the shipped thresholds; no calibration figures
    proc = run_cli(
        [sys.executable, "-m", "lora_lab.bench", "truth", "--out", str(out), "--heldout", str(mine),
         "--cache-dir", str(tmp_path / "cache"),
         "sweep.variants={a:{train.learning_rate:1e-3},b:{train.learning_rate:1e-2}}",
         "sweep.fixed={train.epochs:2,data.repeats:1,data.validation_split:0.25}",
         "eval.seeds=[1,2]", "eval.steps=4", "eval.strengths=[0,1]"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    default = json.loads((out / "truth.json").read_text())
    assert default["run"] == "default" and "calibration" not in default and default["split"]["calibration"] == []
    assert default["thresholds"]["source"].startswith("shipped") and default["thresholds"]["underfit_gain"] == 0.45
    assert default["heldout"]["cells"] == 4 and default["validation_loss"]["trials"] == 2
    assert list(default["pruning"]["pruners"]) == ["heldout"]
    again = pd.read_csv(out / "truth" / "truth_cells.csv")
    assert set(again.split) == {"heldout"}
    # the same stored images, the same truth: only the thresholds can move a held-out figure
    key = ["trial", "epoch", "strength"]
    before = cells[cells.split == "heldout"].sort_values(key).reset_index(drop=True)
    again = again.sort_values(key).reset_index(drop=True)
    assert again[key + ["true_verdict", "true_verdict_b"]].equals(before[key + ["true_verdict", "true_verdict_b"]])
    assert (again.true_combined - before.true_combined).abs().max() < 1e-9
    assert "thresholds shipped with the toy world" in proc.stdout and "subject sks" not in proc.stdout


def test_a_study_that_fails_stops_the_benchmark_with_its_own_output(tmp_path):
    from types import SimpleNamespace

    from lora_lab.bench import studies

    args = SimpleNamespace(root=tmp_path, cache_dir=str(tmp_path / "cache"), overrides=[], jobs=2)
    with pytest.raises(SystemExit) as stop:
        studies.run_studies(args, {"sks": "sks", "vek": "vek"}, sweep="no_such_sweep")
    message = str(stop.value)
    assert "error: the no_such_sweep sweep of subject" in message and "stopped (exit 1)" in message
    assert "Could not find 'sweep/no_such_sweep'" in message.split("error: the")[0]  # the study's own output, above
    assert (tmp_path / "no_such_sweep_sks.log").exists()


def test_work_that_can_start_early_runs_while_the_last_study_leaves_a_core_free(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from lora_lab.bench import studies

    polls = {"a": 2, "b": 30, "c": 5}  # b runs longest: c starts when a is done, then only b is left
    events = []

    class FakeStudy:
        threads = "2"  # 4 cores, 2 jobs

        def __init__(self, cmd, env, stdout=None, stderr=None):
            self.name = next(a.split("=", 1)[1] for a in cmd if a.startswith("data.subject="))
            self.left = polls[self.name]
            assert env.get("OMP_NUM_THREADS") == self.threads
            events.append(("start", self.name))

        def poll(self):
            self.left -= 1
            return 0 if self.left <= 0 else None

    def on_idle(finished, threads):
        events.append(("idle", tuple(finished), threads))
        return len([e for e in events if e[0] == "idle"]) < 3  # three pieces of work, then nothing

    monkeypatch.setattr(studies.subprocess, "Popen", FakeStudy)
    monkeypatch.setattr(studies.time, "sleep", lambda s: None)
    monkeypatch.setattr(studies.os, "cpu_count", lambda: 4)
    args = SimpleNamespace(root=tmp_path, cache_dir=str(tmp_path / "cache"), overrides=[], jobs=2)
    studies.run_studies(args, {"a": "a", "b": "b", "c": "c"}, on_idle=on_idle)
    idle = [e for e in events if e[0] == "idle"]
    # never while a study waits to start; first after c is done (b still running), with one job's cores
    assert events.index(idle[0]) > events.index(("start", "c"))
    assert idle[0] == ("idle", ("a", "c"), 2)
    assert len(idle) == 3  # asked until it says nothing is left; b is still running then
    assert all(e[1] == ("a", "c") for e in idle)
    ran_alone = SimpleNamespace(root=tmp_path, cache_dir=str(tmp_path / "cache"), overrides=[], jobs=1)
    events.clear()
    polls.update(a=2, b=3, c=2)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    FakeStudy.threads = "7"  # one job: the study gets the environment's threads, and no core is ever free
    studies.run_studies(ran_alone, {"a": "a", "b": "b"}, on_idle=on_idle)
    assert not [e for e in events if e[0] == "idle"]
