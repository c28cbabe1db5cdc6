"""One table of bad inputs and the one message each gets, refused before any training step.

Every row goes through the sweep entry point (the strictest path: it checks data, prompt suite,
model path and settings before it creates the study folder), so each also proves that nothing
is left behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from lora_lab.cli import compose
from lora_lab.errors import LoraLabError
from lora_lab.sweep import run as sweep


def _kohya(root: Path, caption: bytes = b"photo of sks") -> Path:
    (root / "5_sks").mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(root / "5_sks" / "a.png")
    (root / "5_sks" / "a.txt").write_bytes(caption)
    return root


def corrupt_image(d):
    root = _kohya(d)
    (root / "5_sks" / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    return [f"data.path={root}"], "b.jpg cannot be read as an image"


def zero_byte_image(d):
    root = _kohya(d)
    (root / "5_sks" / "c.png").write_bytes(b"")
    return [f"data.path={root}"], "c.png is empty (0 bytes)"


def text_file_named_png(d):
    root = _kohya(d)
    (root / "5_sks" / "notes.png").write_text("my captions, not an image")
    return [f"data.path={root}"], "notes.png cannot be read as an image"


def empty_folder(d):
    d.mkdir()
    return [f"data.path={d}"], "has no '<repeats>_<token>' folder with images"


def no_repeats_prefix(d):
    root = _kohya(d)
    (root / "anantn").mkdir()
    Image.new("RGB", (8, 8)).save(root / "anantn" / "x.png")
    return [f"data.path={root}"], "has no '<repeats>_' prefix, so kohya would ignore its 1 images"


def caption_in_latin1(d):
    return [f"data.path={_kohya(d, 'photo of sks, café'.encode('latin-1'))}"], "a.txt is not UTF-8 text"


def missing_caption_column(d):
    d.mkdir()
    Image.new("RGB", (8, 8)).save(d / "a.png")
    (d / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "prompt": "photo of sks"}) + "\n")
    return [f"data.path={d}"], "no caption column 'text' (the line has: file_name, prompt); set data.caption_column"


def unknown_scheduler(d):
    return ["train.lr_scheduler=cosine_annealing"], "train.lr_scheduler: unknown value 'cosine_annealing'"


def unknown_optimizer(d):
    return ["train.optimizer=adam"], "train.optimizer: unknown value 'adam'; allowed: adamw, adamw8bit, adafactor"


def unknown_sampler(d):
    return ["eval.sampler='DPM++ 3M'"], "eval.sampler: unknown value 'DPM++ 3M'; allowed: Euler, Euler a"


def rank_zero(d):
    return ["train.network_dim=0"], "train.network_dim: must be a whole number >= 1, got 0"


def negative_alpha(d):
    return ["train.network_alpha=-8"], "train.network_alpha: must be a number > 0, got -8"


def strength_not_a_number(d):
    return ["eval.strengths=[0,0.5,high]"], "Value 'high' of type 'str' could not be converted to Float"


def model_path_missing(d):
    return ["model=sd15", f"model.pretrained={d / 'v1-5-pruned.safetensors'}"], "v1-5-pruned.safetensors does not exist"


def pickle_checkpoint(d):
    d.mkdir()
    (d / "v1-5-pruned.ckpt").write_bytes(b"\x80\x04pickle")
    return ["model=sd15", f"model.pretrained={d / 'v1-5-pruned.ckpt'}"], "is a pickle checkpoint (.ckpt)"


def suite_without_token(d):
    d.mkdir()
    (d / "suite.yaml").write_text("kind: person\nlikeness: ['photo of a woman']\n")
    return [f"eval.suite={d / 'suite.yaml'}"], "prompt 'photo of a woman' has no {token} placeholder"


def grid_key_not_a_config_path(d):
    return ["sweep.grid={train.lr_schedular:[constant]}"], "'train.lr_schedular' is not a config path"


def unwritable_output(d):
    d.write_text("a file, not a folder")
    return [f"sweep.root={d}"], f"sweep.root: cannot write to {d}/smoke"


def fp16_on_a_cpu(d):
    return ["train.mixed_precision=fp16", "device=cpu"], "train.mixed_precision=fp16 needs a CUDA GPU"


CASES = [corrupt_image, zero_byte_image, text_file_named_png, empty_folder, no_repeats_prefix, caption_in_latin1,
         missing_caption_column, unknown_scheduler, unknown_optimizer, unknown_sampler, rank_zero, negative_alpha,
         strength_not_a_number, model_path_missing, pickle_checkpoint, suite_without_token,
         grid_key_not_a_config_path, unwritable_output, fp16_on_a_cpu]


@pytest.mark.parametrize("case", CASES, ids=lambda f: f.__name__)
def test_bad_input_gets_one_clear_message_and_leaves_nothing(case, tmp_path, cache_dir, demo_dir):
    overrides, message = case(tmp_path / "input")
    if any(o.startswith("data.path=") for o in overrides):
        overrides = ["data=folder", "data.token=sks"] + overrides
    if not any(o.startswith("sweep.root=") for o in overrides):
        overrides.append(f"sweep.root={tmp_path / 'sweeps'}")
    if any(o.startswith("sweep.grid=") for o in overrides):
        overrides = ["++" + o if o.startswith("sweep.grid=") else o for o in overrides]
    with pytest.raises(LoraLabError) as info:
        sweep.run(compose(["+sweep=smoke", f"cache_dir={cache_dir}", *overrides]))
    assert message in str(info.value)
    assert not (tmp_path / "sweeps").exists()  # refused before any study, trial or file

