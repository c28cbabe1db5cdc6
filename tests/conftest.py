"""Shared fixtures: one cache folder (tiny model, demo data) and one loaded tiny base model per
session; :func:`run_cli`, which runs a command to its end however busy the machine is."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_dir(cache_dir) -> Path:
    from lora_lab.models.builtin import tiny_folder

    return tiny_folder(cache_dir)


@pytest.fixture(scope="session")
def base(cache_dir, tiny_dir):
    import torch

    from lora_lab.config import ModelConfig
    from lora_lab.models.base import load_base

    return load_base(ModelConfig(), cache_dir, torch.device("cpu"))


@pytest.fixture(scope="session")
def demo_dir(cache_dir) -> Path:
    from lora_lab.data.demo import demo_folder

    return demo_folder(cache_dir)


def make_config(cache_dir: Path, output_dir: Path, **train):
    """A fast tiny-model config for tests."""
    from lora_lab.config import Config, DataConfig, ModelConfig, TrainConfig

    t = dict(network_dim=4, network_alpha=2.0, learning_rate=1e-3, epochs=2, batch_size=2, resolution=32)
    t.update(train)
    return Config(
        model=ModelConfig(),
        data=DataConfig(token="sks", repeats=1),
        train=TrainConfig(**t),
        output_dir=str(output_dir),
        cache_dir=str(cache_dir),
        device="cpu",
    )


@pytest.fixture(scope="session")
def script_study(tmp_path_factory, cache_dir, demo_dir):
    """A finished smoke sweep on demo faces whose captions and token carry HTML."""
    import shutil

    from lora_lab.cli import compose
    from lora_lab.sweep import run as sweep

    root = tmp_path_factory.mktemp("study")
    data = root / "data" / "2_sks"
    shutil.copytree(demo_dir / "10_sks woman", data)
    (data / "00.txt").write_text("photo of sks woman, <script>alert(1)</script>", encoding="utf-8")
    cfg = compose(["+sweep=smoke", f"sweep.root={root / 'sweeps'}", f"sweep.reports={root / 'reports'}",
                   f"cache_dir={cache_dir}", "data=folder", f"data.path={root / 'data'}",
                   "data.token='<b>sks</b> woman'", "eval.seeds=[1,2]"])
    sweep.run(cfg)
    return root / "sweeps" / "smoke", root / "reports" / "smoke"


@pytest.fixture(scope="session")
def xl_dir(cache_dir) -> Path:
    """The tiny SDXL-shaped model as a diffusers folder."""
    from lora_lab.models.builtin import tiny_folder

    return tiny_folder(cache_dir, "tiny-sdxl")


@pytest.fixture(scope="session")
def xl_base(cache_dir, xl_dir):
    import torch

    from lora_lab.config import ModelConfig
    from lora_lab.models.base import load_base

    cfg = ModelConfig(name="tiny-sdxl", builtin="tiny-sdxl", base_version="sdxl_base_v1-0")
    return load_base(cfg, cache_dir, torch.device("cpu"))


# A command under test fails when it stops making progress, not when a slow or busy machine
# makes it slow: no new output and no file written for this long means it hangs.
STALL_S = float(os.environ.get("LORA_LAB_TEST_STALL_S", "600"))


def run_cli(args: Sequence[str], *, cwd=None, env=None, watch: Optional[Path] = None,
            stall: float = STALL_S) -> subprocess.CompletedProcess:
    """Run ``args`` to its end and return its exit code and text output, as ``subprocess.run``
    with ``capture_output=True, text=True`` would; it fails the test only when the command
    makes no progress (no output, nothing written under ``watch`` or ``cwd``) for ``stall``
    seconds, and then says so with the output so far."""
    return run_all([args], cwd=cwd, env=env, watch=watch, stall=stall)[0]


def run_all(commands: Sequence[Sequence[str]], *, cwd=None, env=None, watch: Optional[Path] = None,
            stall: float = STALL_S, until: Optional[Callable[[], bool]] = None) -> List[subprocess.CompletedProcess]:
    """Start every command at once and wait for all of them, as :func:`run_cli`. With
    ``until``, kill the ones still running (SIGKILL, as a crash would) as soon as it is true:
    their returncode is then -9."""
    with tempfile.TemporaryDirectory(prefix="lora-lab-cli-") as logs:
        outs = [(Path(logs) / f"{i}.out", Path(logs) / f"{i}.err") for i in range(len(commands))]
        procs = []
        for args, (out, err) in zip(commands, outs):
            with open(out, "w") as o, open(err, "w") as e:
                procs.append(subprocess.Popen([str(a) for a in args], cwd=cwd, env=env, stdout=o, stderr=e))
        roots = [Path(r) for r in (watch, cwd) if r is not None]
        try:
            _wait(procs, outs, roots, stall, until)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return [subprocess.CompletedProcess(p.args, p.poll(), out.read_text(errors="replace"),
                                            err.read_text(errors="replace")) for p, (out, err) in zip(procs, outs)]


def _wait(procs, outs, roots, stall: float, until) -> None:
    last_sign, last_change, last_scan, newest = None, time.monotonic(), 0.0, 0
    while any(p.poll() is None for p in procs):
        if until is not None and until():
            return
        now = time.monotonic()
        if now - last_scan > 10:  # files written anywhere under the watched folders
            newest, last_scan = max([_newest(r) for r in roots], default=0), now
        sign = (tuple(f.stat().st_size for pair in outs for f in pair), newest)
        if sign != last_sign:
            last_sign, last_change = sign, now
        elif now - last_change > stall:
            tail = "".join(f.read_text(errors="replace")[-1500:] for pair in outs for f in pair)
            pytest.fail(f"{procs[0].args[:4]}... made no progress (no output, no file written) for "
                        f"{stall:.0f} s; output so far:\n{tail}")
        time.sleep(0.5)


def _newest(root: Path) -> int:
    newest = 0
    for path in root.rglob("*"):
        try:
            newest = max(newest, path.stat().st_mtime_ns)
        except OSError:  # removed while we looked
            continue
    return newest
