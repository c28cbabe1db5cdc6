"""The evaluation stage end to end on the tiny model, for our LoRA files and kohya's."""

from __future__ import annotations

import copy
import json
import sys

import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import make_config, run_cli
from lora_lab.config import ClipScorerConfig, EvalConfig, FaceScorerConfig
from lora_lab.data.dataset import load_dataset
from lora_lab.data.suites import SUITES_DIR, load_suite
from lora_lab.errors import ConfigError, LoraLabError
from lora_lab.evaluate.run import evaluate, list_lora_files
from lora_lab.train.loop import train


def _eval_cfg():
    return EvalConfig(strengths=[1.0, 0.0], steps=3, seeds=[11, 22], max_prompts=1, size=32,
                      face=FaceScorerConfig(pretrained=None),
                      clip=ClipScorerConfig(model="lora-lab-tiny-clip", pretrained=None))


@pytest.fixture(scope="module")
def trained(base, cache_dir, demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    cfg = make_config(cache_dir, out, epochs=2)
    cfg.eval = _eval_cfg()
    cfg.data.token = "sks woman"
    ds = load_dataset(cfg.data, cache_dir)
    train(cfg, base, ds, out)
    return cfg, ds, out


def test_evaluate_writes_grids_cells_scores_and_verdict(base, trained):
    cfg, ds, out = trained
    result = evaluate(cfg, base, ds, out / "lora", out, progress=False)
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["p00.png", "p03.png"]
    scores = pd.read_csv(out / "scores.csv")
    assert len(scores) == 2 * 2 * 2 * 2  # epochs x strengths x prompts x seeds
    assert set(scores.epoch) == {1, 2} and set(scores.strength) == {0.0, 1.0}
    assert set(scores.prompt) == {"photo of sks woman", "photo of sks woman with red hair"}
    assert (scores.scorer_weights == "scores not meaningful: random scorer weights").all()
    assert len(pd.read_parquet(out / "scores.parquet")) == 16
    cell = scores[(scores.epoch == 2) & (scores.strength == 1.0) & (scores.seed == 22)].iloc[0]
    info = Image.open(cell.image).text["parameters"]
    assert info.startswith(f"{cell.prompt} <lora:last:1>\nNegative prompt: lowres")
    assert "Steps: 3, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 22, Size: 32x32, Model: tiny" in info
    assert ", RNG: CPU, " in info  # noise drawn on the CPU, as A1111 writes it
    # The strength-0 cells of every epoch are the same base-model images.
    base_rows = scores[scores.strength == 0.0]
    assert base_rows.groupby(["prompt", "seed"]).image.nunique().max() == 1
    verdict = json.loads((out / "verdict.json").read_text())
    assert {c["verdict"] for c in verdict["cells"]} <= {"base", "underfit", "good", "overfit"}
    assert len(verdict["cells"]) == 4 and all(c["reasons"] for c in verdict["cells"])
    assert "scores not meaningful: random scorer weights" in verdict["notes"]
    if verdict["best"]:
        assert verdict["best"]["snippet"].startswith("<lora:last")
    agg = pd.read_csv(out / "scores_agg.csv")
    assert list(agg.columns[:3]) == ["epoch", "label", "strength"] and len(agg) == 4
    assert result.grids and Image.open(result.grids[0]).width > 4 * 32


def test_kohya_folder_from_another_tool_evaluates(base, trained, tmp_path):
    cfg, ds, out = trained
    other = tmp_path / "kohya_output"
    other.mkdir()
    for i, src in enumerate(["last-000001.safetensors", "last.safetensors"]):
        tensors = load_file(out / "lora" / src)
        save_file(tensors, str(other / f"anantn_v{i + 1}.safetensors"))  # no metadata, other names
    files = list_lora_files(other)
    assert [(e, p.name) for e, p, _, _ in files] == [(1, "anantn_v1.safetensors"), (2, "anantn_v2.safetensors")]
    result = evaluate(cfg, base, ds, other, tmp_path / "eval", progress=False)
    assert set(result.scores.label) == {"anantn_v1", "anantn_v2"}
    assert (tmp_path / "eval" / "verdict.json").exists()


def test_bad_lora_folders(tmp_path):
    with pytest.raises(LoraLabError, match="is not a folder of LoRA files"):
        list_lora_files(tmp_path / "missing")
    (tmp_path / "model.ckpt").write_bytes(b"x")
    with pytest.raises(LoraLabError, match=r"holds no .safetensors LoRA files \(found model.ckpt"):
        list_lora_files(tmp_path)


@pytest.mark.parametrize("name", sorted(p.stem for p in SUITES_DIR.glob("*.yaml")))
def test_shipped_suites_load(name):
    suite = load_suite(name, "anantn")
    assert suite.kind in ("person", "object", "style")
    assert all("anantn" in p.text for p in suite.prompts)
    assert any(p.kind == "adaptability" and p.judge for p in suite.prompts)


def test_suite_errors(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("kind: person\nlikeness: ['photo of a man']\n")
    with pytest.raises(ConfigError, match=r"prompt 'photo of a man' has no \{token\} placeholder"):
        load_suite(str(bad), "sks")
    with pytest.raises(ConfigError, match="eval.suite: 'robots' is not a suite file; built-in suites: object, person"):
        load_suite("robots", "sks")
    same = tmp_path / "same.yaml"
    same.write_text("kind: person\nlikeness: ['photo of {token}']\nadaptability:\n"
                    "  - {prompt: '{token} with short hair', judge: 'a person with short hair', "
                    "versus: 'a person with short hair'}\n")
    with pytest.raises(ConfigError, match=r"'versus' of '\{token\} with short hair' must be a text that differs"):
        load_suite(str(same), "sks")
    good = tmp_path / "good.yaml"
    good.write_text(same.read_text().replace("versus: 'a person with short hair'", "versus: 'a person with long hair'"))
    assert load_suite(str(good), "sks").prompts[1].versus == "a person with long hair"


def test_evaluate_cli(trained, cache_dir, tmp_path):
    _, _, out = trained
    proc = run_cli(
        [sys.executable, "-m", "lora_lab.evaluate", f"lora_dir={out / 'lora'}", "model=tiny", "data=demo",
         "eval.steps=2", "eval.seeds=[1]", "eval.strengths=[0,1]", "eval.max_prompts=1",
         "eval.size=32", f"eval.output_dir={tmp_path / 'ev'}", f"cache_dir={cache_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "note: scores not meaningful: random scorer weights" in proc.stdout
    assert "epoch  strength  verdict" in proc.stdout
    assert (tmp_path / "ev" / "verdict.json").exists()
    page = (tmp_path / "ev" / "report.html").read_text(encoding="utf-8")
    assert f"report: {tmp_path / 'ev' / 'report.html'}" in proc.stdout and 'class="verdicts"' in page
    assert "scores not meaningful: random scorer weights" in page and "<lora:" not in page  # escaped
    proc = run_cli([sys.executable, "-m", "lora_lab.evaluate", f"lora_dir={out / 'lora'}",
                    "eval.sampler=Euler b"], cwd=tmp_path)
    assert proc.returncode == 2 and "eval.sampler: unknown value 'Euler b'" in proc.stderr


def test_evaluating_mid_training_leaves_training_untouched(base, cache_dir, demo_dir, tmp_path):
    """The sweep's per-epoch evaluation swaps files into the pipeline being trained."""
    cfg = make_config(cache_dir, tmp_path / "plain", epochs=2)
    cfg.eval = _eval_cfg()
    cfg.data.token = "sks woman"
    ds = load_dataset(cfg.data, cache_dir)
    (tmp_path / "plain").mkdir()
    train(cfg, base, ds, tmp_path / "plain")
    seen = []

    def on_epoch(epoch, path, loss):
        ev = evaluate(cfg, base, ds, path.parent, tmp_path / "mid" / f"e{epoch}", progress=False, epochs=[epoch])
        seen.append(len(ev.scores))
        return False

    cfg.output_dir = str(tmp_path / "with_eval")
    (tmp_path / "with_eval").mkdir()
    train(cfg, base, ds, tmp_path / "with_eval", on_epoch=on_epoch)
    assert seen == [8, 8]
    a = load_file(tmp_path / "plain" / "lora" / "last.safetensors")
    b = load_file(tmp_path / "with_eval" / "lora" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_library_error_mid_run_is_one_sentence_with_the_trace_in_a_log(trained, cache_dir, tmp_path):
    """A LoRA file whose tensor has the wrong size passes every check, then torch refuses it:
    the user reads one sentence naming the file and the cause, and where the trace is."""
    _, _, out = trained
    bad = tmp_path / "lora"
    bad.mkdir()
    src = sorted((out / "lora").glob("*.safetensors"))[0]
    tensors = load_file(str(src))
    key = next(k for k in tensors if k.endswith(".lora_down.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)
    save_file(tensors, str(bad / src.name))
    proc = run_cli(
        [sys.executable, "-m", "lora_lab.evaluate", f"lora_dir={bad}", "model=tiny", "data=demo", "eval.steps=1",
         "eval.seeds=[1]", "eval.strengths=[0,1]", "eval.max_prompts=1", "eval.size=32",
         f"cache_dir={cache_dir}"], cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: evaluate stopped on an unexpected error from a library (while rendering {bad / src.name}): "
                           "RuntimeError: ")
    log = line.rsplit("the full trace is in ", 1)[1]
    assert log.startswith(str(cache_dir.parent / "logs" / "evaluate-")) and "Traceback" in open(log).read()


def test_one_lora_on_several_checkpoints_and_how_it_transfers(base, trained, tiny_dir, tmp_path, cache_dir):
    """eval.checkpoints: the same X/Y on each base checkpoint, verdicts per checkpoint, and a
    transfer table saying where they differ."""
    from pathlib import Path as P

    sys.path.insert(0, str(P(__file__).parent))
    from ldm_export import to_ldm

    from lora_lab.config import ModelConfig
    from lora_lab.evaluate.run import run

    cfg, _, out = trained
    state = to_ldm(base.pipe)
    save_file(state, str(tmp_path / "anything-v3.safetensors"))
    other = {k: (v * 1.3 if "diffusion_model.input_blocks" in k and v.dim() > 1 else v) for k, v in state.items()}
    save_file(other, str(tmp_path / "counterfeit-v3.safetensors"))
    cfg = copy.deepcopy(cfg)
    cfg.model = ModelConfig(name="tiny", config_dir=str(tiny_dir))
    cfg.lora_dir = str(out / "lora")
    cfg.eval.output_dir = str(tmp_path / "ev")
    cfg.eval.checkpoints = [str(tmp_path / "anything-v3.safetensors"), str(tmp_path / "counterfeit-v3.safetensors")]
    run(cfg)
    for name in ("anything-v3", "counterfeit-v3"):
        assert (tmp_path / "ev" / name / "verdict.json").is_file() and (tmp_path / "ev" / name / "grids").is_dir()
        text = Image.open(next((tmp_path / "ev" / name / "cells" / "base").glob("*.png"))).text["parameters"]
        assert f"Model: {name}" in text and "Model hash: " in text
    table = pd.read_csv(tmp_path / "ev" / "transfer.csv")
    assert list(table.columns) == ["epoch", "label", "strength", "anything-v3", "counterfeit-v3"]
    assert len(table) == 2 * 1  # 2 epoch files x the one LoRA strength
    a = Image.open(next((tmp_path / "ev" / "anything-v3" / "cells" / "base").glob("*.png")))
    b = Image.open(next((tmp_path / "ev" / "counterfeit-v3" / "cells" / "base").glob("*.png")))
    assert a.tobytes() != b.tobytes()  # really another checkpoint
    # One page for it all: the transfer table, then each checkpoint's verdicts and grids.
    page = (tmp_path / "ev" / "report.html").read_text(encoding="utf-8")
    transfer_rows = page.split('id="transfer"', 1)[1].split("</table>", 1)[0].count("<tr><td>")
    assert transfer_rows == len(table) and "On anything-v3" in page and "On counterfeit-v3" in page
    import re

    grids = re.findall(r'<img src="([^"]+)"', page)
    assert len(grids) == 2 * 2 and all((tmp_path / "ev" / g).is_file() for g in grids)  # 2 prompts x 2 checkpoints
    bad = copy.deepcopy(cfg)
    bad.eval.checkpoints = [str(tmp_path / "missing.safetensors")]
    with pytest.raises(LoraLabError, match="missing.safetensors does not exist"):
        run(bad)
