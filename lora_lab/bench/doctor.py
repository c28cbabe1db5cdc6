"""``python -m lora_lab.bench doctor [--images 100] [--side 768]``: how long the dataset doctor
takes on a set of the size users have, on this machine.

It builds ``--images`` photo-sized images from the demo set's face photos (each enlarged to
``--side`` px on its long side, shifted, mirrored and re-coloured so no two are the same), runs
the doctor with every check on (person suite: MTCNN face finding, FaceNet identity, duplicates,
blur, captions) and prints the time, with and without the face checks.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

TARGET_S = 30.0  # "runs in seconds on 100 images on a CPU"


def _build(folder: Path, cache_dir: Path, n: int, side: int) -> None:
    from PIL import Image, ImageEnhance, ImageOps

    from lora_lab.data.demo import demo_folder

    sources = sorted((demo_folder(cache_dir) / "10_sks woman").glob("*.png"))
    folder.mkdir(parents=True)
    for i in range(n):
        im = Image.open(sources[i % len(sources)]).convert("RGB")
        w, h = im.size
        im = im.crop((i % 7, (i // 7) % 5, w - (i % 5), h - (i % 3)))
        if (i // len(sources)) % 2:
            im = ImageOps.mirror(im)
        im = ImageEnhance.Color(im).enhance(0.7 + 0.05 * (i % 9))
        scale = side / max(im.size)
        im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS).save(
            folder / f"{i:03d}.jpg", quality=92)
        (folder / f"{i:03d}.txt").write_text(f"photo of sks woman, take {i}", encoding="utf-8")


def run(argv) -> None:
    from lora_lab.config import DataConfig, FaceScorerConfig
    from lora_lab.data.dataset import load_dataset
    from lora_lab.data.doctor import _Faces, examine

    parser = argparse.ArgumentParser(prog="python -m lora_lab.bench doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--side", type=int, default=768, help="long side of each image, px")
    parser.add_argument("--cache-dir", default="sweeps/.cache")
    args = parser.parse_args(argv)
    cache_dir = Path(args.cache_dir).resolve()
    with tempfile.TemporaryDirectory(prefix="lora_lab_doctor_bench_") as tmp:
        _build(Path(tmp) / "data" / "10_sks", cache_dir, args.images, args.side)
        started = time.perf_counter()
        dataset = load_dataset(DataConfig(path=str(Path(tmp) / "data"), token="sks"), cache_dir)
        loaded = time.perf_counter() - started
        timings = {}
        for person in (True, False):
            started = time.perf_counter()
            faces = None
            if person:  # FaceNet's weights are random offline, so the doctor would skip the identity
                faces = _Faces(FaceScorerConfig(pretrained=None))  # check; timed anyway, it costs the same
                faces.embedder.random = False
            examine(dataset.samples, resolution=512, token="sks", person=person, faces=faces)
            timings[person] = time.perf_counter() - started  # the face models' loading included
    print(f"dataset doctor on {args.images} images of {args.side} px (JPEG), this machine's CPU:")
    print(f"  reading and checking the files (load_dataset): {loaded:.1f} s")
    print(f"  the doctor, every check (faces, identity, blur, duplicates, captions; FaceNet's random weights "
          f"cost what real ones do): {timings[True]:.1f} s "
          f"({timings[True] / args.images * 1000:.0f} ms an image)")
    print(f"  the doctor without face checks (object / style sets): {timings[False]:.1f} s")
    verdict = "met" if loaded + timings[True] <= TARGET_S else "MISSED"
    print(f"  target: the whole check in {TARGET_S:.0f} s or less: {verdict} ({loaded + timings[True]:.1f} s)")
