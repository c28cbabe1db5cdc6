"""The toy world's generator: drawings whose attributes are known exactly."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
from PIL import Image
import pytest

from lora_lab.config import DataConfig
from lora_lab.data import load_dataset
from lora_lab.toyworld.world import (EYE_COLOURS, HAIR_COLOURS, SUBJECT, Attributes, caption, draw,
                                     is_subject_identity, sample, subject_variants)


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


def test_subject_variants_keep_the_identity():
    variants = subject_variants(16)
    assert all(is_subject_identity(a) and a.skin == SUBJECT.skin for a in variants)
    assert len({a.background for a in variants}) == 8


def test_captions():
    a = _plain(hair_colour="red", eye_colour="blue", glasses=True, background="cyan", pattern="stripes", mark="mole")
    assert caption(a) == ("photo of a person with red short hair and blue eyes, a mole on the cheek, "
                          "wearing glasses, on a cyan background with stripes")
    assert caption(subject_variants(1)[0], "sks person").startswith("photo of sks person, ")


def test_toyworld_data_set(cache_dir):
    ds = load_dataset(DataConfig(builtin="toyworld", token="sks person"), cache_dir)
    assert len(ds.samples) == 16 and {s.repeats for s in ds.samples} == {10} and ds.token == "sks person"
    assert all(s.caption.startswith("photo of sks person") for s in ds.samples)
    assert {Image.open(s.path).size for s in ds.samples} == {(32, 32)}
