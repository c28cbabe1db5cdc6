"""The report's front page in pictures, its progress while a study runs, and its rewriting after
every trial (reusing what has not changed)."""

from __future__ import annotations

import html
import json
import re
import shutil

from PIL import Image

from lora_lab.report import study as report
from lora_lab.report.front import progress, progress_text
from lora_lab.report.study import build_report


def _ids(html: str, table_id: str) -> str:
    return html.split(f'id="{table_id}"', 1)[1].split("</table>", 1)[0]


def test_front_page_shows_the_winner_and_every_trial_in_pictures(script_study):
    study, rep = script_study
    index = (rep / "index.html").read_text(encoding="utf-8")
    winner = index.split('id="winner"', 1)[1].split("</div>\n</div>", 1)[0]
    thumbs = re.findall(r'<img class="thumb v-(\w+)" src="([^"]+)"', winner)
    # The winner and the base model, for a likeness and an adaptability prompt.
    assert [v for v, _ in thumbs].count("base") == 2 and len(thumbs) == 4
    for _, src in thumbs:
        with Image.open(rep / src) as im:
            assert im.format == "JPEG" and max(im.size) <= 160
    for href in re.findall(r'<a href="(img/[^"]+)">', winner):
        assert (rep / href).is_file()
    number = re.search(r"Trial (\d+), epoch", winner).group(1)
    best = json.loads((study / f"trial_{number}" / "verdict.json").read_text())["best"]
    assert f"epoch {best['epoch']}, strength {best['strength']:g}" in winner  # an integer epoch
    assert html.escape(best["snippet"]) in winner  # <lora:name:w>, escaped as all user text
    # Trials x strengths at each trial's best epoch: one cell per trial and strength, framed by
    # verdict, scores as change from the base model on hover, linked to the trial page.
    grid = _ids(index, "trials-by-strength")
    cells = re.findall(r'<td class="cell v-(\w+)" title="([^"]*)"([^>]*)><a href="trial_(\d)/index.html">', grid)
    assert len(cells) == 2 * 3  # 2 trials x strengths 0, 0.5, 1 (model=tiny)
    # every LoRA cell can be labelled (trial/epoch/strength), the base model's cannot
    assert [bool(re.fullmatch(r' data-cell="\d/\d+/[\d.]+" data-trial="\d" data-epoch="\d+" data-strength="[\d.]+"', a))
            for v, _, a, _ in cells] == [v != "base" for v, _, _, _ in cells]
    cells = [(v, t, n) for v, t, _, n in cells]
    assert {v for v, _, _ in cells} <= {"base", "good", "underfit", "overfit"}
    assert all("vs base (raw" in t for v, t, _ in cells if v != "base")
    assert [n for _, _, n in cells] == ["0"] * 3 + ["1"] * 3
    assert index.index('id="winner"') < index.index('id="trials-by-strength"') < index.index('id="leaderboard"')
    assert "Finished: 2 of 2 trials done: 2 complete, 0 pruned, 0 failed" in " ".join(index.split())
    # The trial page lists the base model once, not once per epoch.
    page = (rep / "trial_0" / "index.html").read_text(encoding="utf-8")
    assert page.count('<tr class="v-base">') == 1
    assert "<th>likeness vs base</th><th>adherence vs base</th>" in page
    changes = re.findall(r'<td title="raw ([^"]*)">([^<]*)</td>', page)
    assert changes[:2] == [(changes[0][0], "baseline"), (changes[1][0], "baseline")]
    assert len(changes) == 2 * 3 and all(re.fullmatch(r"[+-]\d+\.\d{3}|[+-]\d+%|n/a", c) for _, c in changes[2:])


def test_a_running_study_reads_as_running_with_an_estimate(script_study, tmp_path):
    study, _ = script_study
    copy = tmp_path / "smoke"
    shutil.copytree(study, copy)
    definition = json.loads((copy / "study.json").read_text())
    (copy / "study.json").write_text(json.dumps({**definition, "total_trials": 3}))
    info = json.loads((copy / "trial_1" / "trial.json").read_text())
    (copy / "trial_1" / "trial.json").write_text(json.dumps({**info, "state": "running", "duration_s": None}))
    (copy / "trial_1" / "verdict.json").unlink()
    index = build_report(copy, tmp_path / "reports").read_text(encoding="utf-8")
    text = " ".join(re.sub(r"<[^>]+>", "", index).split())
    assert "Running (reload for news): 1 of 3 trials done: 1 complete, 0 pruned, 0 failed, 1 running;" in text
    assert "left." in text and index.count('<tr class="state-') == 2


def test_progress_estimates_the_time_left_from_finished_trials(tmp_path):
    import pandas as pd

    for n, (state, started, duration) in enumerate([("complete", 1000.0, 10.0), ("pruned", 1010.0, 20.0),
                                                    ("running", 1030.0, None)]):
        (tmp_path / f"trial_{n}").mkdir()
        (tmp_path / f"trial_{n}" / "trial.json").write_text(
            json.dumps({"number": n, "state": state, "started": started, "duration_s": duration}))
    table = pd.DataFrame({"state": ["complete", "pruned", "running"]})
    p = progress(tmp_path, table, {"total_trials": 5}, now=1100.0)
    assert (p["complete"], p["pruned"], p["failed"], p["running"], p["finished"]) == (1, 1, 0, 1, 2)
    assert p["elapsed"] == "1m 40s" and p["left"] == "45s" and not p["done"]  # 3 left x 15 s each
    assert progress_text(p) == ("progress: 2 of 5 trials done (1 complete, 1 pruned, 0 failed, 1 running); "
                                "1m 40s so far, about 45s left")


def test_an_unchanged_trial_page_is_reused_not_redrawn(script_study, tmp_path, monkeypatch):
    study, _ = script_study
    copy = tmp_path / "smoke"
    shutil.copytree(study, copy)
    build_report(copy, tmp_path / "reports")
    drawn = []
    original = report._trial_page
    monkeypatch.setattr(report, "_trial_page", lambda env, s, tdir, *a: drawn.append(tdir.name) or
                        original(env, s, tdir, *a))
    index = build_report(copy, tmp_path / "reports")
    assert drawn == [] and (index.parent / "trial_0" / "index.html").is_file()
    info = json.loads((copy / "trial_1" / "trial.json").read_text())
    (copy / "trial_1" / "trial.json").write_text(json.dumps({**info, "reason": "changed"}))
    build_report(copy, tmp_path / "reports")
    assert drawn == ["trial_1"]


def test_the_report_is_rewritten_after_every_trial(tmp_path, cache_dir, demo_dir, monkeypatch):
    from lora_lab.cli import compose
    from lora_lab.sweep import run as sweep

    seen = []
    original = report.build_report

    def recording(study_dir, reports_root):
        states = sorted(json.loads(p.read_text())["state"] for p in study_dir.glob("trial_*/trial.json"))
        seen.append(states)
        return original(study_dir, reports_root)

    monkeypatch.setattr(report, "build_report", recording)
    cfg = compose(["+sweep=smoke", f"sweep.root={tmp_path / 'sweeps'}", f"sweep.reports={tmp_path / 'reports'}",
                   f"cache_dir={cache_dir}", f"data.path={demo_dir}"])
    sweep.run(cfg)
    # Before the first trial, after each of the two, and the final build.
    assert seen == [[], ["complete"], ["complete", "complete"], ["complete", "complete"]]
