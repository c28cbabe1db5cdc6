"""The three dataset forms, content-keyed ids, and one clear error per kind of bad data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_lab.config import DataConfig
from lora_lab.data.captions import shuffle_caption
from lora_lab.data.dataset import load_dataset, load_image
from lora_lab.data.steps import epoch_order
from lora_lab.errors import DataError


def _img(path: Path, color=(200, 10, 10), size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _kohya(root: Path) -> Path:
    _img(root / "5_anantn" / "a.png", (255, 0, 0))
    (root / "5_anantn" / "a.txt").write_text("photo of anantn, red shirt", encoding="utf-8")
    _img(root / "5_anantn" / "b.jpg", (0, 255, 0))  # no caption: class token from the folder
    _img(root / "2_anantn man" / "c.png", (0, 0, 255))
    (root / "2_anantn man" / "c.txt").write_text("\ufeffphoto of anantn,\n blue", encoding="utf-8")
    return root


def test_kohya_folders(tmp_path):
    ds = load_dataset(DataConfig(path=str(_kohya(tmp_path / "train"))), tmp_path)
    by_name = {s.path.name: s for s in ds.samples}
    assert by_name["a.png"].caption == "photo of anantn, red shirt" and by_name["a.png"].repeats == 5
    assert by_name["b.jpg"].caption == "anantn"
    assert by_name["c.png"].caption == "photo of anantn, blue" and by_name["c.png"].repeats == 2
    assert ds.token == "anantn"
    assert ds.images_per_epoch() == 5 + 5 + 2
    assert "5_anantn: 2 images x 5 repeats" in ds.summary()


def test_sample_id_is_content_hash(tmp_path):
    root = _kohya(tmp_path / "train")
    ids = {s.path.name: s.id for s in load_dataset(DataConfig(path=str(root)), tmp_path).samples}
    (root / "5_anantn" / "a.png").rename(root / "5_anantn" / "z.png")
    (root / "5_anantn" / "a.txt").rename(root / "5_anantn" / "z.txt")
    again = {s.path.name: s.id for s in load_dataset(DataConfig(path=str(root)), tmp_path).samples}
    assert again["z.png"] == ids["a.png"] and len(set(ids.values())) == 3


def test_repeats_override_and_step_order(tmp_path):
    ds = load_dataset(DataConfig(path=str(_kohya(tmp_path / "t")), repeats=3), tmp_path)
    assert {s.repeats for s in ds.samples} == {3}
    order = epoch_order(ds, seed=1, epoch=1)
    assert len(order) == 9 and order == epoch_order(ds, seed=1, epoch=1)
    assert order != epoch_order(ds, seed=1, epoch=2) or len(set(s.id for s in order)) == 1


def test_metadata_jsonl_with_caption_column(tmp_path):
    _img(tmp_path / "d" / "x.png")
    _img(tmp_path / "d" / "y.png", (1, 2, 3))
    lines = [{"file_name": "x.png", "prompt": "photo of sks"}, {"file_name": "y.png", "prompt": "sks smiling"}]
    (tmp_path / "d" / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    ds = load_dataset(DataConfig(path=str(tmp_path / "d"), caption_column="prompt"), tmp_path)
    assert [s.caption for s in ds.samples] == ["photo of sks", "sks smiling"]
    with pytest.raises(DataError, match=r"line 1: no caption column 'text' \(the line has: file_name, prompt\)"):
        load_dataset(DataConfig(path=str(tmp_path / "d")), tmp_path)


def test_dataset_config_toml(tmp_path):
    _img(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "a.caption").write_text("photo of ciri_w3, red hair, armor")
    _img(tmp_path / "10_reg" / "r.png", (9, 9, 9))
    (tmp_path / "ds.toml").write_text(
        '[general]\nshuffle_caption = true\ncaption_extension = ".caption"\nkeep_tokens = 1\n'
        "[[datasets]]\nresolution = 512\n"
        '[[datasets.subsets]]\nimage_dir = "imgs"\nnum_repeats = 7\nclass_tokens = "ciri_w3"\n'
        '[[datasets.subsets]]\nimage_dir = "10_reg"\nis_reg = true\nclass_tokens = "woman"\n'
    )
    ds = load_dataset(DataConfig(path=str(tmp_path / "ds.toml")), tmp_path)
    train, reg = ds.train, ds.reg
    assert len(train) == 1 and train[0].repeats == 7 and train[0].shuffle_caption and train[0].keep_tokens == 1
    assert train[0].caption == "photo of ciri_w3, red hair, armor"
    # A '<repeats>_' prefix in a TOML image_dir is not parsed (kohya): num_repeats defaults to 1.
    assert len(reg) == 1 and reg[0].repeats == 1 and reg[0].caption == "woman"
    assert ds.images_per_epoch() == 14  # reg images matched to the 7 training images


def test_regularization_folder(tmp_path):
    root = _kohya(tmp_path / "t")
    _img(tmp_path / "reg" / "1_man" / "r.png", (5, 5, 5))
    ds = load_dataset(DataConfig(path=str(root), reg_path=str(tmp_path / "reg")), tmp_path)
    order = epoch_order(ds, 0, 1)
    assert sum(s.is_reg for s in order) == sum(not s.is_reg for s in order) == 12


def test_shuffle_caption_keeps_tokens():
    import random

    out = shuffle_caption("sks, a, b, c, d, e", 1, random.Random(3))
    assert out.startswith("sks, ") and sorted(out.split(", ")) == sorted("sks, a, b, c, d, e".split(", "))


def test_load_image_resizes_short_side_and_center_crops(tmp_path):
    p = tmp_path / "wide.png"
    arr = np.zeros((20, 60, 3), dtype=np.uint8)
    arr[:, 30:] = 255  # right half white; the crop keeps original columns 20..40
    Image.fromarray(arr).save(p)
    im = np.asarray(load_image(p, 16))
    assert im.shape == (16, 16, 3) and im[8, 1].max() < 60 and im[8, 14].min() > 200


def _bad_cases(tmp: Path):
    def corrupt(root):
        _img(root / "5_x" / "ok.png")
        (root / "5_x" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
        return root, "bad.png cannot be read as an image"

    def zero(root):
        _img(root / "5_x" / "ok.png")
        (root / "5_x" / "empty.jpg").write_bytes(b"")
        return root, "empty.jpg is empty (0 bytes)"

    def text_as_image(root):
        (root / "5_x").mkdir(parents=True)
        (root / "5_x" / "notes.jpg").write_text("not an image at all")
        return root, "notes.jpg cannot be read as an image"

    def empty(root):
        root.mkdir(parents=True)
        return root, "has no '<repeats>_<token>' folder with images"

    def no_prefix(root):
        _img(root / "anantn" / "a.png")
        return root, "folder " + str(root / "anantn") + " has no '<repeats>_' prefix"

    def images_at_top(root):
        _img(root / "a.png")
        return root, "holds images directly"

    def latin1(root):
        _img(root / "5_x" / "a.png")
        (root / "5_x" / "a.txt").write_bytes("photo of sks, caf\xe9".encode("latin-1"))
        return root, "a.txt is not UTF-8 text"

    def no_caption_no_token(root):
        _img(root / "5_" / "a.png")
        return root, "a.png has no caption file a.txt and its folder names no class token"

    def missing(root):
        return root / "nope", "does not exist"

    return [corrupt, zero, text_as_image, empty, no_prefix, images_at_top, latin1, no_caption_no_token, missing]


@pytest.mark.parametrize("case", _bad_cases(Path()), ids=lambda f: f.__name__)
def test_bad_data_is_refused_with_the_file_named(tmp_path, case):
    root, needle = case(tmp_path / "data")
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(path=str(root)), tmp_path)
    assert needle in str(info.value)


def test_demo_data_has_a_real_face(demo_dir, cache_dir):
    from facenet_pytorch import MTCNN

    ds = load_dataset(DataConfig(token="sks"), cache_dir)
    assert len(ds.samples) == 12 and all(s.caption.startswith("photo of sks woman") for s in ds.samples)
    mtcnn = MTCNN(keep_all=False)
    found = 0
    for s in ds.samples:
        _, prob = mtcnn.detect(Image.open(s.path).convert("RGB"))
        found += prob is not None and prob[0] is not None and float(np.asarray(prob, dtype=np.float32)[0]) > 0.9
    assert found >= 11


def test_a_kohya_toml_trains_as_kohya_would(tmp_path, cache_dir):
    """resolution and batch_size in the file are the run's (the command line still wins);
    DreamBooth subsets read .caption by default; a kohya key lora_lab cannot apply is refused by
    name unless it sits at kohya's default; a key kohya does not know is refused."""
    from lora_lab.cli import compose
    from lora_lab.data import kohya_toml

    _img(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "a.caption").write_text("photo of ciri_w3, red hair")
    (tmp_path / "imgs" / "a.txt").write_text("the wrong caption")
    toml = tmp_path / "ds.toml"
    toml.write_text('[general]\nshuffle_caption = true\nkeep_tokens = 1\nflip_aug = false\n'
                    "[[datasets]]\nresolution = 64\nbatch_size = 2\n"
                    '[[datasets.subsets]]\nimage_dir = "imgs"\nnum_repeats = 3\n')
    cfg = kohya_toml.apply(compose([f"data.path={toml}", f"cache_dir={cache_dir}", "model=tiny"]))
    assert (cfg.resolution, cfg.train.batch_size) == (64, 2)
    cfg = kohya_toml.apply(compose([f"data.path={toml}", f"cache_dir={cache_dir}", "model=tiny",
                                    "train.batch_size=4", "train.resolution=32"]))
    assert (cfg.resolution, cfg.train.batch_size) == (32, 4)  # the command line wins
    ds = load_dataset(cfg.data, tmp_path, cfg.explicit)
    assert ds.samples[0].caption == "photo of ciri_w3, red hair" and ds.samples[0].repeats == 3
    assert ds.samples[0].shuffle_caption and ds.samples[0].keep_tokens == 1
    told = compose([f"data.path={toml}", "data.caption_extension=.txt"])  # explicit: the command line's
    assert told.explicit == ["data.caption_extension", "data.path"]
    assert load_dataset(told.data, tmp_path, told.explicit).samples[0].caption == "the wrong caption"
    # The keys travel with the config, not through the process: the same values without the
    # command line's say-so leave the TOML's (kohya's) default, whatever was composed last.
    assert load_dataset(told.data, tmp_path).samples[0].caption == "photo of ciri_w3, red hair"
    toml.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "imgs"\nflip_aug = true\n')
    assert load_dataset(DataConfig(path=str(toml)), tmp_path).samples[0].options.flip_aug
    toml.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "imgs"\ncolor_aug = true\n')
    with pytest.raises(DataError, match=r"datasets\[0\]\.subsets\[0\]\.color_aug = True: lora_lab does not apply "
                                        r"color_aug yet \(kohya's default: False\)"):
        load_dataset(DataConfig(path=str(toml)), tmp_path)
    toml.write_text('[[datasets]]\nresolutoin = 512\n[[datasets.subsets]]\nimage_dir = "imgs"\n')
    with pytest.raises(DataError, match=r"datasets\[0\]\.resolutoin is not a key of kohya's dataset config; "
                                        r"allowed here: .*resolution"):
        load_dataset(DataConfig(path=str(toml)), tmp_path)
    toml.write_text('[[datasets]]\nresolution = [512, 768]\n[[datasets.subsets]]\nimage_dir = "imgs"\n')
    with pytest.raises(DataError, match=r"resolution = \[512, 768\]: lora_lab trains at one square resolution"):
        kohya_toml.run_settings(toml)


def test_a_toml_runs_metadata_says_what_the_run_did(base, cache_dir, tmp_path):
    import json

    from safetensors import safe_open

    from conftest import make_config
    from lora_lab.data import kohya_toml
    from lora_lab.train.loop import train

    for i in range(2):
        _img(tmp_path / "imgs" / f"{i}.png", (10 * i, 20, 30))
        (tmp_path / "imgs" / f"{i}.caption").write_text("photo of sks, red hair, smiling")
    toml = tmp_path / "ds.toml"
    toml.write_text('[general]\nshuffle_caption = true\nkeep_tokens = 1\n[[datasets]]\nresolution = 32\n'
                    'batch_size = 2\n[[datasets.subsets]]\nimage_dir = "imgs"\nclass_tokens = "sks"\n')
    cfg = make_config(cache_dir, tmp_path / "out", epochs=1, resolution=None, batch_size=1)
    cfg.data.path = str(toml)
    cfg = kohya_toml.apply(cfg)
    result = train(cfg, base, load_dataset(cfg.data, cache_dir), tmp_path / "out")
    with safe_open(str(result.lora_files[1]), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["ss_resolution"] == "(32, 32)" and meta["ss_batch_size_per_device"] == "2"
    assert meta["ss_shuffle_caption"] == "True" and meta["ss_keep_tokens"] == "1"
    (ds,) = json.loads(meta["ss_datasets"])
    assert ds["subsets"][0]["shuffle_caption"] is True and ds["subsets"][0]["keep_tokens"] == 1
