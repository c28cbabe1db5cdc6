"""The benchmark command runs end to end (a tiny configuration) and reports every figure."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_command_reports_all_figures(tmp_path, cache_dir, demo_dir):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "lora_lab.bench", "--model", "tiny", "--trials", "2", "--epochs", "1",
         "--strengths", "0,1", "--prompts", "2", "--steps", "2", "--repeats", "1", "--memory-trials", "3",
         "--cache-dir", str(cache_dir), "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for label in ("whole run, wall", "training steps / s", "evaluation images / s", "epoch/strength switching",
                  "per-trial set-up, warm worker", "peak memory", "RSS trial 2 -> 3"):
        assert label in proc.stdout
    result = json.loads((out / "bench.json").read_text())
    base, ours = result["baseline"], result["sweep"]
    assert base["images"] == 2 * 2 * 2  # trials x strengths x prompts, one image per X/Y cell
    assert ours["trials"] == 2 and ours["steps"] == base["steps"] == 2 * 6
    assert ours["images"] == 2 + 2 * 2  # base images once per worker, then epochs x strengths>0 x prompts
    assert result["speedup"] == base["wall_s"] / ours["wall_s"] and base["load_s"] > ours["load_s"]
    assert len(result["memory"]["rss_mb"]) == 3 and result["machine"]["cores"] >= 1
    assert 0 <= result["switch_share_of_render"] < 1
