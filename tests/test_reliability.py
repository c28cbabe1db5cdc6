"""Reliability: killed workers, per-trial faults, a full disk, parallel workers (journal file and
PostgreSQL), and what the code may read and write."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open

from conftest import run_all, run_cli
from lora_lab.cli import compose
from lora_lab.errors import LoraLabError
from lora_lab.report import leaderboard
from lora_lab.sweep import run as sweep

ROOT = Path(__file__).resolve().parent.parent


def _overrides(tmp_path, cache_dir, *extra):
    return ["+sweep=smoke", f"sweep.root={tmp_path / 'sweeps'}", f"sweep.reports={tmp_path / 'reports'}",
            f"cache_dir={cache_dir}", *extra]


def test_sigkill_mid_trial_then_resume(tmp_path, cache_dir, demo_dir):
    args = [sys.executable, "-m", "lora_lab.sweep", *_overrides(
        tmp_path, cache_dir, "sweep.fixed={train.epochs:3,train.resolution:32,data.repeats:8}")]
    study = tmp_path / "sweeps" / "smoke"
    # Kill it as soon as the second trial is mid-training (its first epoch file is written),
    # however long the first trial took on this machine.
    (run,) = run_all([args], cwd=tmp_path,
                     until=lambda: bool(list((study / "trial_1" / "lora").glob("*-000001.safetensors"))))
    assert run.returncode == -signal.SIGKILL, f"the sweep ended before it could be killed: {run.stderr[-2000:]}"
    first = json.loads((study / "trial_0" / "trial.json").read_text())
    assert first["state"] == "complete"
    done_mtime = {p.name: p.stat().st_mtime_ns for p in (study / "trial_0" / "lora").iterdir()}
    killed_params = json.loads((study / "trial_1" / "trial.json").read_text())["params"]

    rerun = run_cli(args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "trial 1: its worker" in rerun.stdout and "died; queued again" in rerun.stdout
    table = leaderboard.build(study)
    assert len(table) == 2 and set(table.state) == {"complete"}
    assert {p.name: p.stat().st_mtime_ns for p in (study / "trial_0" / "lora").iterdir()} == done_mtime
    retried = json.loads((study / "trial_1" / "trial.json").read_text())
    assert retried["state"] == "retried"
    rerun_trial = table[table.trial != 0].iloc[0]
    assert rerun_trial["train.network_dim"] == killed_params["train.network_dim"]
    leftovers = list((study / "trial_1").rglob("*.tmp"))
    assert leftovers == []
    for f in (study / "trial_1" / "lora").glob("*.safetensors"):  # every file there is whole
        with safe_open(str(f), framework="pt") as fh:
            assert fh.metadata()["ss_network_module"] == "networks.lora"


def test_commands_under_test_fail_on_a_stall_not_on_a_slow_machine():
    """run_cli waits as long as a command makes progress (here 3 s of output against a 2 s
    limit) and fails one that makes none for the limit, with what it printed."""
    slow = run_cli([sys.executable, "-c", "import time\nfor i in range(6): print(i, flush=True); time.sleep(0.5)"],
                   stall=2)
    assert slow.returncode == 0 and slow.stdout.split() == ["0", "1", "2", "3", "4", "5"]
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"made no progress .* for 2 s; output so far:\nwaiting"):
        run_cli([sys.executable, "-c", "import time; print('waiting', flush=True); time.sleep(60)"], stall=2)
    assert time.monotonic() - started < 30


def test_nan_oom_and_scorer_errors_fail_only_their_trial(tmp_path, cache_dir, demo_dir, monkeypatch):
    from lora_lab.evaluate import scores
    from lora_lab.train import cache
    from lora_lab.train import loop as train_mod

    calls = {"n": 0}
    real_latents, real_loop, real_score = cache.cache_latents, train_mod._loop, scores.Scorer.score

    def latents(*a, **k):
        out = real_latents(*a, **k)
        if calls["n"] == 1:
            return {key: torch.full_like(v, float("nan")) for key, v in out.items()}
        return out

    def loop(*a, **k):
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_loop(*a, **k)

    def score(self, *a, **k):
        if calls["n"] == 3:
            raise RuntimeError("scorer exploded")
        return real_score(self, *a, **k)

    real_run = sweep.Worker.run

    def run(self, trial, params):
        calls["n"] += 1
        return real_run(self, trial, params)

    monkeypatch.setattr(cache, "cache_latents", latents)
    monkeypatch.setattr(train_mod, "_loop", loop)
    monkeypatch.setattr(scores.Scorer, "score", score)
    monkeypatch.setattr(sweep.Worker, "run", run)
    table = sweep.run(compose(_overrides(tmp_path, cache_dir, "sweep.grid={train.network_dim:[1,2,3,4]}")))
    assert len(table) == 4
    reasons = " | ".join(table.reason)
    assert "loss became nan at step 1 (epoch 1)" in reasons
    assert "OutOfMemoryError: CUDA out of memory" in reasons
    assert "RuntimeError: scorer exploded" in reasons
    assert sorted(table.state) == ["complete", "failed", "failed", "failed"]


def test_full_disk_stops_the_sweep_clearly_and_resumes(tmp_path, cache_dir, demo_dir, monkeypatch):
    from lora_lab.lora import kohya as kohya_io

    real = kohya_io.atomic_save
    state = {"raised": False}

    def full(*a, **k):
        if not state["raised"]:
            state["raised"] = True
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(kohya_io, "atomic_save", full)
    cfg = compose(_overrides(tmp_path, cache_dir))
    with pytest.raises(LoraLabError, match=r"No space left on device\. Free some space .* run the same command again"):
        sweep.run(cfg)
    monkeypatch.setattr(kohya_io, "atomic_save", real)
    table = sweep.run(cfg)
    assert len(table) == 2 and set(table.state) == {"complete"} and set(table["train.network_dim"]) == {2, 4}


def test_unwritable_sweep_root(tmp_path, cache_dir, demo_dir):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LoraLabError, match=f"sweep.root: cannot write to {blocker}/smoke"):
        sweep.run(compose(["+sweep=smoke", f"sweep.root={blocker}", f"cache_dir={cache_dir}"]))


def _points_once(table: pd.DataFrame, study: Path, expected: set) -> None:
    assert len(table) == len(expected) and set(table.state) == {"complete"}
    assert sorted(table["train.network_dim"]) == sorted(expected)
    dims = [json.loads(p.read_text())["params"]["train.network_dim"] for p in study.glob("trial_*/trial.json")
            if json.loads(p.read_text())["state"] == "complete"]
    assert sorted(dims) == sorted(expected)  # no grid point trained twice


def test_two_workers_on_one_machine(tmp_path, cache_dir, demo_dir):
    args = [sys.executable, "-m", "lora_lab.sweep", *_overrides(
        tmp_path, cache_dir, "sweep.grid={train.network_dim:[1,2,3,4]}", "sweep.workers=2")]
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    study = tmp_path / "sweeps" / "smoke"
    assert len({m for m in re.findall(r"worker (\d+): loaded", proc.stdout)}) == 2
    # The cores are shared out: each worker gets its part, not every core (4 threads on 2 cores
    # trained 4x slower).
    import torch

    share = max(1, torch.get_num_threads() // 2)
    threads = [int(n) for n in re.findall(r"worker \d+: loaded .* (\d+) CPU threads?", proc.stdout)]
    assert threads == [share, share], proc.stdout[-2000:]
    _points_once(leaderboard.build(study), study, {1, 2, 3, 4})


PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), None) \
    if Path("/usr/lib/postgresql").is_dir() else None


@pytest.fixture
def postgres(tmp_path):
    """A throwaway PostgreSQL server on loopback (Debian's postgresql package)."""
    if PG_BIN is None or shutil.which("runuser") is None:
        pytest.skip("needs Debian's postgresql package (make test installs it when run as root)")
    pytest.importorskip("psycopg")
    data = Path(f"/tmp/lora-lab-pg-{os.getpid()}")
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(mode=0o700)
    user = "postgres" if os.getuid() == 0 else None
    if user:
        shutil.chown(data, user)

    def as_pg(*cmd):
        full = (["runuser", "-u", user, "--"] if user else []) + [str(PG_BIN / cmd[0]), *cmd[1:]]
        return run_cli(full)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init = as_pg("initdb", "-D", str(data / "db"), "-U", "lora", "--auth=trust")
    assert init.returncode == 0, init.stderr
    start = as_pg("pg_ctl", "-D", str(data / "db"), "-w", "-l", str(data / "log"), "-o",
                  f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start")
    assert start.returncode == 0, start.stderr + (data / "log").read_text()
    yield f"postgresql+psycopg://lora@127.0.0.1:{port}/postgres"
    as_pg("pg_ctl", "-D", str(data / "db"), "-m", "immediate", "stop")
    shutil.rmtree(data, ignore_errors=True)


def test_three_workers_share_a_postgresql_study(tmp_path, cache_dir, demo_dir, postgres):
    args = [sys.executable, "-m", "lora_lab.sweep", *_overrides(
        tmp_path, cache_dir, "sweep.grid={train.network_dim:[1,2,3,4,5,6]}", f"sweep.storage={postgres}")]
    runs = run_all([args] * 3, cwd=tmp_path)  # as if on three machines sharing one database and one folder
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    outs = [(run.stdout, run.stderr) for run in runs]
    study = tmp_path / "sweeps" / "smoke"
    _points_once(leaderboard.build(study), study, {1, 2, 3, 4, 5, 6})
    ran = [len(re.findall(r"trial \d+ complete", out)) for out, _ in outs]
    assert sum(ran) == 6


def test_weights_are_never_unpickled_unsafely():
    for path in (ROOT / "lora_lab").rglob("*.py"):
        for line in path.read_text().splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path.name}: {line.strip()}"


def test_a_sweep_writes_only_its_study_report_and_cache(tmp_path, demo_dir):
    work = tmp_path / "cwd"
    work.mkdir()
    proc = run_cli([sys.executable, "-m", "lora_lab.sweep", "+sweep=smoke"], cwd=work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in work.iterdir()) == ["reports", "sweeps"]
    assert sorted(p.name for p in (work / "sweeps").iterdir()) == [".cache", "smoke"]
    assert sorted(p.name for p in (work / "reports").iterdir()) == ["smoke"]


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lora_lab.config import conf_dir, register

    register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name="config", return_hydra_config=True,
                            overrides=["hydra/launcher=slurm_gpu", "+sweep=rank_alpha", "worker=3"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1 and launcher.partition == "gpu"
    assert cfg.worker == 3 and cfg.sweep.name == "rank_alpha"
