"""Verdicts from constructed scores: known underfit, good and overfit cells, and the best pick."""

from __future__ import annotations

import math

import pandas as pd

from lora_lab.config import JudgeConfig
from lora_lab.evaluate.judge import aggregate, best_cell, judge, verdict_document

RED = "adherence::photo of sks with red hair"


def _cell(epoch, strength, likeness, red, copy=0.5, div=0.3, face_rate=1.0):
    return {"epoch": epoch, "label": f"last-{epoch:06d}", "strength": strength, "likeness": likeness,
            "face_rate": face_rate, "clip_i": 0.5, "adherence": red, RED: red, "copy_similarity": copy,
            "copy_reference": "07.png", "diversity": div}


def _table():
    return pd.DataFrame([
        _cell(1, 0.0, 0.20, 28.9),        # base model
        _cell(1, 1.0, 0.25, 28.0),        # gain 0.05 / 0.6 = 8%: underfit
        _cell(2, 0.7, 0.60, 27.5),        # gain 67%: good
        _cell(2, 1.0, 0.70, 21.3),        # red hair prompt collapsed: overfit
        _cell(3, 1.0, 0.75, 28.0, copy=0.97),  # near copy of a training image: overfit
        _cell(3, 0.5, 0.65, 27.0, div=0.05),   # seeds all look alike: overfit
    ])


def test_verdicts_and_reasons():
    judged = judge(_table(), ceiling=0.80, cfg=JudgeConfig())
    v = {(r.epoch, r.strength): r for r in judged.itertuples()}
    assert v[(1, 0.0)].verdict == "base"
    assert v[(1, 1.0)].verdict == "underfit"
    assert v[(1, 1.0)].reasons == ["too little of the subject yet: likeness 0.250 is 8% of the way from the base "
                                   "model (0.200) to the training images (0.800); needs 30%"]
    assert v[(2, 0.7)].verdict == "good" and math.isclose(v[(2, 0.7)].gain, 0.4 / 0.6)
    assert v[(2, 1.0)].verdict == "overfit"
    assert v[(2, 1.0)].reasons == ["the asked change fades: 'photo of sks with red hair' matches its text 26% less "
                                   "than on the base model (CLIP 21.3 vs base 28.9; the suite gives no 'versus' for "
                                   "it, so this is a similarity, blind to a small lost change)"]
    assert v[(2, 0.7)].reasons[0].startswith("likeness 0.600, 67% of the way from the base model to the training "
                                             "images (0.800); asked changes kept: adherence 27.5 vs base 28.9")
    assert v[(3, 1.0)].verdict == "overfit" and "nearly copies training image 07.png (CLIP-I 0.970" in v[(3, 1.0)].reasons[0]
    assert v[(3, 0.5)].reasons == ["the seeds all look alike: diversity across seeds 0.050 vs base 0.300"]


def test_thresholds_are_config_values():
    lenient = JudgeConfig(adherence_drop=0.3, underfit_gain=0.05)
    v = {(r.epoch, r.strength): r.verdict for r in judge(_table(), 0.80, lenient).itertuples()}
    assert v[(2, 1.0)] == "good"  # 21.3 is within 30% of 28.9
    assert v[(1, 1.0)] == "good"  # an 8% gain is enough at 5%


def test_best_cell_is_highest_combined_non_overfit():
    judged = judge(_table(), 0.80, JudgeConfig())
    best = best_cell(judged)
    assert (best.epoch, best.strength) == (2, 0.7)
    doc = verdict_document(judged, 0.80, JudgeConfig(), {"last-000002": "/x/last-000002.safetensors"}, ["n"])
    assert doc["best"]["snippet"] == "<lora:last-000002:0.7>"
    assert doc["best"]["file"] == "/x/last-000002.safetensors"
    assert doc["best"]["epoch"] == 2 and doc["best"]["verdict"] == "good"


def test_no_best_when_everything_overfits():
    t = pd.DataFrame([_cell(1, 0.0, 0.2, 28.9), _cell(1, 1.0, 0.7, 10.0)])
    assert best_cell(judge(t, 0.8, JudgeConfig())) is None


def _contrastive_scores(cell_probs, base_probs=(0.9, 0.8, 0.95), cell_clip=28.0):
    """Per-image rows: one likeness prompt, one ask with a versus; the ask's probabilities per
    seed; the ask's CLIP score 28.0 on the base model's images and ``cell_clip`` on the cell's."""
    rows = []
    for strength, probs, like, clip in ((0.0, base_probs, 0.2, 28.0), (1.0, cell_probs, 0.7, cell_clip)):
        for seed, p in enumerate(probs):
            common = {"epoch": 1, "label": "a", "strength": strength, "seed": seed, "face_detected": True,
                      "clip_i_max": 0.6, "closest_reference": "r.png", "diversity": 0.2}
            rows.append({**common, "prompt_kind": "likeness", "prompt": "photo of dax", "face_likeness": like,
                         "clip_i": 0.5, "clip_adherence": float("nan"), "ask_prob": float("nan"),
                         "judge": None, "versus": None})
            rows.append({**common, "prompt_kind": "adaptability", "prompt": "photo of dax with brown eyes",
                         "face_likeness": like, "clip_i": 0.5, "clip_adherence": clip, "ask_prob": p,
                         "judge": "a photo of a person with brown eyes", "versus": "a photo of a person with blue eyes"})
    return pd.DataFrame(rows)


def test_a_lost_ask_is_seen_against_the_subjects_own_and_said_in_plain_words():
    """The CLIP score does not move (28.0 on every image), but the images are more like the
    subject's blue eyes than the asked brown: overfit, with what was asked and what showed."""
    agg = aggregate(_contrastive_scores((0.1, 0.3, 0.2)), "person")
    cell = judge(agg, 0.8, JudgeConfig(ask_drop=0.25)).set_index("strength").loc[1.0]
    assert cell.verdict == "overfit"
    assert cell.reasons == ["asked brown eyes; the images are more like blue eyes in 3 of 3 seeds (P(ask) 0.20); "
                            "base model: brown eyes in 3 of 3 (P 0.88)"]
    assert cell.instead == "blue eyes"  # what showed instead, for the sweep's example line
    kept = judge(aggregate(_contrastive_scores((0.9, 0.7, 0.4)), "person"), 0.8, JudgeConfig(ask_drop=0.25))
    kept = kept.set_index("strength").loc[1.0]
    assert kept.verdict == "good"  # mean 0.67 against 0.88: within a quarter of the base model
    assert kept.reasons[0].endswith("asked changes kept: brown eyes in 2 of 3") and kept.instead == ""
    # the threshold is a probability ratio: the same cut-off means the same on any CLIP
    assert judge(aggregate(_contrastive_scores((0.9, 0.7, 0.4)), "person"), 0.8,
                 JudgeConfig(ask_drop=0.2)).set_index("strength").loc[1.0].verdict == "overfit"
    # ask_drop 1 turns the probability check off; the CLIP score (unchanged here) still applies
    assert judge(agg, 0.8, JudgeConfig(ask_drop=1.0)).set_index("strength").loc[1.0].verdict == "good"


def test_an_ask_only_the_clip_score_finds_lost_says_what_the_either_or_reading_shows():
    """The CLIP score falls 40% (28.0 -> 16.8) while the versus reading still prefers the ask in
    every seed: overfit by the score, and the reason says what the other reading saw, in words."""
    agg = aggregate(_contrastive_scores((0.9, 0.8, 0.95), cell_clip=16.8), "person")
    cell = judge(agg, 0.8, JudgeConfig(ask_drop=0.25, adherence_drop=0.25)).set_index("strength").loc[1.0]
    assert cell.verdict == "overfit"
    assert cell.reasons == ["the asked change fades: 'photo of dax with brown eyes' matches its text 40% less than "
                            "on the base model (CLIP 16.8 vs base 28.0); CLIP's either-or reading still prefers "
                            "brown eyes to blue eyes in 3 of 3 seeds (base model: 3 of 3)"]
    assert cell.instead == ""  # nothing is known to show instead


def test_the_pick_weighs_how_likely_the_ask_is_not_the_clip_score():
    """CLIP's score is 28.0 on every image; the ask's probability is 0.67 against the base
    model's 0.88, and that ratio is the combined score's adherence term."""
    kept = judge(aggregate(_contrastive_scores((0.9, 0.7, 0.4)), "person"), 0.8, JudgeConfig(ask_drop=0.5))
    cell = kept.set_index("strength").loc[1.0]
    gain, ratio = (0.7 - 0.2) / (0.8 - 0.2), (2.0 / 3) / (2.65 / 3)
    assert cell.verdict == "good" and math.isclose(cell.combined, gain + ratio, rel_tol=1e-6)
    same = judge(aggregate(_contrastive_scores((0.9, 0.8, 0.95)), "person"), 0.8, JudgeConfig(ask_drop=0.5))
    assert math.isclose(same.set_index("strength").loc[1.0].combined, gain + 1.0, rel_tol=1e-6)


def test_the_pick_among_near_ties_is_the_gentler_cell():
    """Cells within the seeds' noise of the best: the lower strength, then the earlier epoch."""
    t = pd.DataFrame([_cell(1, 0.0, 0.20, 28.9), _cell(2, 1.5, 0.66, 28.0), _cell(2, 1.0, 0.65, 28.0),
                      _cell(3, 1.0, 0.64, 28.0), _cell(2, 0.5, 0.40, 28.0)])
    t["likeness_se"] = 0.02  # 0.02 / 0.6 of the way: about 3 points of gain
    one_se = JudgeConfig(pick_noise=1.0)
    assert (best_cell(judge(t, 0.80, one_se)).epoch, best_cell(judge(t, 0.80, one_se)).strength) == (2, 1.0)
    t["likeness_se"] = 0.001  # a precise measurement: the highest score wins
    best = best_cell(judge(t, 0.80, one_se))
    assert (best.epoch, best.strength) == (2, 1.5)
    t["likeness_se"] = 0.02
    best = best_cell(judge(t, 0.80, JudgeConfig(pick_noise=0)))  # pick_noise 0: the highest, whatever the noise
    assert (best.epoch, best.strength) == (2, 1.5)


def test_no_face_is_a_miss_not_a_zero():
    rows = []
    for strength, detected, like in ((0.0, [True, True], [0.2, 0.3]), (1.0, [True, False], [0.7, float("nan")])):
        for seed, (d, l) in enumerate(zip(detected, like)):
            rows.append({"epoch": 1, "label": "a", "strength": strength, "prompt_kind": "likeness",
                         "prompt": "photo of sks", "seed": seed, "face_detected": d, "face_likeness": l,
                         "clip_i": 0.5, "clip_i_max": 0.6, "closest_reference": "r.png",
                         "clip_adherence": float("nan"), "diversity": 0.2})
    agg = aggregate(pd.DataFrame(rows), "person").set_index("strength")
    assert agg.loc[1.0, "likeness"] == 0.7  # the miss is not averaged in as 0
    assert agg.loc[1.0, "face_rate"] == 0.5
    assert math.isclose(agg.loc[0.0, "likeness"], 0.25)


def test_copy_is_judged_against_the_base_model():
    t = pd.DataFrame([_cell(1, 0.0, 0.2, 28.9, copy=0.96), _cell(1, 1.0, 0.7, 28.0, copy=0.97),
                      _cell(2, 1.0, 0.7, 28.0, copy=0.985)])
    v = {(r.epoch, r.strength): r for r in judge(t, 0.8, JudgeConfig()).itertuples()}
    assert v[(1, 1.0)].verdict == "good"  # no closer to a training image than the base model is
    assert v[(2, 1.0)].verdict == "overfit" and "CLIP-I 0.985 >= 0.98; base 0.960" in v[(2, 1.0)].reasons[0]


def _two_prompt_table(plain, room):
    """Cells with likeness read on two prompts: (epoch, strength) -> (plain prompt, room-changing prompt)."""
    rows = []
    for (epoch, strength), (a, b) in {(1, 0.0): (plain[0], room[0]), **{k: (plain[i], room[i]) for i, k in
                                                                        enumerate([(1, 1.0), (2, 1.0)], 1)}}.items():
        row = _cell(epoch, strength, (a + b) / 2, 28.0)
        row["likeness::photo of sks"], row["likeness::photo of sks, on a white background"] = a, b
        rows.append(row)
    return pd.DataFrame(rows)


def test_a_likeness_prompt_no_cell_moves_is_left_out_and_said():
    # The training images share one room; on the white-background prompt no cell looks more like
    # them than the base model (0.37 -> at best 0.38, 2% of the way to 0.99), while the plain
    # prompt moves from 0.39 to 0.60 and 0.80 (34% and 66%).
    table = _two_prompt_table(plain=(0.39, 0.60, 0.80), room=(0.37, 0.33, 0.38))
    judged = judge(table, ceiling=0.99, cfg=JudgeConfig(underfit_gain=0.5))
    v = {(r.epoch, r.strength): r for r in judged.itertuples()}
    assert math.isclose(v[(2, 1.0)].likeness, 0.80) and math.isclose(v[(2, 1.0)].gain, 0.41 / 0.60)
    assert v[(2, 1.0)].verdict == "good" and v[(1, 1.0)].verdict == "underfit"
    assert v[(1, 1.0)].reasons[1].startswith("likeness left out 'photo of sks, on a white background': no cell's "
                                             "images came more than 2% of the way")
    doc = verdict_document(judged, 0.99, JudgeConfig(underfit_gain=0.5), {"last-000001": "a", "last-000002": "b"}, [])
    assert any("likeness left out 'photo of sks, on a white background'" in n for n in doc["notes"])
    # with the rule off, both prompts count: (0.80 + 0.38) / 2 = 0.59 is 36% of the way: underfit
    off = judge(table, ceiling=0.99, cfg=JudgeConfig(underfit_gain=0.5, likeness_prompt_gain=0.0))
    assert off.set_index(["epoch", "strength"]).loc[(2, 1.0), "verdict"] == "underfit"


def test_every_likeness_prompt_counts_when_all_or_none_fall_short():
    moving = _two_prompt_table(plain=(0.39, 0.60, 0.80), room=(0.37, 0.50, 0.70))  # both move: both count
    judged = judge(moving, ceiling=0.99, cfg=JudgeConfig())
    assert math.isclose(judged.set_index(["epoch", "strength"]).loc[(2, 1.0), "likeness"], 0.75)
    assert judged.attrs["likeness_prompts_left_out"] == []
    still = _two_prompt_table(plain=(0.39, 0.40, 0.45), room=(0.37, 0.36, 0.38))  # nothing learnt yet
    judged = judge(still, ceiling=0.99, cfg=JudgeConfig())
    assert set(judged[judged.strength != 0].verdict) == {"underfit"} and judged.attrs["likeness_prompts_left_out"] == []


def test_aggregate_keeps_likeness_per_prompt():
    rows = [{"epoch": 1, "label": "e1", "strength": 1.0, "prompt_kind": "likeness", "prompt": p, "seed": s,
             "clip_i": v, "clip_i_max": v, "closest_reference": "01.png", "clip_adherence": float("nan"),
             "diversity": 0.2} for p, s, v in [("a", 1, 0.2), ("a", 2, 0.4), ("b", 1, 0.9), ("b", 2, 0.7)]]
    agg = aggregate(pd.DataFrame(rows), "object")
    assert math.isclose(agg["likeness::a"].iloc[0], 0.3) and math.isclose(agg["likeness::b"].iloc[0], 0.8)
    assert math.isclose(agg.likeness.iloc[0], 0.55)


def test_an_underfit_cell_just_short_of_the_bar_does_not_read_as_reaching_it():
    """0.2 + 0.298 / 0.6 of the way: 49.67%, which rounds to the bar's 50%; the reason says 49.7%."""
    t = pd.DataFrame([_cell(1, 0.0, 0.20, 28.9), _cell(1, 1.0, 0.498, 28.9), _cell(2, 1.0, 0.26, 28.9)])
    v = {(r.epoch, r.strength): r for r in judge(t, 0.80, JudgeConfig(underfit_gain=0.5)).itertuples()}
    assert v[(1, 1.0)].verdict == "underfit"
    assert v[(1, 1.0)].reasons == ["too little of the subject yet: likeness 0.498 is 49.7% of the way from the base "
                                   "model (0.200) to the training images (0.800); needs 50%"]
    assert "is 10% of the way" in v[(2, 1.0)].reasons[0]  # far from the bar: whole percents
