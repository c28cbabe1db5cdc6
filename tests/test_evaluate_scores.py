"""Scorers on real code paths: MTCNN finds the demo face, CLIP score convention, random-weight notes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from lora_lab.config import ClipScorerConfig, FaceScorerConfig
from lora_lab.errors import ConfigError
from lora_lab.evaluate.scores import RANDOM_NOTE, Scorer, diversity

TINY_CLIP = ClipScorerConfig(model="lora-lab-tiny-clip", pretrained=None)


@pytest.fixture(scope="module")
def scorer():
    return Scorer("person", FaceScorerConfig(pretrained=None), TINY_CLIP, torch.device("cpu"))


def test_references_and_face_detection(scorer, demo_dir):
    paths = sorted((demo_dir / "10_sks woman").glob("*.png"))
    ref = scorer.references(paths)
    assert ref.face_rate == 1.0 and ref.faces.shape == (12, 512)
    assert 0 < ref.face_ceiling <= 1 and 0 < ref.clip_ceiling <= 1
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    real = Image.open(paths[0])
    rows = scorer.score([noise, real], [None, "a photo of a person with red hair"], ref)
    assert rows[0]["face_detected"] is False and math.isnan(rows[0]["face_likeness"])
    assert rows[1]["face_detected"] is True and -1 <= rows[1]["face_likeness"] <= 1
    assert math.isnan(rows[0]["clip_adherence"])
    # torchmetrics' CLIPScore convention: 100 * max(cos, 0).
    img = scorer.clip.images([real])[0]
    txt = scorer.clip.texts(["a photo of a person with red hair"])[0]
    assert rows[1]["clip_adherence"] == pytest.approx(100 * max(float(img @ txt), 0.0), abs=1e-4)
    assert rows[1]["closest_reference"] == paths[0].name and rows[1]["clip_i_max"] == pytest.approx(1.0, abs=1e-5)
    assert rows[1]["clip_model"] == "lora-lab-tiny-clip/random"


def test_contrastive_adherence_is_clips_zero_shot_over_the_pair(scorer, demo_dir):
    """ask_prob: softmax of the two cosines at the model's own logit scale; swapping the ask and
    the versus gives 1 - p; without a versus it is NaN (the CLIP score is used)."""
    real = Image.open(sorted((demo_dir / "10_sks woman").glob("*.png"))[0])
    ref = scorer.references(sorted((demo_dir / "10_sks woman").glob("*.png"))[:2])
    ask, own = "a photo of a person with short hair", "a photo of a person with long hair"
    rows = scorer.score([real, real, real], [ask, own, ask], ref, [own, ask, None])
    img = scorer.clip.images([real])[0]
    t_ask, t_own = scorer.clip.texts([ask, own])
    scale = float(scorer.clip.model.logit_scale.detach().exp())
    expected = 1 / (1 + math.exp(-scale * float(img @ t_ask - img @ t_own)))
    assert rows[0]["ask_prob"] == pytest.approx(expected, abs=1e-5)
    assert rows[1]["ask_prob"] == pytest.approx(1 - expected, abs=1e-5)
    assert math.isnan(rows[2]["ask_prob"]) and not math.isnan(rows[2]["clip_adherence"])
    assert scorer.clip.logit_scale == pytest.approx(min(scale, 100.0))


def test_random_weights_are_said_plainly(scorer, monkeypatch):
    assert scorer.random_weights and RANDOM_NOTE in scorer.notes
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = Scorer("object", FaceScorerConfig(), ClipScorerConfig(model="lora-lab-tiny-clip", pretrained="openai"),
                     torch.device("cpu"))
    assert offline.random_weights and offline.face is None
    assert "scores not meaningful: random scorer weights" in offline.notes


def test_local_scorer_weights_load(tmp_path, scorer):
    from safetensors.torch import save_file

    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in scorer.clip.model.state_dict().items()}, str(path))
    loaded = Scorer("style", FaceScorerConfig(), ClipScorerConfig(model="lora-lab-tiny-clip", pretrained=str(path)),
                    torch.device("cpu"))
    assert not loaded.random_weights and RANDOM_NOTE not in loaded.notes
    with pytest.raises(ConfigError, match="eval.clip.pretrained: .* does not exist"):
        Scorer("style", FaceScorerConfig(), ClipScorerConfig(model="lora-lab-tiny-clip",
                                                             pretrained=str(tmp_path / "no.safetensors")),
               torch.device("cpu"))
    with pytest.raises(ConfigError, match="eval.clip.model: unknown open_clip model 'ViT-Q-99'"):
        Scorer("style", FaceScorerConfig(), ClipScorerConfig(model="ViT-Q-99"), torch.device("cpu"))


def test_diversity():
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([0.0, 1.0])
    assert diversity([a, a]) == pytest.approx(0.0)
    assert diversity([a, b]) == pytest.approx(1.0)
    assert math.isnan(diversity([a]))


def test_references_are_embedded_once_per_set_of_files(demo_dir, tmp_path):
    import os
    import shutil

    scorer = Scorer("object", FaceScorerConfig(pretrained=None), TINY_CLIP, torch.device("cpu"))
    paths = []
    for src in sorted((demo_dir / "10_sks woman").glob("*.png"))[:3]:
        paths.append(tmp_path / src.name)
        shutil.copyfile(src, paths[-1])
    calls = []
    embed = scorer.clip.images
    scorer.clip.images = lambda images: calls.append(len(images)) or embed(images)
    first = scorer.references(paths)
    assert scorer.references(list(paths)) is first and calls == [3]  # a second trial: no work
    assert scorer.references(paths[:2]) is not first and calls == [3, 2]  # another set of files
    Image.open(paths[1]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(paths[0])  # a file changed
    os.utime(paths[0], ns=(1, 1))
    again = scorer.references(paths)
    assert calls == [3, 2, 3] and not torch.equal(again.clip[0], first.clip[0])


def test_likeness_references_are_seen_upright_like_training_sees_them(demo_dir, tmp_path):
    """A phone photo stores its pixels sideways with an EXIF orientation tag: the references
    (like training) must use the upright picture, not score a face lying down."""
    from lora_lab.images import open_rgb

    scorer = Scorer("object", FaceScorerConfig(pretrained=None), TINY_CLIP, torch.device("cpu"))
    upright = Image.open(sorted((demo_dir / "10_sks woman").glob("*.png"))[0]).convert("RGB").resize((48, 64))
    upright.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": the stored pixels are the upright image turned CCW
    upright.rotate(90, expand=True).save(tmp_path / "phone.jpg", exif=exif, quality=100)
    assert Image.open(tmp_path / "phone.jpg").size == (64, 48) and open_rgb(tmp_path / "phone.jpg").size == (48, 64)
    seen = np.asarray(open_rgb(tmp_path / "phone.jpg"), dtype=float)
    assert np.abs(seen - np.asarray(upright, dtype=float)).mean() < 8  # JPEG's loss only
    a = scorer.references([tmp_path / "phone.jpg"]).clip[0]
    b = scorer.references([tmp_path / "upright.png"]).clip[0]
    sideways = scorer.clip.images([Image.open(tmp_path / "phone.jpg").convert("RGB")])[0]
    assert float(a @ b) > float(a @ sideways)


def test_sixteen_bit_and_palette_images_open_as_rgb(tmp_path):
    from lora_lab.images import open_rgb

    grey = Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16))
    grey.save(tmp_path / "g16.png")
    im = open_rgb(tmp_path / "g16.png")
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (156, 156, 156)  # 40000 / 256
    Image.new("P", (4, 4), 3).save(tmp_path / "p.png")
    assert open_rgb(tmp_path / "p.png").mode == "RGB"
