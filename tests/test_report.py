"""TensorBoard runs and the HTML report, read back from the files a sweep leaves."""

from __future__ import annotations

import re
import sys

from conftest import run_cli
from lora_lab.report.study import build_report
from lora_lab.report.tensorboard import read_scalars


def test_tensorboard_run_per_trial_with_scores_grids_and_hparams(script_study):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    study, _ = script_study
    tb = study / "trial_0" / "tb"
    assert [p for p in tb.iterdir() if p.is_dir()] == []  # hparams live in the same run, no sub-run
    scalars = read_scalars(tb)
    assert {"loss/current", "loss/average", "loss/epoch", "lr/unet"} <= set(scalars)
    assert "eval/adherence/strength_1" in scalars and "eval/adherence/strength_0" in scalars
    assert [step for step, _ in scalars["eval/adherence/strength_1"]] == [1]  # one epoch in the smoke sweep
    assert "hparam/objective" in scalars
    acc = EventAccumulator(str(tb))
    acc.Reload()
    assert "grids/p00" in acc.Tags()["images"]
    hp = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(hp)
    assert b"train.network_dim" in hp["_hparams_/session_start_info"]


def test_report_index_and_trial_pages(script_study):
    study, report = script_study
    index = (report / "index.html").read_text(encoding="utf-8")
    assert index.count('<tr class="state-') == 2
    assert 'href="trial_0/index.html"' in index and 'href="trial_1/index.html"' in index
    assert "scores not meaningful: random scorer weights" in index
    assert "adherence: CLIP zero-shot, the probability that an image shows the ask rather than its" in index
    assert "train.network_dim" in index and "http://" not in index and "https://" not in index
    for src in re.findall(r'<img src="([^"]+)"', index):
        assert (report / src).is_file(), src
    page = (report / "trial_0" / "index.html").read_text(encoding="utf-8")
    for src in re.findall(r'<img src="([^"]+)"', page):
        assert (report / "trial_0" / src).is_file(), src
    assert "Verdicts per epoch and strength" in page and "training loss" in page


def test_user_text_is_escaped(script_study):
    _, report = script_study
    page = (report / "trial_0" / "index.html").read_text(encoding="utf-8")
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # the caption's tag, shown as text
    assert "<b>sks</b>" not in page and "&lt;b&gt;sks&lt;/b&gt; woman" in page  # the token, in prompts
    index = (report / "index.html").read_text(encoding="utf-8")
    assert index.count("<script>") == 1  # only the report's own sorting script
    # The dataset doctor's findings quote captions: as text too.
    assert 'id="dataset"' in index and 'id="doctor"' in index
    assert "caption lacks the trigger token &#39;&lt;b&gt;sks&lt;/b&gt; woman&#39;" in index
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in index


def test_failed_trial_page_shows_its_error(script_study, tmp_path):
    import json
    import shutil

    study, _ = script_study
    copy = tmp_path / "smoke"
    shutil.copytree(study, copy)
    info = json.loads((copy / "trial_1" / "trial.json").read_text())
    info.update(state="failed", reason="loss became nan at step 3 (epoch 1)")
    (copy / "trial_1" / "trial.json").write_text(json.dumps(info))
    (copy / "trial_1" / "error.txt").write_text("loss became nan at step 3 (epoch 1) <oops>\n")
    index = build_report(copy, tmp_path / "reports")
    page = (index.parent / "trial_1" / "index.html").read_text()
    assert '<pre id="error">loss became nan at step 3 (epoch 1) &lt;oops&gt;' in page
    assert 'class="state-failed"' in index.read_text()


def test_report_cli(script_study, tmp_path):
    study, _ = script_study
    proc = run_cli([sys.executable, "-m", "lora_lab.report", str(study), "--out", str(tmp_path)])
    assert proc.returncode == 0 and f"report: {tmp_path / 'smoke' / 'index.html'}" in proc.stdout
    proc = run_cli([sys.executable, "-m", "lora_lab.report", str(tmp_path / "nope")])
    assert proc.returncode == 2 and "is not a study folder" in proc.stderr


def test_trial_page_shows_scores_over_epoch_and_strength_as_shaded_tables(script_study):
    import json

    study, report = script_study
    page = (report / "trial_0" / "index.html").read_text(encoding="utf-8")
    cells = [c for c in json.loads((study / "trial_0" / "verdict.json").read_text())["cells"] if c["verdict"] != "base"]
    assert cells and all(c["likeness"] is None for c in cells)  # no face on the tiny model's renders
    assert 'id="heat-likeness"' not in page  # nothing measured, no table
    table = page.split('id="heat-adherence"')[1].split("</table>")[0]
    for c in cells:  # every LoRA cell's raw value and verdict, in its strength's row
        row = table.split(f"<tr><th>{c['strength']:g}</th>")[1].split("</tr>")[0]
        assert f"{c['adherence']:.4g}<br><small>{c['verdict']}</small>" in row
    shades = re.findall(r"background: (#[0-9a-f]{6}); color: (#[0-9a-f]{3})", table)
    assert len(shades) == len(cells) and "heatmap_" not in page


def test_heatmap_shading_runs_light_to_dark_and_keeps_text_readable():
    from lora_lab.report.study import _heatmap, _shade

    assert _shade(0.0, 0.0, 1.0) == {"background": "#edf3fb", "color": "#111"}
    assert _shade(1.0, 0.0, 1.0) == {"background": "#214e8c", "color": "#fff"}
    assert _shade(3.0, 3.0, 3.0)["background"] == _shade(0.5, 0.0, 1.0)["background"]  # one value: mid
    cells = [{"epoch": 1, "strength": 0.0, "likeness": 0.1, "verdict": "base"},
             {"epoch": 1, "strength": 1.0, "likeness": 0.4, "verdict": "underfit"},
             {"epoch": 2, "strength": 1.0, "likeness": 0.8, "verdict": "good"},
             {"epoch": 2, "strength": 0.5, "likeness": 0.6, "verdict": "good"}]
    h = _heatmap(cells, "likeness")
    assert h["epochs"] == [1, 2] and [r["strength"] for r in h["rows"]] == ["0.5", "1"]  # no base row
    assert h["rows"][0]["cells"][0] is None  # epoch 1 at 0.5 was not rendered
    assert [c["text"] for c in h["rows"][1]["cells"]] == ["0.4", "0.8"] and (h["low"], h["high"]) == ("0.4", "0.8")
    assert _heatmap(cells, "adherence") is None


def test_a_left_out_likeness_prompt_is_said_on_its_trial_page(script_study, tmp_path):
    import json
    import shutil

    study, _ = script_study
    copy = tmp_path / "smoke"
    shutil.copytree(study, copy)
    path = copy / "trial_0" / "verdict.json"
    doc = json.loads(path.read_text())
    note = ("likeness left out 'photo of <b>sks</b> woman, on a white background': no cell's images came more "
            "than 3% of the way from the base model's to the training images (a prompt counts from 20%)")
    path.write_text(json.dumps({**doc, "notes": doc["notes"] + [note]}))
    index = build_report(copy, tmp_path / "reports")
    page = (index.parent / "trial_0" / "index.html").read_text(encoding="utf-8")
    assert "likeness left out &#39;photo of &lt;b&gt;sks&lt;/b&gt; woman, on a white background&#39;: no cell" in page
    assert "likeness left out" not in (index.parent / "trial_1" / "index.html").read_text(encoding="utf-8")
