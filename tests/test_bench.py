"""The benchmark command runs end to end (a tiny configuration) and reports every figure."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import run_cli
from lora_lab.bench import compare as bench


def test_bench_command_reports_all_figures(tmp_path, cache_dir, demo_dir):
    out = tmp_path / "bench"
    proc = run_cli(
        [sys.executable, "-m", "lora_lab.bench", "--model", "tiny", "--trials", "2", "--epochs", "1",
         "--strengths", "0,1", "--prompts", "2", "--steps", "2", "--repeats", "1", "--memory-trials", "3",
         "--cache-dir", str(cache_dir), "--out", str(out)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for label in ("whole run, wall", "lower bound for the sweep's work", "training steps / s",
                  "evaluation images / s", "epoch switching", "per-trial set-up, warm worker", "peak memory",
                  "RSS trial 2 -> 3", "stage   baseline  lora_lab  share  bound"):
        assert label in proc.stdout
    speedup = float(proc.stdout.split("x faster (")[0].rsplit(" ", 1)[-1])
    assert f"{speedup:.2f}x faster (target >= 5x: {'met' if speedup >= 5 else 'MISSED'})" in proc.stdout
    result = json.loads((out / "bench.json").read_text())
    base, ours, bound, probe = result["baseline"], result["sweep"], result["bound"], result["probe"]
    assert base["images"] == 2 * 2 * 2  # trials x strengths x prompts, one image per X/Y cell
    assert ours["trials"] == 2 and ours["steps"] == base["steps"] == 2 * 6
    assert ours["images"] == 2 + 2 * 2  # base images once per worker, then epochs x strengths>0 x prompts
    assert result["speedup"] == base["wall_s"] / ours["wall_s"]
    assert len(result["memory"]["rss_mb"]) == 3 and result["machine"]["cores"] >= 1
    assert 0 <= result["switch_share_of_render"] < 1
    # Where the sweep's seconds went: every stage, adding up to the wall time.
    for side in (base, ours):
        assert set(side["stages"]) == set(bench.STAGES)
        assert sum(side["stages"].values()) == pytest.approx(side["wall_s"])
        assert all(side["stages"][k] > 0 for k in ("load", "train", "render"))
    assert ours["stages"]["score"] > 0 and ours["stages"]["write"] > 0
    # The bound: one load, the sweep's training at its own (cached) speed, its images at the
    # best batched speed the probe measured.
    assert sorted(map(int, probe["images_per_s"])) == [1, 2, 4, 8, 16, 32]
    assert probe["best_images_per_s"] == max(probe["images_per_s"].values())
    assert bound["train_s"] == ours["train_s"] and bound["load_s"] == probe["load_s"] > 0
    assert bound["render_s"] == pytest.approx(ours["images"] / probe["best_images_per_s"])
    assert result["bound_ratio"] == pytest.approx(ours["wall_s"] / bound["total_s"])
    assert 1 <= ours["batch_size"] <= 32


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_bench_on_cuda_refuses_plainly_without_a_gpu(tmp_path):
    proc = run_cli([sys.executable, "-m", "lora_lab.bench", "--device", "cuda", "--out", str(tmp_path / "b")], cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: --device cuda: this machine has no CUDA GPU that torch can use")
    assert "Traceback" not in proc.stderr and not (tmp_path / "b").exists()


def test_bench_on_cuda_measures_what_users_run_on_a_gpu():
    """fp16 mixed precision, 8-bit AdamW, an SD 1.5-shaped model at 512 px on the GPU."""
    from argparse import Namespace

    args = Namespace(device="cuda", strengths=[0.0, 1.0], cache_dir="/c", model="bench_sd15", resolution=512,
                     repeats=1, prompts=2, steps=10, workers=1)
    cmd = bench._sweep_args(args, "bench", [4], 1, tmp_root := __import__("pathlib").Path("/r"))
    assert {"device=cuda", "train.mixed_precision=fp16", "train.optimizer=adamw8bit", "model=bench_sd15",
            "eval.size=512"} <= set(cmd)
    assert f"sweep.root={tmp_root}" in cmd


def test_bench_with_workers_runs_the_sweep_so_and_bounds_it_per_worker():
    from argparse import Namespace

    args = Namespace(device="cpu", strengths=[0.0, 1.0], cache_dir="/c", model="bench", resolution=64,
                     repeats=1, prompts=2, steps=10, workers=2)
    assert "sweep.workers=2" in bench._sweep_args(args, "bench", [4], 1, __import__("pathlib").Path("/r"))
    ours, floor = {"train_s": 20.0, "images": 60}, {"load_s": 5.0, "best_images_per_s": 6.0}
    assert bench.bound_of(ours, floor) == {"load_s": 5.0, "train_s": 20.0, "render_s": 10.0, "total_s": 35.0}
    assert bench.bound_of(ours, floor, 2)["total_s"] == 25.0  # two workers train side by side


def test_sd15_random_model_has_sd15s_architecture():
    from lora_lab.models.builtin import sd15_modules

    with torch.device("meta"):  # the real sizes, without allocating them
        unet, vae, text_encoder = sd15_modules()
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text_encoder)]
    assert counts == [859_520_964, 83_653_863, 123_060_480]  # SD 1.5's UNet, VAE and CLIP ViT-L text model
    assert unet.config.cross_attention_dim == 768 and vae.config.scaling_factor == 0.18215


def test_bench_train_profiles_the_loop_against_the_unet_floor(tmp_path, cache_dir, demo_dir):
    from argparse import Namespace

    from lora_lab.bench import train_profile

    args = Namespace(model="tiny", resolutions=[32], steps=2, cache_dir=str(cache_dir), out=str(tmp_path))
    result = train_profile.profile(args)
    row = result["rows"][0]
    assert json.loads((tmp_path / "train.json").read_text()) == result
    assert row["resolution"] == 32 and all(row[k] > 0 for k in ("cached", "uncached", "floor", "floor_1_thread"))
    assert row["cache_gain"] == row["cached"] / row["uncached"]
    assert row["loop_share_of_floor"] == row["cached"] / row["floor"]
    assert 0 < row["optimizer_ms_fused"] and 0 < row["optimizer_ms_single"]
    lines = train_profile.table(result).splitlines()
    assert lines[0].startswith("px") and lines[1].split()[0] == "32" and len(lines) == 2
