"""``python -m lora_lab.calibrate``: label files read and refused, thresholds chosen from labels on
a constructed study (known gains and asked-change drops), the study rewritten with the chosen
judge, and the judge file taken back by ``eval.judge=FILE``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lora_lab.calibrate.labels import LabelError, read_labels
from lora_lab.calibrate.run import calibrate, main
from lora_lab.calibrate.search import labels_for_interval, next_cells, verdict_table
from lora_lab.calibrate.study import load_study
from lora_lab.config import JudgeConfig
from lora_lab.numbers import wilson

RED = "adherence::photo of sks with red hair"
STRENGTHS = (0.5, 1.0, 1.5)
START = JudgeConfig(underfit_gain=0.6, adherence_drop=0.1)  # what the study was judged with: far from the eye
FACTOR = {0: 0.12, 1: 0.11}  # gain = factor * epoch * strength (a cell's share of the way to the ceiling)


def _drop(epoch: int, strength: float) -> float:
    """How much the red-hair ask fades: 40% at strength 1.5 from epoch 3, 22% at 1.0 on epoch 4."""
    if strength == 1.5 and epoch >= 3:
        return 0.40
    if strength == 1.0 and epoch == 4:
        return 0.22
    return 0.0


def eye(trial: int, epoch: int, strength: float) -> str:
    """The user's own verdict: overfit when the ask fades by more than 30%, underfit below 30% of the way."""
    if _drop(epoch, strength) > 0.3:
        return "overfit"
    return "underfit" if FACTOR[trial] * epoch * strength < 0.3 else "good"


def _row(epoch, strength, gain, drop):
    red = 28.0 * (1 - drop)
    return {"epoch": epoch, "label": f"t-{epoch:06d}", "strength": strength, "likeness": 0.2 + 0.6 * gain,
            "likeness_se": 0.01, "face_rate": float("nan"), "clip_i": 0.5, "adherence": red, RED: red,
            "copy_similarity": 0.5, "copy_reference": "01.png", "diversity": 0.3}


@pytest.fixture()
def study(tmp_path) -> Path:
    """Two finished trials, epochs 1-4 x strengths 0 / 0.5 / 1 / 1.5, judged with START."""
    from lora_lab.evaluate.judge import judge, verdict_document

    root = tmp_path / "sweeps" / "cal"
    root.mkdir(parents=True)
    (root / "study.json").write_text(json.dumps({"name": "cal", "objective": "combined", "direction": "maximize",
                                                 "total_trials": 2}))
    (root / "sweep.yaml").write_text(f"sweep:\n  reports: {tmp_path / 'reports'}\n")
    for t, factor in FACTOR.items():
        tdir = root / f"trial_{t}"
        tdir.mkdir()
        agg = pd.DataFrame([_row(e, 0.0, 0.0, 0.0) for e in range(1, 5)]
                           + [_row(e, s, factor * e * s, _drop(e, s)) for e in range(1, 5) for s in STRENGTHS])
        judged = judge(agg, 0.8, START)
        doc = verdict_document(judged, 0.8, START, {f"t-{e:06d}": f"lora/t-{e:06d}.safetensors" for e in range(1, 5)},
                               ["CLIP: test"])
        (tdir / "verdict.json").write_text(json.dumps(doc))
        judged.assign(reasons=judged.reasons.map("; ".join)).to_csv(tdir / "scores_agg.csv", index=False)
        (tdir / "trial.json").write_text(json.dumps({"number": t, "state": "complete", "params": {"train.network_dim": 4 * (t + 1)},
                                                     "objective": 1.0, "reason": "old", "duration_s": 1.0}))
    return root


def _labels(path: Path, cells, study="cal") -> Path:
    path.write_text(json.dumps({"study": study, "labels": [
        {"study": study, "trial": t, "epoch": e, "strength": s, "label": eye(t, e, s), "when": "2026-12-06T10:00:00Z"}
        for t, e, s in cells]}))
    return path


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


TRIAL0 = [(0, e, s) for e in range(1, 5) for s in STRENGTHS]
TRIAL1 = [(1, e, s) for e in range(1, 5) for s in STRENGTHS]


def test_thresholds_chosen_from_labels_agree_on_cells_never_labelled(study, tmp_path):
    r = calibrate(study, [_labels(tmp_path / "labels.json", TRIAL0)])
    cfg = r["judge"]
    # labelled underfit gains reach 0.24, good ones start at 0.36: the middle of that plateau,
    # and an ask drop of 22% passes while 40% does not
    assert cfg.underfit_gain == 0.3 and cfg.adherence_drop in (0.25, 0.3)
    # the study's judge (underfit below 60%, an ask lost at a 10% drop) missed all 3 good cells
    assert r["after"]["value"] == 1.0 and r["before"]["hits"] == 9 and r["before"]["balanced"] == pytest.approx(2 / 3)
    assert r["confusion"]["before"]["good"] == {"underfit": 2, "good": 0, "overfit": 1}
    assert r["cv"]["n"] == 12 and r["cv"]["value"] >= 0.75
    assert r["confusion"]["after"]["overfit"] == {"underfit": 0, "good": 0, "overfit": 2}
    # trial 1 was never labelled: the chosen judge says what the eye would there too
    from lora_lab.evaluate.judge import judge

    t1 = load_study(study).trials[1]
    said = {(int(x.epoch), float(x.strength)): x.verdict for x in judge(t1.agg, t1.ceiling, cfg).itertuples()}
    assert all(said[(e, s)] == eye(1, e, s) for _, e, s in TRIAL1)
    # the next cells to label are unlabelled ones
    assert r["next"] and all((c["trial"], c["epoch"], c["strength"]) not in TRIAL0 for c in r["next"])


def test_cross_validation_predicts_each_label_without_it(study, tmp_path):
    # an eye that contradicts itself: gain 0.24 good, 0.36 underfit, 0.48 good
    (tmp_path / "odd.csv").write_text("trial,epoch,strength,label\n0,2,1,good\n0,3,1,underfit\n0,4,1,good\n")
    r = calibrate(study, [tmp_path / "odd.csv"])
    # fitted: a cut between 0.36 and 0.48 gets two of three; held out, each label is predicted
    # by a cut chosen on the other two, which the third contradicts
    assert r["judge"].underfit_gain == 0.4 and r["after"]["hits"] == 2
    assert r["cv"]["n"] == 3 and r["cv"]["hits"] < r["after"]["hits"]
    assert r["more_for_10_points"] > 0


def test_next_cells_are_the_least_certain_and_spread_over_trials(study):
    s = load_study(study)
    v = verdict_table(s, START)
    idx = v.index([(0, 4, 0.5)])
    picked = next_cells(v, idx, np.array([1], dtype=np.int8), 0, n=4)
    assert len(picked) == 4 and {c["trial"] for c in picked} == {0, 1}
    assert all(c["entropy"] > 0 for c in picked) and (0, 4, 0.5) not in [(c["trial"], c["epoch"], c["strength"])
                                                                          for c in picked]
    # a cell every setting calls the same (gain 0.055: underfit under every cut but 0.05) ranks last
    ranked = next_cells(v, idx, np.array([1], dtype=np.int8), 0, n=len(v.cells) - 1)
    assert ranked[-1]["entropy"] <= min(c["entropy"] for c in picked)


def test_plateau_scores_a_setting_by_its_neighbours_and_an_end_by_its_one_side():
    from lora_lab.calibrate.search import _plateau

    got = _plateau(np.array([0.0, 1.0, 1.0, 1.0, 1.0]), (5,))
    np.testing.assert_allclose(got, [0.5, 2 / 3, 1.0, 1.0, 1.0])  # the end ties the middle, never beats it
    grid = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    np.testing.assert_allclose(_plateau(grid.ravel(), grid.shape), [1.0, 2 / 3, 0.5, 1.0, 2 / 3, 0.5])


def test_labels_for_interval_is_the_first_count_inside_ten_points():
    more = labels_for_interval(0.8, 20)
    low, high = wilson(round(0.8 * (20 + more)), 20 + more)
    assert (high - low) / 2 < 0.10
    low, high = wilson(round(0.8 * (19 + more)), 19 + more)
    assert (high - low) / 2 >= 0.10
    assert labels_for_interval(0.8, 500) == 0


def test_the_command_rewrites_verdicts_report_and_keeps_the_old(study, tmp_path, capsys):
    before = json.loads((study / "trial_1" / "verdict.json").read_text())
    labels = _labels(tmp_path / "labels.json", TRIAL0)
    assert main([str(study), str(labels)]) == 0
    out = capsys.readouterr().out
    assert "12 labels (7 underfit, 3 good, 2 overfit)" in out
    assert "after             100% (95% CI 76%-100%), 12 of 12" in out and "still disagree: 0 of 12" in out
    assert "chosen judge: underfit_gain 0.3 (was 0.6)" in out
    judge_file = study / "judge.yaml"
    from lora_lab.config.judge_file import judge_values

    assert judge_values(judge_file)["underfit_gain"] == 0.3
    kept = list((study / "trial_1").glob("verdict.before-calibration-*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text()) == before
    after = json.loads((study / "trial_1" / "verdict.json").read_text())
    assert after["thresholds"]["underfit_gain"] == 0.3 and after["calibrated"]["n_labels"] == 12
    verdicts = {(c["epoch"], c["strength"]): c["verdict"] for c in after["cells"]}
    assert all(verdicts[(e, s)] == eye(1, e, s) for _, e, s in TRIAL1)
    agg = pd.read_csv(study / "trial_1" / "scores_agg.csv")
    assert dict(zip(zip(agg.epoch, agg.strength), agg.verdict)) == verdicts
    trial = json.loads((study / "trial_1" / "trial.json").read_text())
    assert trial["objective"] == pytest.approx(after["best"]["combined"]) and trial["reason"] != "old"
    board = pd.read_csv(study / "leaderboard.csv")
    assert set(board.trial) == {0, 1} and board.objective.notna().all()
    record = json.loads((study / "calibration.json").read_text())
    assert record["after"]["value"] == 1.0 and record["judge"]["underfit_gain"] == 0.3
    assert "still running" not in out
    nxt = json.loads((study / "labels_next.json").read_text())["cells"]
    page = (tmp_path / "reports" / "cal" / f"trial_{nxt[0]['trial']}" / "index.html").read_text()
    key = f"{nxt[0]['trial']}/{nxt[0]['epoch']}/{nxt[0]['strength']:g}"
    assert 'label-next" title=' in page and f'data-cell="{key}"' in page


@pytest.mark.parametrize("content, message", [
    ("trial,epoch,strength,label\n0,1,0.5,meh\n", "labels.csv row 1: label 'meh' is not one of underfit, good, overfit"),
    ("trial,epoch,label\n0,1,good\n", "labels.csv: no 'strength' column; a label CSV needs the columns trial, epoch, "
                                      "strength, label"),
    ("trial,epoch,strength,label\n0,1,0,good\n", "labels.csv row 1: strength 0 is the base model"),
    ("trial,epoch,strength,label\n0,1.5,1,good\n", "labels.csv row 1: epoch '1.5' is not a whole number"),
    ("trial,epoch,strength,label\n0,9,1,good\n", "labels.csv row 1: trial 0, epoch 9, strength 1 is not a cell of study cal: "
                                                 "trial 0 has epochs 1, 2, 3, 4 and strengths 0.5, 1, 1.5"),
    ("trial,epoch,strength,label\n7,1,1,good\n", "the study has no finished trial 7 (finished: 0, 1)"),
    ("trial,epoch,strength,label\n", "no labels in the file(s)"),
])
def test_bad_label_files_get_one_sentence_and_change_nothing(study, tmp_path, capsys, content, message):
    path = tmp_path / "labels.csv"
    path.write_text(content)
    tree = _tree(study)
    assert main([str(study), str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert _tree(study) == tree and not (tmp_path / "reports").exists()


def test_labels_from_another_study_and_a_study_without_scores_are_refused(study, tmp_path):
    other = _labels(tmp_path / "other.json", TRIAL0[:2], study="someone-else")
    with pytest.raises(LabelError, match="saved from the report of study someone-else, not cal"):
        read_labels([other], "cal")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "study.json").write_text('{"name": "empty"}')
    with pytest.raises(LabelError, match="no finished trial with score tables"):
        load_study(empty)


def test_csv_labels_and_browser_labels_read_the_same(tmp_path):
    (tmp_path / "a.csv").write_text("Trial,epoch,strength,label\ntrial_3,2,0.75,Overfit\n")
    js = _labels(tmp_path / "b.json", [(1, 1, 1.0)])
    got = read_labels([tmp_path / "a.csv", js], "cal")
    assert {c: lab.label for c, lab in got.items()} == {(3, 2, 0.75): "overfit", (1, 1, 1.0): "underfit"}


def test_judge_file_on_the_command_line(tmp_path):
    from lora_lab.cli import compose
    from lora_lab.errors import ConfigError

    path = tmp_path / "judge.yaml"
    path.write_text("# chosen\nunderfit_gain: 0.15\nadherence_drop: 0.3\n")
    cfg = compose([f"eval.judge={path}"])
    assert cfg.eval.judge.underfit_gain == 0.15 and cfg.eval.judge.adherence_drop == 0.3
    # a key the file leaves out keeps the value it had without the file (the model's: the toy
    # world sets its own ask_drop)
    assert cfg.eval.judge.ask_drop == compose([]).eval.judge.ask_drop == 0.075
    with pytest.raises(ConfigError, match="eval.judge: no judge file"):
        compose([f"eval.judge={tmp_path / 'missing.yaml'}"])
    path.write_text("underfit_gain: 0.15\nfoo: 1\n")
    with pytest.raises(ConfigError, match="has 'foo', not a judge setting; allowed: underfit_gain"):
        compose([f"eval.judge={path}"])
    path.write_text("underfit_gain: 1.5\n")
    with pytest.raises(ConfigError, match="eval.judge.underfit_gain"):
        compose([f"eval.judge={path}"])


def test_bench_calibrate_measures_labelling_against_an_eye(study):
    from lora_lab.bench.calibrate import pooled, subject_figures

    truth = {(t, e, s): eye(t, e, s) for t in FACTOR for e in range(1, 5) for s in STRENGTHS}
    fig = subject_figures(study, truth, shipped=START)
    assert fig["cells"] == 24 and fig["true"] == {"underfit": 14, "good": 6, "overfit": 4}
    assert sorted(fig["steps"]) == [10, 20]  # 40 labels: more than the study has
    for n, step in fig["steps"].items():
        assert step["unlabelled"] == 24 - n
        assert step["best_possible"] == step["unlabelled"]  # the eye is a setting of the grid
        assert step["calibrated"] <= step["best_possible"] and 0 <= step["random_labels"] <= 1
    assert fig["steps"][20]["calibrated"] == 4 and fig["steps"][20]["setting"]["underfit_gain"] in (0.25, 0.3)
    # the first ten labels include the cells the candidate settings split on most: both 22% ask drops,
    # which the real-model defaults (an ask lost at a 20% drop) call overfit and the eye calls good
    from lora_lab.bench.calibrate import simulate

    v = verdict_table(load_study(study), JudgeConfig())
    y = np.array([["underfit", "good", "overfit"].index(truth[c]) for c in v.cells])
    first = [v.cells[i] for i in np.flatnonzero(~simulate(v, y)[10]["rest"])]
    assert len(first) == 10 and {(0, 4, 1.0), (1, 4, 1.0)} <= set(first)
    assert fig["steps"][10]["defaults"] == fig["steps"][10]["unlabelled"]  # on the cells left, the defaults agree
    table = pooled({"cal": fig})
    assert table[20]["calibrated"]["value"] == 1.0 and table[20]["gap_to_best_points"] == 0.0


def test_a_study_still_running_is_said_so(study, tmp_path, capsys):
    (study / "trial_2").mkdir()
    (study / "trial_2" / "trial.json").write_text(json.dumps({"number": 2, "state": "running", "params": {}}))
    assert main([str(study), str(_labels(tmp_path / "labels.json", TRIAL0)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "note: trial 2 of this study is still running" in out and "eval.judge=FILE" in out
    assert not (study / "judge.yaml").exists()  # --dry-run writes nothing
