"""The captioning helper with a tiny randomly initialised BLIP saved locally, through the same
transformers loading a hub id or a downloaded folder takes."""

from __future__ import annotations

import sys

import pytest
from PIL import Image

from conftest import run_cli
from lora_lab.data.captioner import parse
from lora_lab.errors import LoraLabError

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "woman", "man", "red", "hair",
         "smiling", "portrait", "outdoors"]


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder = tmp_path_factory.mktemp("blip")
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]"))
    torch.manual_seed(0)
    config = BlipConfig(
        text_config=dict(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=37, max_position_embeddings=64, bos_token_id=5, sep_token_id=3,
                         pad_token_id=0, encoder_hidden_size=32),
        vision_config=dict(hidden_size=32, image_size=32, patch_size=8, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=37),
        projection_dim=32)
    BlipForConditionalGeneration(config).save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


def _folder(tmp_path):
    data = tmp_path / "data" / "10_sks"
    data.mkdir(parents=True)
    Image.new("RGB", (40, 60), (200, 30, 30)).save(data / "a.jpg")
    Image.new("RGB", (60, 40), (30, 200, 30)).save(data / "b.png")
    Image.new("RGB", (50, 50), (30, 30, 200)).save(data / "c.webp")
    (data / "c.txt").write_text("sks, my own caption\n", encoding="utf-8")
    return data


def test_captions_are_written_with_the_token_and_never_overwritten(blip_dir, tmp_path):
    data = _folder(tmp_path)
    cmd = [sys.executable, "-m", "lora_lab.caption", str(tmp_path / "data"), f"model={blip_dir}", "token=sks",
           "max_new_tokens=6"]
    proc = run_cli(cmd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "captions: 2 written, 1 kept" in proc.stdout and "keeping 1 existing caption" in proc.stdout
    for name in ("a", "b"):
        text = (data / f"{name}.txt").read_text(encoding="utf-8").strip()
        words = text.split(", ", 1)
        assert words[0] == "sks" and len(words) == 2
        assert set(words[1].split()) <= set(WORDS[6:])  # the model's own words, decoded
    assert (data / "c.txt").read_text(encoding="utf-8") == "sks, my own caption\n"
    proc = run_cli(cmd + ["overwrite=true", "extension=.caption"])
    assert proc.returncode == 0 and "captions: 3 written, 0 kept" in proc.stdout
    assert (data / "c.caption").exists() and (data / "c.txt").read_text(encoding="utf-8") == "sks, my own caption\n"


def test_bad_arguments_are_one_sentence(tmp_path):
    with pytest.raises(LoraLabError, match="caption: model=... is needed"):
        parse([str(tmp_path)])
    with pytest.raises(LoraLabError, match="'modle=x' is not an option; allowed: model=..."):
        parse([str(tmp_path), "modle=x"])
    with pytest.raises(LoraLabError, match="overwrite must be true or false"):
        parse([str(tmp_path), "model=x", "overwrite=yes"])
    proc = run_cli([sys.executable, "-m", "lora_lab.caption", str(tmp_path / "none"), "model=x"])
    assert proc.returncode == 2 and "caption: " in proc.stderr and "is not a folder" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = run_cli([sys.executable, "-m", "lora_lab.caption", str(tmp_path / "empty"),
                    f"model={tmp_path / 'no-model'}"])
    assert proc.returncode == 2 and "holds no images" in proc.stderr


def test_help_prints_the_usage_and_exits_0():
    proc = run_cli([sys.executable, "-m", "lora_lab.caption", "--help"])
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: python -m lora_lab.caption PATH model=HUB_ID_OR_FOLDER")
    assert "overwrite=true" in proc.stdout  # the module's own description follows
