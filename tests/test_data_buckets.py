"""Data as users have it: kohya's aspect-ratio buckets, the caption options, every image format
a phone or the web gives, and a folder of mixed portrait / landscape photos trained whole."""

from __future__ import annotations

import json
import random
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from conftest import run_cli
from lora_lab.config import DataConfig
from lora_lab.data.buckets import (
    BucketSpec,
    batches_per_epoch,
    bucket_batches,
    describe_table,
    place,
    resolutions,
    table,
)
from lora_lab.data.captions import CaptionRule, process
from lora_lab.data.dataset import SubsetOptions, load_dataset, load_image
from lora_lab.errors import ConfigError

SD15 = BucketSpec(512, enabled=True, min_reso=256, max_reso=1024, steps=64)


def test_the_bucket_set_is_kohyas():
    # kohya make_bucket_resolutions((512, 512), 256, 1024, 64), worked by hand: for each width
    # from 256 to 1024 the tallest height in steps of 64 within 512 x 512 pixels, and its transpose.
    heights = {256: 1024, 320: 768, 384: 640, 448: 576, 512: 512, 576: 448, 640: 384, 704: 320, 768: 320,
               832: 256, 896: 256, 960: 256, 1024: 256}
    expected = {(w, h) for w, h in heights.items()} | {(h, w) for w, h in heights.items()}
    assert set(resolutions(SD15)) == expected
    assert resolutions(SD15) == sorted(expected)


def test_defaults_scale_with_the_models_size():
    assert BucketSpec.from_config(DataConfig(), 512) == SD15
    xl = BucketSpec.from_config(DataConfig(), 1024)
    assert (xl.min_reso, xl.max_reso, xl.steps) == (512, 2048, 128)
    assert not BucketSpec.from_config(DataConfig(enable_bucket=False), 512).enabled


def test_a_phone_portrait_keeps_its_face():
    p = place((1536, 2048), SD15)  # 3:4, closest bucket 448 x 576
    assert p.bucket == (448, 576) and p.resized == (448, 597) and p.crop == (10, 0)
    assert place((2048, 1536), SD15).bucket == (576, 448)
    square = place((1536, 2048), BucketSpec(512))  # buckets off: a square cut from the middle
    assert square.bucket == (512, 512) and square.resized == (512, 683) and square.crop == (85, 0)
    # mirrored, the crop left is counted from the other side: 597 - 10 - 576 = 11
    assert p.crop_for(True) == (10, 0) and place((2048, 1536), SD15).crop_for(True) == (0, 11)


def test_no_upscale_keeps_small_images_small():
    spec = BucketSpec(512, enabled=True, min_reso=256, max_reso=1024, steps=64, no_upscale=True)
    small = place((300, 200), spec)
    assert small.bucket == (256, 192) and small.resized == (300, 200)
    big = place((4000, 3000), spec)  # scaled down to about 512 x 512 pixels, 4:3 kept exactly
    assert big.bucket == (512, 384) and big.resized == (512, 384)


def test_batches_stay_within_a_bucket_and_are_counted_as_kohya():
    sizes = [(100, 200)] * 5 + [(200, 100)] * 3 + [(100, 100)] * 2
    spec = BucketSpec(64, enabled=True, min_reso=32, max_reso=128, steps=8)
    out = bucket_batches(sizes, 2, lambda s: place(s, spec).bucket, random.Random(0))
    assert all(len({place(s, spec).bucket for s in b}) == 1 for b in out)
    assert sorted(len(b) for b in out) == [1, 1, 2, 2, 2, 2]  # 5 -> 2+2+1, 3 -> 2+1, 2 -> 2
    assert batches_per_epoch(sizes, 2, lambda s: place(s, spec).bucket) == len(out) == 6
    counts, error = table(sizes, spec)
    assert counts == {(40, 88): 5, (64, 64): 2, (88, 40): 3} and error > 0
    lines = describe_table(counts, error)
    assert lines[1] == "  bucket 0: resolution (40, 88) portrait, count: 5"


def test_caption_options_mean_what_they_mean_to_kohya():
    rng = random.Random(0)
    rule = CaptionRule(shuffle_caption=True, keep_tokens_separator="|||")
    for _ in range(20):
        out = process("sks, woman ||| red hair, smiling, outdoors ||| best quality", rule, rng).split(", ")
        assert out[:2] == ["sks", "woman"] and out[-1] == "best quality"
        assert sorted(out[2:5]) == ["outdoors", "red hair", "smiling"]
    dropped = [process("sks, a, b", CaptionRule(caption_dropout_rate=0.3), rng) for _ in range(2000)]
    assert 0.25 < dropped.count("") / 2000 < 0.35 and set(dropped) == {"", "sks, a, b"}
    tags = [process("sks, " + ", ".join(f"t{i}" for i in range(10)), CaptionRule(keep_tokens=1, caption_tag_dropout_rate=0.5),
                    rng).split(", ") for _ in range(200)]
    assert all(t[0] == "sks" for t in tags)
    assert 4 < np.mean([len(t) - 1 for t in tags]) < 6  # half the 10 movable tags
    assert not CaptionRule().varies and CaptionRule(caption_tag_dropout_rate=0.1).varies
    assert SubsetOptions(caption_prefix="photo of", caption_suffix="4k").caption("sks woman") == "photo of sks woman 4k"
    with pytest.raises(ConfigError, match=r"data.caption_dropout_rate: must be a fraction in \[0, 1\), got 1.5"):
        DataConfig(caption_dropout_rate=1.5)
    with pytest.raises(ConfigError, match="data.bucket_reso_steps: must be a multiple of 8"):
        DataConfig(bucket_reso_steps=60)


def _exif_rotated_jpeg(path, w, h):
    """A phone photo: pixels stored landscape, EXIF orientation 6 (turn 90 degrees clockwise)."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, : w // 2] = (250, 20, 20)  # left half red (the top once upright)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(path, exif=exif.tobytes(), quality=95)


def _mixed_folder(root):
    folder = root / "data" / "2_sks"
    folder.mkdir(parents=True)
    _exif_rotated_jpeg(folder / "phone.jpg", 96, 64)  # upright: 64 wide, 96 tall
    Image.new("RGB", (96, 48), (20, 120, 200)).save(folder / "web.webp")
    rgba = Image.new("RGBA", (48, 72), (200, 200, 20, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(folder / "cutout.png")
    Image.new("P", (64, 64), 3).save(folder / "palette.bmp")
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(folder / "deep.png")
    for i, name in enumerate(["phone", "web", "cutout", "palette", "deep"]):
        (folder / f"{name}.txt").write_text(f"sks, photo {i}, detail {i}", encoding="utf-8")
    return folder


def test_every_image_a_user_has_opens_upright_in_rgb(tmp_path, cache_dir):
    folder = _mixed_folder(tmp_path)
    ds = load_dataset(DataConfig(path=str(tmp_path / "data")), cache_dir)
    sizes = {s.path.name: s.size for s in ds.samples}
    assert sizes == {"phone.jpg": (64, 96), "web.webp": (96, 48), "cutout.png": (48, 72), "palette.bmp": (64, 64),
                     "deep.png": (64, 64)}
    spec = BucketSpec(32, enabled=True, min_reso=16, max_reso=64, steps=8)
    phone = load_image(folder / "phone.jpg", place((64, 96), spec))
    assert phone.mode == "RGB" and phone.size == place((64, 96), spec).bucket and phone.height > phone.width
    top, bottom = np.asarray(phone)[1, phone.width // 2], np.asarray(phone)[-2, phone.width // 2]
    assert top[0] > 200 and bottom[0] < 50  # the red half on top: EXIF turned it upright
    mirrored = np.asarray(load_image(folder / "phone.jpg", place((64, 96), spec), flip=True))
    assert np.array_equal(mirrored, np.asarray(phone)[:, ::-1])
    for name in ("cutout.png", "palette.bmp", "deep.png"):
        assert load_image(folder / name, 32).mode == "RGB"


def test_mixed_photos_train_in_buckets_with_the_table_and_doctor_first(tmp_path, cache_dir):
    """The issue's done-when: portrait and landscape JPEG / WebP with EXIF rotation train
    without squashing or square-cropping, the bucket table and the doctor's findings are printed
    before training, and the file says what the run did."""
    _mixed_folder(tmp_path)
    out = tmp_path / "run"
    proc = run_cli(
        [sys.executable, "-m", "lora_lab.train", "model=tiny", "data=folder", f"data.path={tmp_path / 'data'}",
         "data.token=sks", "train.resolution=32", "train.epochs=1", "data.flip_aug=true", "data.shuffle_caption=true",
         "data.keep_tokens=1", "eval.suite=object", f"output_dir={out}", f"cache_dir={cache_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    table_at = text.index("number of images (including repeats) per bucket:")
    # the phone photo (64 x 96 upright) and the cutout (48 x 72) in a portrait bucket, 2 repeats each
    assert "bucket 0: resolution (24, 40) portrait, count: 4" in text
    assert "resolution (40, 24) landscape, count: 2" in text and "resolution (32, 32) square, count: 4" in text
    assert text.index("dataset doctor: 5 images") > table_at and text.index("dataset doctor:") < text.index("loaded ")
    assert "captions encoded every step: captions change from step to step" in text
    with safe_open(str(out / "lora" / "last.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["ss_enable_bucket"] == "True" and meta["ss_flip_aug"] == "True"
    info = json.loads(meta["ss_bucket_info"])
    assert {tuple(b["resolution"]) for b in info["buckets"].values()} == {(24, 40), (40, 24), (32, 32)}
    (ds,) = json.loads(meta["ss_datasets"])
    assert ds["enable_bucket"] is True and ds["subsets"][0]["flip_aug"] is True
    assert json.loads((out / "doctor.json").read_text())["images"] == 5


def test_a_toml_with_bucket_and_caption_keys_trains_as_kohya_would(tmp_path, cache_dir):
    from lora_lab.cli import compose
    from lora_lab.data import kohya_toml
    from lora_lab.train.preflight import text_encoding

    _mixed_folder(tmp_path)
    toml = tmp_path / "ds.toml"
    toml.write_text('[general]\nenable_bucket = true\nbucket_reso_steps = 8\nmin_bucket_reso = 16\nmax_bucket_reso = 64\n'
                    'bucket_no_upscale = true\n[[datasets]]\nresolution = 32\n[[datasets.subsets]]\n'
                    'image_dir = "data/2_sks"\ncaption_extension = ".txt"\nflip_aug = true\ncaption_prefix = "photo,"\n'
                    'caption_tag_dropout_rate = 0.1\nkeep_tokens_separator = "|||"\n', encoding="utf-8")
    cfg = kohya_toml.apply(compose([f"data.path={toml}", f"cache_dir={cache_dir}", "model=tiny"]))
    d = cfg.data
    assert (d.enable_bucket, d.bucket_reso_steps, d.min_bucket_reso, d.max_bucket_reso, d.bucket_no_upscale) == \
        (True, 8, 16, 64, True) and cfg.resolution == 32
    ds = load_dataset(d, cache_dir)
    s = next(s for s in ds.samples if s.path.name == "phone.jpg")
    assert s.options.flip_aug and s.options.caption_tag_dropout_rate == 0.1 and s.options.keep_tokens_separator == "|||"
    assert s.caption == "photo, sks, photo 0, detail 0"
    assert text_encoding(cfg.train, ds).startswith("captions change from step to step")
    # Left out, enable_bucket means kohya's default: no buckets.
    toml.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "data/2_sks"\ncaption_extension = ".txt"\n',
                    encoding="utf-8")
    cfg = kohya_toml.apply(compose([f"data.path={toml}", f"cache_dir={cache_dir}", "model=tiny"]))
    assert cfg.data.enable_bucket is False
    assert text_encoding(cfg.train, load_dataset(cfg.data, cache_dir)) is None  # fixed captions: the text cache
    cfg = kohya_toml.apply(compose([f"data.path={toml}", f"cache_dir={cache_dir}", "model=tiny", "data.enable_bucket=true"]))
    assert cfg.data.enable_bucket is True  # the command line wins
