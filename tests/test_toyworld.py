"""The toy world's generator: drawings whose attributes are known exactly."""

from __future__ import annotations

import random
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from lora_lab.config import DataConfig
from lora_lab.data.dataset import load_dataset
from lora_lab.data.suites import load_suite
from lora_lab.errors import ConfigError
from lora_lab.toyworld import subjects
from lora_lab.toyworld.world import EYE_COLOURS, HAIR_COLOURS, Attributes, caption, draw, is_subject_identity, sample


def _plain(**kw) -> Attributes:
    base = dict(hair_colour="black", hair_style="short", eye_colour="brown", skin="tan", face="round", mark="none",
                glasses=False, hat=False, earrings=False, background="white", pattern="plain")
    base.update(kw)
    return Attributes(**base)


def test_drawing_is_deterministic():
    a = sample(random.Random(3))
    assert draw(a).tobytes() == draw(a).tobytes() and draw(a).size == (64, 64)


@pytest.mark.parametrize("colour", sorted(HAIR_COLOURS))
def test_hair_colour_is_drawn(colour):
    im = np.asarray(draw(_plain(hair_colour=colour), size=64)).astype(int)
    top = im[12, 32]  # the crown of the head
    assert np.abs(top - np.array(HAIR_COLOURS[colour])).max() <= 12


@pytest.mark.parametrize("colour", sorted(EYE_COLOURS))
def test_eye_colour_is_drawn(colour):
    im = np.asarray(draw(_plain(eye_colour=colour), size=128)).astype(int)
    iris = im[58, 53]  # centre of the left iris at 128 px
    assert np.abs(iris - np.array(EYE_COLOURS[colour])).max() <= 20


@pytest.mark.parametrize("colour", sorted(EYE_COLOURS))
def test_irises_cover_enough_pixels_at_32_px(colour):
    # 8 or more pixels of the eye colour at the models' 32 px (the smaller irises of the first
    # drawings gave 5 or 6, too few for the 8 x 8 latents to carry the colour reliably).
    im = np.asarray(draw(_plain(eye_colour=colour, skin="pale"), size=32)).astype(int)
    assert (np.abs(im - np.array(EYE_COLOURS[colour])).max(axis=-1) <= 30).sum() >= 8


def test_a_hat_does_not_hide_a_bun():
    # The bun is drawn through the hat, so the hair style stays visible: at the bun's centre a
    # bun shows hair, short hair shows the hat.
    hat = np.array((60, 40, 20))
    bun = np.asarray(draw(_plain(hair_colour="white", hair_style="bun", hat=True))).astype(int)[6, 32]
    short = np.asarray(draw(_plain(hair_colour="white", hair_style="short", hat=True))).astype(int)[6, 32]
    assert np.abs(bun - np.array(HAIR_COLOURS["white"])).max() <= 12
    assert np.abs(short - hat).max() <= 12


def test_pretraining_never_shows_the_subject_and_covers_the_world():
    rng = random.Random(0)
    drawn = [sample(rng) for _ in range(3000)]
    assert not any(is_subject_identity(a) for a in drawn)
    assert set(Counter(a.hair_colour for a in drawn)) == set(HAIR_COLOURS)
    assert sum(a.hair_colour == "purple" and a.hair_style == "spiky" for a in drawn) > 0  # parts do appear


@pytest.mark.parametrize("name", subjects.names())
def test_each_shipped_subject_loads_draws_and_keeps_its_identity(name):
    subject = subjects.load(name)
    drawings = subject.drawings()
    assert len(drawings) == subject.images >= 12
    for a in drawings:
        assert all(getattr(a, k) == v for k, v in {**subject.identity, **subject.fixed}.items())
    # the drawings differ from one another (pose, accessories or background), and are drawn
    assert len({(a.dx, a.dy, a.glasses, a.hat, a.earrings, a.background) for a in drawings}) > subject.images // 2
    assert draw(drawings[0], 32).size == (32, 32)
    assert all(subject.caption_of(a).startswith(f"photo of {subject.token}") for a in drawings)
    for ask in subject.asks:  # every ask fights the identity or the training backgrounds
        changed = ask["value"] != getattr(drawings[0], ask["attribute"])
        assert changed, f"{name}: {ask['prompt']} asks for what the subject already has"


def test_five_subjects_of_different_kinds_ship():
    names = subjects.names()
    assert {"sks", "vek", "qor", "lum", "dax"} <= set(names)
    ids = {n: subjects.load(n).identity for n in names}
    assert set(ids["qor"]) == {"glasses", "hat", "earrings"}  # accessories
    assert set(ids["lum"]) == {"hair_style", "face", "mark"}  # shapes in common colours
    assert {a.background for a in subjects.load("dax").drawings()} == {"yellow"}  # one background
    assert "background" not in subjects.load("dax").caption


def test_the_first_subject_is_drawn_as_it_always_was():
    # Pixels and captions of the 16 drawings the earlier benchmark figures were measured on
    # (written by the subject code before subjects became files), hashed.
    import hashlib

    sks = subjects.load("sks")
    a = sks.drawings()
    assert all(is_subject_identity(x) for x in a) and len({x.background for x in a}) == 8
    assert hashlib.sha256(b"".join(draw(x, 32).tobytes() for x in a)).hexdigest()[:16] == "39754d1430654cfd"
    assert hashlib.sha256("\n".join(sks.caption_of(x) for x in a).encode()).hexdigest()[:16] == "74f0d88338327c27"


def test_a_new_subject_is_a_file(tmp_path, cache_dir):
    path = tmp_path / "ivo.yaml"
    path.write_text("""token: ivo person
images: 12
identity: {hair_colour: blue, eye_colour: gray}
fixed: {skin: tan}
vary: {background: [pink, olive], pattern: [plain]}
caption: []
asks:
  - {prompt: "photo of {token} with red hair", judge: "photo of a person with red hair",
     attribute: hair_colour, value: red}
""")
    ds = load_dataset(DataConfig(builtin="toyworld", subject=str(path)), cache_dir)
    assert ds.token == "ivo person" and len(ds.samples) == 12
    assert {s.caption for s in ds.samples} == {"photo of ivo person"}
    suite = load_suite("data", ds.token, ds.suite)
    assert [p.text for p in suite.prompts] == ["photo of ivo person", "photo of ivo person with red hair"]
    # the ask's versus comes from the identity: what ivo has instead of red hair
    assert suite.prompts[1].versus == "photo of a person with blue hair"
    assert subjects.load(str(path)).asked("photo of ivo person with red hair") == ("hair_colour", "red")


def test_an_asks_versus_is_the_subjects_own_value_where_it_has_one():
    dax, lum = subjects.load("dax"), subjects.load("lum")
    by_attr = {a["attribute"]: a for a in dax.asks}
    assert dax.versus(by_attr["eye_colour"]) == "photo of a person with blue eyes"  # identity: blue eyes
    assert dax.versus(by_attr["background"]) == "photo of a person, on a yellow background"  # its one background
    lum_bg = next(a for a in lum.asks if a["attribute"] == "background")
    assert lum.versus(lum_bg) is None  # eight backgrounds: no single own value, the CLIP score is used
    assert lum.own("background") is None and lum.own("hair_style") == lum.identity["hair_style"]


@pytest.mark.parametrize("text, message", [
    ("token: x\nidentity: {hair_colour: pink}\nasks: [{prompt: '{token}', judge: j, attribute: eye_colour, value: blue}]",
     "identity.hair_colour: 'pink' is not a hair_colour of the toy world"),
    ("token: x\nidentity: {wings: true}\nasks: [{prompt: '{token}', judge: j, attribute: eye_colour, value: blue}]",
     "unknown attribute 'wings'"),
    ("token: x\nidentity: {hat: true}\nasks: [{prompt: 'no token', judge: j, attribute: eye_colour, value: blue}]",
     "must contain {token}"),
    ("token: x\nidentity: {hat: true}\nasks: []", "'asks' is missing"),
    ("token: x\nidentity: {hat: true}\nvary: {glasses: 2}\nasks: [{prompt: '{token}', judge: j, attribute: hat, value: false}]",
     "vary.glasses must be a probability"),
])
def test_a_bad_subject_file_is_named_with_what_is_allowed(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        subjects.load(str(path))
    with pytest.raises(ConfigError, match="no toy-world subject 'nobody' \\(available: dax, lum"):
        subjects.load("nobody")


def test_captions():
    a = _plain(hair_colour="red", eye_colour="blue", glasses=True, background="cyan", pattern="stripes", mark="mole")
    assert caption(a) == ("photo of a person with red short hair and blue eyes, a mole on the cheek, "
                          "wearing glasses, on a cyan background with stripes")
    sks = subjects.load("sks")
    assert sks.caption_of(_plain(glasses=True, background="cyan")) == \
        "photo of sks person, wearing glasses, on a cyan background"


def test_toyworld_data_set(cache_dir):
    ds = load_dataset(DataConfig(builtin="toyworld"), cache_dir)
    assert len(ds.samples) == 16 and {s.repeats for s in ds.samples} == {10} and ds.token == "sks person"
    assert all(s.caption.startswith("photo of sks person") for s in ds.samples)
    assert {Image.open(s.path).size for s in ds.samples} == {(32, 32)}
    held = load_dataset(DataConfig(builtin="toyworld", validation_split=0.25), cache_dir)
    assert len(held.samples) == 12 and len(held.validation) == 4
    assert not {s.id for s in held.samples} & {s.id for s in held.validation}
