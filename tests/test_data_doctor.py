"""The dataset doctor: each finding on an image made to trigger it, none on a clean set, and the
command's output."""

from __future__ import annotations

import json
import sys

import numpy as np
from PIL import Image, ImageFilter

from conftest import run_cli
from lora_lab.config import DataConfig
from lora_lab.data.dataset import load_dataset
from lora_lab.data.doctor import dhash, examine, identity_outliers, near_duplicates, sharpness

FACES = "10_sks woman"


def _set(tmp_path, demo_dir, n=4):
    """A clean set: the demo's photos of one face, each cropped close around the face (as the
    guides ask), at its own size (enlarging would blur it)."""
    from facenet_pytorch import MTCNN

    detector = MTCNN(keep_all=True)
    folder = tmp_path / "data" / "10_sks"
    folder.mkdir(parents=True)
    for i, src in enumerate(sorted((demo_dir / FACES).glob("*.png"))[:n]):
        im = Image.open(src).convert("RGB")
        (x0, y0, x1, y1), = detector.detect(im)[0][:1]
        cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) * 0.75
        im.crop((int(cx - half), int(cy - half), int(cx + half), int(cy + half))).save(folder / f"face{i}.png")
        (folder / f"face{i}.txt").write_text(f"photo of sks woman, pose {i}", encoding="utf-8")
    return folder


def _examine(tmp_path, cache_dir, person=True, resolution=48, token="sks"):
    ds = load_dataset(DataConfig(path=str(tmp_path / "data"), token=token), cache_dir)
    report = examine(ds.samples, resolution=resolution, token=token, person=person, face_cfg=_face_cfg())
    return {(f.file.rsplit("/", 1)[-1], f.kind): f.message for f in report.findings}, report


def _face_cfg():
    from lora_lab.config import FaceScorerConfig

    return FaceScorerConfig(pretrained=None)


def test_a_clean_set_has_no_findings(tmp_path, cache_dir, demo_dir):
    _set(tmp_path, demo_dir)
    found, report = _examine(tmp_path, cache_dir)
    assert found == {} and report.images == 4
    assert report.summary.startswith("4 images, 0 with findings: none")
    assert "identity check skipped: FaceNet weights are random" in report.notes[0]  # it would flag by chance


def test_each_finding_on_an_image_made_to_trigger_it(tmp_path, cache_dir, demo_dir):
    folder = _set(tmp_path, demo_dir)
    face = Image.open(folder / "face0.png").convert("RGB")
    face.filter(ImageFilter.GaussianBlur(2)).save(folder / "blurry.png")
    face.resize((40, 40)).save(folder / "small.png")  # below 48 px: upscaled
    two = Image.new("RGB", (256, 128))
    two.paste(face, (0, 0))
    two.paste(Image.open(folder / "face1.png").convert("RGB"), (128, 0))
    two.save(folder / "two.png")
    far = Image.new("RGB", (384, 384), (120, 120, 120))
    far.paste(face, (128, 128))
    far.save(folder / "far.png")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((96, 96, 3)) * 255).astype("uint8")).save(folder / "noface.png")
    face.save(folder / "again.jpg", quality=90)  # the same photo twice
    for name in ("blurry", "small", "two", "far", "noface", "again"):
        (folder / f"{name}.txt").write_text(f"photo of sks woman, {name}", encoding="utf-8")
    (folder / "blurry.txt").write_text("photo of a woman", encoding="utf-8")  # forgot the token
    (folder / "small.txt").write_text("photo of sks woman, pose 1", encoding="utf-8")  # same as face1's
    (folder / "far.txt").write_text("sks woman, " + ", ".join(f"detail number {i}" for i in range(40)),
                                    encoding="utf-8")
    found, report = _examine(tmp_path, cache_dir)
    assert "blurry (sharpness" in found[("blurry.png", "blurry")]
    assert found[("small.png", "small")].startswith("40x40 is below the training size: upscaled x1.20 to 48x48")
    assert found[("two.png", "faces")] == "2 faces: the LoRA learns whoever is in it"
    assert "the head fills about" in found[("far.png", "small_face")]
    assert found[("noface.png", "no_face")] == "no face found"
    assert ("again.jpg", "duplicate") in found or ("face0.png", "duplicate") in found
    assert found[("blurry.png", "no_token")].startswith("caption lacks the trigger token 'sks'")
    assert "images share the caption \"photo of sks woman, pose 1\"" in found[("", "same_caption")]
    assert "past 75 it is cut off" in found[("far.png", "long_caption")]
    assert not {f for f, _ in found} & {"face1.png", "face2.png", "face3.png"}  # the clean ones stay clean
    assert "10 images" in report.summary and "blurry" in report.summary and "without a face" in report.summary
    # Not a person: no face checks at all.
    found, _ = _examine(tmp_path, cache_dir, person=False)
    assert not any(kind in ("no_face", "faces", "small_face", "outlier") for _, kind in found)


def test_an_exact_copy_is_named_and_counted_as_training_counts_it(tmp_path, cache_dir, demo_dir):
    """A byte-identical copy under another name: training shows both files (kohya counts it),
    so the doctor counts both and names the copy, not as a near-duplicate."""
    import shutil

    folder = _set(tmp_path, demo_dir)
    shutil.copyfile(folder / "face2.png", folder / "face2_copy.png")
    (folder / "face2_copy.txt").write_text("photo of sks woman, the copy", encoding="utf-8")
    ds = load_dataset(DataConfig(path=str(tmp_path / "data"), token="sks"), cache_dir)
    assert len(ds.train) == 5  # what training uses
    found, report = _examine(tmp_path, cache_dir)
    assert report.images == 5 and report.summary.startswith("5 images, 1 with findings (1 exact copies)")
    assert found == {("face2_copy.png", "copy"): "face2_copy.png is the same image as face2.png (an exact "
                                                 "copy: training shows it twice as often)"}


def test_measures():
    rng = np.random.default_rng(1)
    sharp = Image.fromarray((rng.random((128, 128)) * 255).astype("uint8"))
    assert sharpness(sharp) > 10 * sharpness(sharp.filter(ImageFilter.GaussianBlur(3)))
    a = Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")).filter(ImageFilter.GaussianBlur(4))
    assert near_duplicates([dhash(a), dhash(a.resize((50, 50))), dhash(a.transpose(Image.Transpose.ROTATE_90))]) \
        == [(0, 1)]


def test_identity_outliers_leave_one_out():
    rng = np.random.default_rng(2)
    centre = rng.normal(size=64)
    faces = {f"same{i}": centre + 0.3 * rng.normal(size=64) for i in range(8)}
    faces["other"] = rng.normal(size=64)
    out = identity_outliers(faces)
    assert list(out) == ["other"] and out["other"] < 0.5
    assert identity_outliers({k: faces[k] for k in list(faces)[:3]}) == {}  # too few to judge
    assert identity_outliers({k: v for k, v in faces.items() if k != "other"}) == {}


def test_doctor_command(tmp_path, cache_dir, demo_dir):
    folder = _set(tmp_path, demo_dir)
    (folder / "face0.txt").write_text("a woman", encoding="utf-8")
    proc = run_cli([sys.executable, "-m", "lora_lab.doctor", str(tmp_path / "data"), "data.token=sks",
                    "train.resolution=48", "train.epochs=5", f"cache_dir={cache_dir}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("dataset doctor: 4 images, 1 with findings (1 captions without the token); ")
    assert "kohya steps: 4 images x 10 repeats x 5 epochs / batch 1 = 200 steps" in lines[0]
    assert any("caption lacks the trigger token 'sks'" in line for line in lines)
    proc = run_cli([sys.executable, "-m", "lora_lab.doctor", str(tmp_path / "data"), "--json",
                    "data.token=sks", f"cache_dir={cache_dir}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout)["findings"]
    assert {f["kind"] for f in found} == {"no_token", "small"}  # by default SD 1.5's 512 px: all upscaled
    assert sum(f["kind"] == "small" for f in found) == 4
    proc = run_cli([sys.executable, "-m", "lora_lab.doctor", str(tmp_path / "nothing")])
    assert proc.returncode == 2 and "data.path:" in proc.stderr and "does not exist" in proc.stderr


def test_what_makes_training_impossible_still_stops(tmp_path, cache_dir, demo_dir):
    folder = _set(tmp_path, demo_dir, n=2)
    (folder / "broken.png").write_bytes(b"not an image")
    proc = run_cli([sys.executable, "-m", "lora_lab.doctor", str(tmp_path / "data"), f"cache_dir={cache_dir}"])
    assert proc.returncode == 2 and "broken.png cannot be read as an image" in proc.stderr


def test_a_run_prints_a_few_findings_and_the_command_for_all(tmp_path, cache_dir, demo_dir, caplog):
    import logging

    from lora_lab.cli import compose
    from lora_lab.train import preflight

    _set(tmp_path, demo_dir)
    cfg = compose(["model=tiny", "data=folder", f"data.path={tmp_path / 'data'}", "data.token=sks",
                   "train.resolution=512", "eval.suite=object", f"cache_dir={cache_dir}"])
    ds = load_dataset(cfg.data, cache_dir)
    with caplog.at_level(logging.INFO, logger="lora_lab.train.preflight"):
        data = preflight.doctor(cfg, ds, tmp_path)
    text = caplog.text
    assert "dataset doctor: 4 images, 4 with findings (4 below the training size)" in text
    assert text.count("is below the training size") == 3  # three per kind on the console ...
    assert (f"... and 1 more: python -m lora_lab.doctor {tmp_path / 'data'} train.resolution=512 eval.suite=object "
            "lists every one") in text  # ... and the command that repeats this run's checks
    assert len(data["findings"]) == 4 and json.loads((tmp_path / "doctor.json").read_text())["images"] == 4
    proc = run_cli([sys.executable, "-m", "lora_lab.doctor", "data.token=sks", str(tmp_path / "data")])
    assert proc.returncode == 2 and "'data.token=sks' looks like a setting; give the data folder" in proc.stderr
