"""The sweep driver: sweep files, trials, resume, failures, pruning, dead workers, leaderboard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from lora_lab.cli import compose
from lora_lab.config import conf_dir
from lora_lab.errors import ConfigError
from lora_lab.report import leaderboard
from lora_lab.sweep import run as sweep
from lora_lab.sweep import trial as trial_mod
from lora_lab.sweep.study import make_pruner, open_study, suggest

SWEEPS = sorted(p.stem for p in (conf_dir() / "sweep").glob("*.yaml"))


def _cfg(tmp_path, cache_dir, *extra):
    return compose(["+sweep=smoke", f"sweep.root={tmp_path}", f"cache_dir={cache_dir}", *extra])


@pytest.mark.parametrize("name", SWEEPS)
def test_every_sweep_file_composes_with_real_config_paths(name, tmp_path):
    cfg = compose([f"+sweep={name}"])
    sweep.check_keys(cfg)
    assert cfg.sweep.name == name
    expected = {"scheduler": 3, "optimizer": 5, "rank_alpha": 3, "repeats": 3, "smoke": 2, "truth": 4, "network": 5}
    if cfg.sweep.sampler == "grid":
        assert cfg.sweep.grid_size() == expected[name]
    # Every trial's config is valid (the grid's combinations build and validate).
    if cfg.sweep.variants:
        for variant in cfg.sweep.variants:
            sweep.trial_config(cfg, {"variant": variant}, tmp_path / "t")
    for key, values in cfg.sweep.grid.items():
        for value in values:
            sweep.trial_config(cfg, {key: value}, tmp_path / "t")


def test_repeats_sweep_keeps_total_steps_comparable():
    cfg = compose(["+sweep=repeats"])
    totals = {v["data.repeats"] * v["train.epochs"] for v in cfg.sweep.variants.values()}
    assert totals == {60}


def test_bad_sweep_keys_are_named_with_a_suggestion():
    cfg = compose(["+sweep=smoke", "++sweep.grid={train.lr_schedular:[constant]}"])
    with pytest.raises(ConfigError, match=r"sweep.grid: 'train.lr_schedular' is not a config path .*did you mean train.lr_scheduler"):
        sweep.check_keys(cfg)
    with pytest.raises(ConfigError, match="cannot vary within a study"):
        compose(["+sweep=smoke", "++sweep.grid={model.pretrained:[a,b]}"])


def test_a_table_on_the_command_line_replaces_the_sweep_files_table():
    # A key the sweep file never named (scheduler.yaml varies the schedule only).
    cfg = compose(["+sweep=scheduler", "sweep.grid={train.text_encoder_lr:[1e-3,3e-3]}",
                   "sweep.fixed={train.epochs:8,data.repeats:20}"])
    assert cfg.sweep.grid == {"train.text_encoder_lr": [1e-3, 3e-3]}
    assert cfg.sweep.fixed == {"train.epochs": 8, "data.repeats": 20}
    assert cfg.sweep.grid_size() == 2
    merged = compose(["+sweep=scheduler", "++sweep.grid={train.text_encoder_lr:[1e-3]}"])  # ++ merges
    assert set(merged.sweep.grid) == {"train.lr_scheduler", "train.text_encoder_lr"}
    wrong = compose(["+sweep=truth", "sweep.grid={train.text_encoder_rl:[1e-3]}"])
    with pytest.raises(ConfigError, match=r"'train.text_encoder_rl' is not a config path .*did you mean train.text_encoder_lr"):
        sweep.check_keys(wrong)
    with pytest.raises(ConfigError, match=r"sweep.grid: give a table like"):
        compose(["+sweep=truth", "sweep.grid=[1,2]"])
    proc = run_cli([sys.executable, "-m", "lora_lab.sweep", "+sweep=truth", "sweep.root=/nonexistent/x",
                    "sweep.grid={train.text_encoder_rl:[1e-3]}"],
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "did you mean train.text_encoder_lr" in proc.stderr.strip().splitlines()[-1]


def test_the_command_line_wins_over_the_sweep_files_fixed_but_not_over_what_a_trial_sweeps(tmp_path):
    plain = sweep.trial_config(compose(["+sweep=truth"]), {"variant": "light"}, tmp_path / "t")
    assert plain.eval.seeds == [1, 2, 3] and plain.train.epochs == 6  # the file's fixed values
    cfg = compose(["+sweep=truth", "eval.seeds=[1,2,3,4,5,6]", "train.network_dim=4", "train.text_encoder_lr=5e-4"])
    light = sweep.trial_config(cfg, {"variant": "light"}, tmp_path / "t")
    assert light.eval.seeds == [1, 2, 3, 4, 5, 6] and light.train.epochs == 6  # only the key given moves
    assert light.train.network_dim == 2  # light sets its own rank, whatever the command line said
    assert light.train.text_encoder_lr == 5e-4  # fixed's null gave way to the command line
    heavy = sweep.trial_config(cfg, {"variant": "heavy"}, tmp_path / "t")
    assert heavy.train.network_dim == 32 and heavy.train.text_encoder_lr == 1e-3 and heavy.eval.seeds[-1] == 6
    assert set(cfg.sweep.swept_keys()) >= {"train.network_dim", "train.network_alpha", "train.learning_rate"}
    assert trial_mod.command_line_notes(cfg) == [  # what the study's first lines say
        "eval.seeds: the command line's value, not the sweep file's fixed [1, 2, 3]",
        "train.text_encoder_lr: the command line's value, not the sweep file's fixed None",
        "train.network_dim: swept by this study, so each trial sets its own; the command line's value is not used",
        "train.text_encoder_lr: the command line's value, except in the variants that set their own (heavy)"]


def test_no_sweep_chosen_lists_the_choices():
    with pytest.raises(ConfigError, match="choose a sweep with \\+sweep=NAME \\(available: lr, network, optimizer"):
        sweep.run(compose())


def test_smoke_sweep_runs_resumes_and_ranks(tmp_path, cache_dir, demo_dir):
    cfg = _cfg(tmp_path, cache_dir)
    table = sweep.run(cfg)
    study = tmp_path / "smoke"
    assert len(table) == 2 and set(table.state) == {"complete"}
    assert set(table["train.network_dim"]) == {2, 4}
    for n in (0, 1):
        tdir = study / f"trial_{n}"
        assert (tdir / "config.yaml").exists() and (tdir / "verdict.json").exists()
        assert (tdir / "lora" / f"smoke_trial_{n}.safetensors").exists()
        assert json.loads((tdir / "trial.json").read_text())["state"] == "complete"
    ranks = {int(load_file(study / f"trial_{n}" / "lora" / f"smoke_trial_{n}.safetensors")[
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape[0]) for n in (0, 1)}
    assert ranks == {2, 4}
    saved = pd.read_csv(study / "leaderboard.csv")
    assert len(saved) == 2 and len(pd.read_parquet(study / "leaderboard.parquet")) == 2
    # The base model's images are rendered once per worker and shared by its trials.
    first = sorted((study / "trial_0" / "cells" / "base").iterdir())
    second = sorted((study / "trial_1" / "cells" / "base").iterdir())
    assert [p.name for p in first] == [p.name for p in second] and first
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second))
    timings = [json.loads((study / f"trial_{n}" / "trial.json").read_text())["timing"] for n in (0, 1)]
    assert timings[1]["images"] == timings[0]["images"] - len(first)
    assert all(t["steps"] == 6 and t["train_s"] > 0 and t["setup_s"] > 0 for t in timings)
    mtime = (study / "trial_0" / "lora" / "smoke_trial_0.safetensors").stat().st_mtime_ns
    again = sweep.run(cfg)  # resume: nothing left to run
    assert len(again) == 2 and not (study / "trial_2").exists()
    assert (study / "trial_0" / "lora" / "smoke_trial_0.safetensors").stat().st_mtime_ns == mtime
    proc = run_cli([sys.executable, "-m", "lora_lab.leaderboard", str(study), "--best"])
    best = leaderboard.best(leaderboard.build(study))
    if best is not None:
        assert proc.returncode == 0 and f"A1111: {best.snippet}" in proc.stdout
    else:
        assert proc.returncode == 1 and "no completed trial with a usable cell" in proc.stdout


def test_a_failing_trial_is_recorded_and_the_study_goes_on(tmp_path, cache_dir, demo_dir, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="lora_lab")
    # train.epochs is also the file's fixed value; train.network_dim is what the study sweeps
    cfg = _cfg(tmp_path, cache_dir, "sweep.grid={train.network_dim:[0,2]}", "train.epochs=1", "train.network_dim=8")
    table = sweep.run(cfg).set_index("train.network_dim")
    assert "train.epochs: the command line's value, not the sweep file's fixed 1" in caplog.text
    assert "train.network_dim: swept by this study, so each trial sets its own" in caplog.text
    assert table.loc[0, "state"] == "failed"
    assert "train.network_dim: must be a whole number >= 1, got 0" in table.loc[0, "reason"]
    assert table.loc[2, "state"] == "complete"
    failed = tmp_path / "smoke" / f"trial_{int(table.loc[0, 'trial'])}"
    assert "train.network_dim" in (failed / "error.txt").read_text()


def test_a_study_whose_every_trial_failed_exits_non_zero_with_one_sentence(tmp_path, cache_dir, demo_dir):
    cfg = _cfg(tmp_path, cache_dir, "sweep.grid={train.network_dim:[0,-1]}")
    with pytest.raises(sweep.SweepFailed, match=r"^all 2 trials failed: train\.network_dim: must be a whole number"):
        sweep.run(cfg)
    # The command line, run again on the same study (it resumes: nothing left to run).
    proc = run_cli([sys.executable, "-m", "lora_lab.sweep", "+sweep=smoke", f"sweep.root={tmp_path}",
                    f"cache_dir={cache_dir}", "sweep.grid={train.network_dim:[0,-1]}"],
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: all 2 trials failed: train.network_dim")
    info = json.loads((tmp_path / "smoke" / "trial_0" / "trial.json").read_text())
    assert info["state"] == "failed" and info["versions"]["peft"] == version("peft")


def test_pruning_stops_hopeless_trials(tmp_path, cache_dir, demo_dir, monkeypatch, caplog):
    import logging

    values = iter([5.0, 5.0, 1.0, 1.0, 1.0])  # trial 0: epochs 1-2 and final; trial 1 per epoch
    monkeypatch.setattr(trial_mod, "objective_value", lambda *a: next(values))
    cfg = _cfg(tmp_path, cache_dir, "sweep.pruner=median", "sweep.pruner_startup_trials=1",
               "sweep.pruner_warmup_epochs=0", "sweep.fixed={train.epochs:3,train.resolution:32,data.repeats:1}")
    caplog.set_level(logging.INFO, logger="lora_lab")
    table = sweep.run(cfg).sort_values("trial")
    # the last lines say where to go when a verdict looks wrong to the user
    assert f"then: python -m lora_lab.calibrate {tmp_path / 'smoke'} labels.json" in caplog.text
    assert list(table.state) == ["complete", "pruned"]
    assert table.iloc[1].reason.startswith("pruned after epoch 1: its per-epoch check (")
    assert "scored combined 1, below the median of earlier trials at that epoch" in table.iloc[1].reason
    pruned_dir = tmp_path / "smoke" / "trial_1" / "lora"
    assert sorted(p.name for p in pruned_dir.iterdir()) == ["smoke_trial_1-000001.safetensors"]


def test_the_pruners_check_uses_several_prompts_seeds_and_the_objectives_strengths(tmp_path, cache_dir, demo_dir,
                                                                                  monkeypatch):
    from lora_lab.evaluate import run as evaluate_mod

    seen = []
    real = evaluate_mod.evaluate

    def spy(config, base, dataset, lora_dir, out_dir, **kw):
        if kw.get("epochs") is not None:  # the per-epoch check
            seen.append((list(config.eval.seeds), list(config.eval.strengths), kw["suite"]))
        return real(config, base, dataset, lora_dir, out_dir, **kw)

    monkeypatch.setattr(evaluate_mod, "evaluate", spy)
    cfg = _cfg(tmp_path, cache_dir, "sweep.pruner=percentile", "sweep.grid={train.network_dim:[2]}",
               "eval.seeds=[1,2,3]", "eval.strengths=[0,0.5,1]",
               "sweep.fixed={train.epochs:2,train.resolution:32,data.repeats:1}")
    sweep.run(cfg)
    assert len(seen) == 1  # epoch 1 of 2 (the last epoch gets the full evaluation instead)
    seeds, strengths, suite = seen[0]
    assert seeds == [1, 2] and strengths == [0.0, 0.5, 1.0]
    kinds = [p.kind for p in suite.prompts]
    assert kinds.count("likeness") == 2 and kinds.count("adaptability") == 2


def test_pruner_settings_build_optunas_pruners():
    import optuna

    cfg = compose(["+sweep=smoke", "sweep.pruner=percentile", "sweep.pruner_percentile=30",
                   "sweep.pruner_warmup_epochs=2", "sweep.pruner_patience=1"])
    pruner = make_pruner(cfg.sweep)
    assert isinstance(pruner, optuna.pruners.PatientPruner)
    inner = pruner._wrapped_pruner
    assert isinstance(inner, optuna.pruners.PercentilePruner)
    assert inner._percentile == 30 and inner._n_warmup_steps == 3  # epochs 1 and 2 never pruned
    with pytest.raises(ConfigError, match="sweep.pruner_percentile"):
        compose(["+sweep=smoke", "sweep.pruner_percentile=100"])
    # One warm-up epoch: a hopeless trial survives epoch 1 and is pruned at epoch 2.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", pruner=make_pruner(
        compose(["+sweep=smoke", "sweep.pruner=median", "sweep.pruner_warmup_epochs=1"]).sweep))
    for _ in range(2):
        good = study.ask()
        for epoch in (1, 2):
            good.report(2.0, epoch)
        study.tell(good, 2.0)
    bad = study.ask()
    bad.report(0.1, 1)
    assert not bad.should_prune()
    bad.report(0.1, 2)
    assert bad.should_prune()


def test_lora_is_fully_removed_between_trials(tmp_path, cache_dir, demo_dir):
    cfg = _cfg(tmp_path, cache_dir)
    study_dir = tmp_path / "smoke"
    study_dir.mkdir()
    worker = trial_mod.Worker(cfg, study_dir)
    g = torch.Generator().manual_seed(0)
    x, h = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)

    def out():
        with torch.no_grad():
            return worker.base.unet(x, torch.tensor([400]), h).sample

    before = out()

    class FakeTrial:
        number = 0

        def report(self, *a):
            pass

        def should_prune(self):
            return False

    state, value, _ = worker.run(FakeTrial(), {"train.network_dim": 4})
    assert state == "complete"
    assert not any("lora" in n for n, _ in worker.base.unet.named_parameters())
    assert torch.equal(out(), before)  # the next trial starts from the base model exactly


def test_dead_worker_trial_is_retried_once(tmp_path, cache_dir, demo_dir):
    from optuna.trial import TrialState

    cfg = _cfg(tmp_path, cache_dir)
    study_dir = tmp_path / "smoke"
    study_dir.mkdir()
    study = open_study(cfg.sweep, study_dir)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial = study.ask()
    params = suggest(trial, cfg.sweep)
    trial.set_user_attr("host", __import__("socket").gethostname())
    trial.set_user_attr("pid", dead.pid)  # a worker that no longer exists, mid-trial
    table = sweep.run(cfg)
    assert len(table) == 2 and set(table.state) == {"complete"}
    states = [t.state for t in open_study(cfg.sweep, study_dir).get_trials()]
    assert states.count(TrialState.FAIL) == 1 and states.count(TrialState.COMPLETE) == 2
    retried = json.loads((study_dir / f"trial_{trial.number}" / "trial.json").read_text())
    assert retried["state"] == "retried" and retried["params"] == params
    assert "worker running this trial died" in (study_dir / f"trial_{trial.number}" / "error.txt").read_text()


@pytest.mark.parametrize("name", SWEEPS)
def test_every_sweep_file_runs_a_trial_on_the_tiny_model(name, tmp_path, cache_dir, demo_dir):
    cfg = compose([f"+sweep={name}", "model=tiny", "data=demo", "sweep.n_trials=1", f"sweep.root={tmp_path}",
                   f"sweep.reports={tmp_path / 'r'}", f"cache_dir={cache_dir}", "sweep.pruner=none", "train.resolution=32", "data.repeats=1",
                   "eval.steps=2", "eval.seeds=[1]", "eval.max_prompts=1", "eval.strengths=[0,1]"])
    if cfg.sweep.variants:  # keep each variant's settings but at most one epoch, for speed
        for values in cfg.sweep.variants.values():
            if "train.epochs" in values:
                values["train.epochs"] = 1
    cfg.sweep.fixed["train.epochs"] = 1
    table = sweep.run(cfg)
    assert len(table) == 1
    row = table.iloc[0]
    if row.state == "failed":  # only a CUDA-only setting may fail on a CPU, and it says so
        assert "needs a CUDA GPU" in row.reason
    else:
        assert row.state == "complete" and (tmp_path / name / f"trial_{row.trial}" / "verdict.json").exists()


def test_best_line_names_a_whole_epoch_beside_a_pruned_trial():
    # A pruned trial has no best cell, so pandas stores the epoch column as floats.
    table = pd.DataFrame({"trial": [1, 2], "state": ["complete", "pruned"], "objective": [1.3, None],
                          "verdict": ["good", None], "best_epoch": [4.0, float("nan")], "best_strength": [1.0, None],
                          "likeness": [0.5, None], "adherence": [50.0, None], "snippet": ["<lora:s_trial_1:1>", None],
                          "lora_file": ["s_trial_1.safetensors", None], "reason": ["", "pruned"], "duration_s": [60, 5]})
    assert leaderboard.best_text(table).splitlines()[0] == "best: trial 1, epoch 4 at strength 1"


def test_the_sweeps_last_lines_count_the_verdicts_with_an_example_reason(tmp_path):
    cells = [{"epoch": 1, "strength": 0.0, "verdict": "base", "reasons": ["the base model"]},
             {"epoch": 1, "strength": 0.5, "verdict": "underfit", "reasons": ["too little of the subject yet"]},
             {"epoch": 2, "strength": 1.0, "verdict": "good", "reasons": ["likeness 0.8"]},
             {"epoch": 3, "strength": 1.5, "verdict": "overfit", "reasons": ["the asked change fades: 'x'"]}]
    for n in (0, 1):
        (tmp_path / f"trial_{n}").mkdir()
        (tmp_path / f"trial_{n}" / "verdict.json").write_text(json.dumps({"cells": cells}))
    text = leaderboard.verdict_text(tmp_path).splitlines()
    assert text[0] == "cells (epoch x strength): 2 underfit, 2 good, 2 overfit"
    assert text[1] == "  overfit, e.g. trial_0 epoch 3 at strength 1.5: the asked change fades: 'x'"
    assert text[2].startswith("  underfit, e.g. trial_0 epoch 1 at strength 0.5: too little")


def test_the_overfit_example_is_one_that_says_what_showed_instead(tmp_path):
    """The first overfit cell's reason is a CLIP score; a later one says what was asked and what
    showed instead, and that one is the example printed."""
    fade = {"epoch": 1, "strength": 1.5, "verdict": "overfit", "reasons": ["the asked change fades: 'x'"],
            "instead": ""}
    plain = {"epoch": 3, "strength": 1.5, "verdict": "overfit", "instead": "pink background",
             "reasons": ["asked navy background; the images are more like pink background in 3 of 3 seeds"]}
    for n, cells in ((0, [fade]), (1, [fade, plain])):
        (tmp_path / f"trial_{n}").mkdir()
        (tmp_path / f"trial_{n}" / "verdict.json").write_text(json.dumps({"cells": cells}))
    text = leaderboard.verdict_text(tmp_path).splitlines()
    assert text[0] == "cells (epoch x strength): 0 underfit, 0 good, 3 overfit"
    assert text[1] == ("  overfit, e.g. trial_1 epoch 3 at strength 1.5: asked navy background; the images are "
                       "more like pink background in 3 of 3 seeds")


def test_the_printed_leaderboard_leaves_a_pruned_trials_empty_scores_blank():
    table = pd.DataFrame([{"trial": 2, "state": "pruned", "objective": None, "verdict": None, "best_epoch": None,
                           "best_strength": None, "likeness": None, "adherence": None, "snippet": None,
                           "lora_file": None, "reason": "pruned after epoch 1", "duration_s": 10.0}])
    text = leaderboard.render_text(table)
    assert "NaN" not in text and "None" not in text and "pruned after epoch 1" in text
