"""Find training images and captions in the three forms our users have, and check them all.

Forms:
    * kohya folders: ``<parent>/<repeats>_<class tokens>/`` with images and same-stem captions;
    * a folder with a diffusers ``metadata.jsonl`` (``{"file_name": ..., "text": ...}``);
    * a kohya ``dataset_config.toml`` (general / datasets / subsets).

Every image is opened and every caption read here, before any model is loaded, so bad input
stops the run with one message naming the file. Sample ids are content hashes (image bytes),
so caches can never pair an image with another image's caption or latents.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, List, Optional, Tuple

from PIL import Image, UnidentifiedImageError

from lora_lab import plugins
from lora_lab.config import DataConfig
from lora_lab.data.captions import CaptionRule
from lora_lab.errors import DataError
from lora_lab.images import open_rgb

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_KOHYA_DIR = re.compile(r"^(\d+)_(.*)$")


@dataclass(frozen=True)
class SubsetOptions(CaptionRule):
    """How one subset's images and captions train (kohya's subset keys of the same names): the
    per-step caption rule, the text around every caption, and mirroring."""

    caption_prefix: str = ""
    caption_suffix: str = ""
    flip_aug: bool = False

    @classmethod
    def from_config(cls, cfg: DataConfig, **overrides) -> "SubsetOptions":
        values = {f: getattr(cfg, f) for f in cls.__dataclass_fields__}
        values.update(overrides)
        return cls(**values)

    def caption(self, text: str) -> str:
        """The caption as read, with the prefix and suffix (joined with a space, as kohya)."""
        return " ".join(t for t in (self.caption_prefix, text, self.caption_suffix) if t)



@dataclass(frozen=True)
class Sample:
    """One training image.

    Attributes:
        id: sha256 of the image file's bytes (stable across renames and orderings).
        path: The image file.
        caption: The caption before any per-step shuffling.
        repeats: How often the image is shown per epoch.
        is_reg: A regularization (prior preservation) image.
        options: Its subset's caption and augmentation options.
        size: (width, height) of the upright image (EXIF orientation applied): its bucket,
            and SDXL's "original size" conditioning.
    """

    id: str
    path: Path
    caption: str
    repeats: int
    is_reg: bool = False
    options: SubsetOptions = SubsetOptions()
    size: Tuple[int, int] = (0, 0)

    @property
    def shuffle_caption(self) -> bool:
        return self.options.shuffle_caption

    @property
    def keep_tokens(self) -> int:
        return self.options.keep_tokens


@dataclass
class Dataset:
    """All samples of a run plus what a person needs to see before training starts."""

    samples: List[Sample]
    source: str
    token: Optional[str]
    folders: List[str] = field(default_factory=list)
    suite: Optional[Path] = None  # the data folder's own prompt suite (eval.suite=data)
    validation: List[Sample] = field(default_factory=list)  # held out (data.validation_split)

    @property
    def train(self) -> List[Sample]:
        return [s for s in self.samples if not s.is_reg]

    @property
    def reg(self) -> List[Sample]:
        return [s for s in self.samples if s.is_reg]

    def images_per_epoch(self) -> int:
        """Training images shown per epoch (kohya: repeats counted; reg images matched to them)."""
        n = sum(s.repeats for s in self.train)
        return 2 * n if self.reg else n

    def tag_frequency(self) -> dict:
        """kohya's ``ss_tag_frequency``: {folder: {tag: count}}."""
        out: dict = {}
        for s in self.samples:
            counts = out.setdefault(s.path.parent.name, Counter())
            counts.update(t.strip() for t in s.caption.split(",") if t.strip())
        return {k: dict(v) for k, v in out.items()}

    def summary(self) -> str:
        lines = [f"dataset: {self.source}"]
        by_folder: dict = {}
        for s in self.samples:
            key = (str(s.path.parent), s.repeats, s.is_reg)
            by_folder[key] = by_folder.get(key, 0) + 1
        for (folder, repeats, is_reg), n in by_folder.items():
            kind = "regularization" if is_reg else "train"
            lines.append(f"  {folder}: {n} images x {repeats} repeats ({kind})")
        if self.validation:
            lines.append(f"  {len(self.validation)} images held out for the validation loss: "
                         + ", ".join(s.path.name for s in self.validation))
        if self.token:
            lines.append(f"  token: {self.token}")
        return "\n".join(lines)


def load_dataset(cfg: DataConfig, cache_dir: Path, explicit: Collection[str] = ()) -> Dataset:
    """Discover and check every image and caption described by ``cfg``.

    Args:
        cfg: The data config.
        cache_dir: Where built-in data sets are written.
        explicit: Config keys the command line set (``Config.explicit``): a dataset_config.toml's
            own values give way to these.

    Raises:
        DataError: naming the file or folder and what is allowed.
    """
    if cfg.path:
        path = Path(cfg.path).expanduser()
    elif cfg.builtin == "demo":
        from lora_lab.data.demo import demo_folder

        path = demo_folder(Path(cache_dir))
    else:  # a data set a package registers (lora_lab.plugins), e.g. the toy world's subjects
        path = plugins.provider("data", cfg.builtin)(Path(cache_dir), cfg.subject)
    if not path.exists():
        raise DataError(f"data.path: {path} does not exist")
    if path.is_file():
        if path.suffix != ".toml":
            raise DataError(
                f"data.path: {path} is a file; give a folder (kohya or metadata.jsonl) "
                "or a dataset_config.toml"
            )
        samples, folders = _from_toml(path, cfg, set(explicit))
        source = f"kohya dataset_config {path}"
    elif (path / "metadata.jsonl").exists():
        samples = _from_metadata(path, cfg)
        folders = [str(path)]
        source = f"diffusers metadata.jsonl in {path}"
    else:
        samples, folders = _from_kohya_parent(path, cfg, is_reg=False)
        source = f"kohya folders in {path}"
    if cfg.reg_path:
        reg, reg_folders = _from_kohya_parent(Path(cfg.reg_path).expanduser(), cfg, is_reg=True)
        samples += reg
        folders += reg_folders
    if not any(not s.is_reg for s in samples):
        raise DataError(f"data.path: no training images found in {path}")
    if cfg.repeats is not None:
        samples = [_replace_repeats(s, cfg.repeats) if not s.is_reg else s for s in samples]
    root = path if path.is_dir() else path.parent
    suite = root / "suite.yaml" if (root / "suite.yaml").is_file() else None
    token = cfg.token or _suite_token(suite) or _guess_token(samples)
    samples, validation = _split(samples, cfg)
    return Dataset(samples=samples, source=source, token=token, folders=folders, suite=suite,
                   validation=validation)


def _split(samples: List[Sample], cfg: DataConfig) -> tuple[List[Sample], List[Sample]]:
    """Hold out ``validation_split`` of the training images (kohya's meaning), chosen by seed."""
    if not cfg.validation_split:
        return samples, []
    train = sorted({s.id: s for s in samples if not s.is_reg}.values(), key=lambda s: str(s.path))
    n = max(1, round(len(train) * cfg.validation_split))
    if n >= len(train):
        raise DataError(f"data.validation_split: {cfg.validation_split} of {len(train)} images leaves none "
                        "to train on; use a smaller fraction")
    held = {s.id for s in random.Random(cfg.validation_seed).sample(train, n)}
    return [s for s in samples if s.is_reg or s.id not in held], [s for s in train if s.id in held]


def _suite_token(suite: Optional[Path]) -> Optional[str]:
    """The trigger a data folder's own ``suite.yaml`` names (``token: sks person``), if any."""
    if suite is None:
        return None
    import yaml

    try:
        doc = yaml.safe_load(suite.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DataError(f"{suite}: not a readable suite file ({exc.__class__.__name__})") from None
    return str(doc["token"]) if isinstance(doc, dict) and doc.get("token") else None


def _replace_repeats(s: Sample, repeats: int) -> Sample:
    from dataclasses import replace

    return replace(s, repeats=repeats)


def _guess_token(samples: List[Sample]) -> Optional[str]:
    for s in samples:
        m = _KOHYA_DIR.match(s.path.parent.name)
        if m and not s.is_reg:
            return m.group(2).split()[0] if m.group(2).strip() else None
    return None


def _images_in(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _from_kohya_parent(parent: Path, cfg: DataConfig, *, is_reg: bool) -> tuple[List[Sample], List[str]]:
    key = "data.reg_path" if is_reg else "data.path"
    if not parent.is_dir():
        raise DataError(f"{key}: {parent} is not a folder")
    if _images_in(parent):
        raise DataError(
            f"{key}: {parent} holds images directly; kohya expects them in subfolders named "
            f"'<repeats>_<token>', e.g. {parent}/10_sks/. Point {key} at the parent of such folders."
        )
    samples: List[Sample] = []
    folders: List[str] = []
    for sub in sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")):
        m = _KOHYA_DIR.match(sub.name)
        images = _images_in(sub)
        if not m:
            if images:
                raise DataError(
                    f"{key}: folder {sub} has no '<repeats>_' prefix, so kohya would ignore its "
                    f"{len(images)} images; rename it like '10_{sub.name}' (10 repeats)"
                )
            continue
        repeats, class_tokens = int(m.group(1)), m.group(2).strip()
        if repeats < 1:
            raise DataError(f"{key}: folder {sub} has {repeats} repeats; the prefix must be >= 1")
        samples += _subset(sub, repeats, class_tokens, cfg.caption_extension, is_reg, SubsetOptions.from_config(cfg))
        folders.append(str(sub))
    if not samples:
        raise DataError(
            f"{key}: {parent} has no '<repeats>_<token>' folder with images "
            f"(allowed image types: {', '.join(IMAGE_EXTENSIONS)})"
        )
    return samples, folders


def _subset(folder: Path, repeats: int, class_tokens: str, caption_ext: str, is_reg: bool,
            options: SubsetOptions) -> List[Sample]:
    images = _images_in(folder)
    if not images:
        raise DataError(f"image folder {folder} is empty (allowed image types: {', '.join(IMAGE_EXTENSIONS)})")
    out = []
    for image in images:
        caption_file = image.with_suffix(caption_ext)
        if caption_file.exists():
            caption = _read_caption(caption_file)
        elif class_tokens:
            caption = class_tokens
        else:
            raise DataError(
                f"{image} has no caption file {caption_file.name} and its folder names no class "
                "token to use instead; add the caption file or name the folder '<repeats>_<token>'"
            )
        digest, size = _check_image(image)
        out.append(Sample(digest, image, options.caption(caption), repeats, is_reg, options, size))
    return out


def _from_metadata(folder: Path, cfg: DataConfig) -> List[Sample]:
    meta = folder / "metadata.jsonl"
    samples = []
    for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{meta} line {n}: not valid JSON ({exc.msg})") from None
        if "file_name" not in row:
            raise DataError(f"{meta} line {n}: no 'file_name' field")
        if cfg.caption_column not in row:
            raise DataError(
                f"{meta} line {n}: no caption column {cfg.caption_column!r} "
                f"(the line has: {', '.join(sorted(row))}); set data.caption_column"
            )
        image = folder / row["file_name"]
        if not image.exists():
            raise DataError(f"{meta} line {n}: image {image} does not exist")
        caption = str(row[cfg.caption_column]).strip()
        digest, size = _check_image(image)
        options = SubsetOptions.from_config(cfg)
        samples.append(Sample(digest, image, options.caption(caption), cfg.repeats or 1, False, options, size))
    if not samples:
        raise DataError(f"{meta} lists no images")
    return samples


def _from_toml(path: Path, cfg: DataConfig, explicit: set) -> tuple[List[Sample], List[str]]:
    """A kohya dataset_config.toml: every key applied with kohya's meaning or refused
    (:mod:`lora_lab.kohya_toml`); a value set on the command line wins."""
    from lora_lab.data.kohya_toml import read, subsets

    def pick(opts: dict, key: str, default):
        ours = f"data.{key}"
        return getattr(cfg, key) if ours in explicit else opts.get(key, default)

    samples: List[Sample] = []
    folders: List[str] = []
    for where, opts in subsets(path, read(path)):
        if "image_dir" not in opts:
            raise DataError(f"{path}: {where} has no image_dir")
        image_dir = (path.parent / opts["image_dir"]).expanduser()
        if not image_dir.is_dir():
            raise DataError(f"{path}: {where}.image_dir {image_dir} is not a folder")
        # kohya does not parse a '<repeats>_' prefix in a TOML image_dir: num_repeats rules.
        samples += _subset(
            image_dir,
            int(opts.get("num_repeats", 1)),
            str(opts.get("class_tokens") or "").strip(),
            str(pick(opts, "caption_extension", ".caption")),  # kohya's default for DreamBooth subsets
            bool(opts.get("is_reg", False)),
            _toml_options(opts, pick),
        )
        folders.append(str(image_dir))
    return samples, folders


def _toml_options(opts: dict, pick) -> SubsetOptions:
    """A subset's options from its TOML keys (kohya's None means the default)."""
    from dataclasses import asdict

    values = {}
    for name, default in asdict(SubsetOptions()).items():
        value = pick(opts, name, default)
        values[name] = default if value is None else type(default)(value)
    return SubsetOptions(**values)


def _read_caption(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"caption {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from None
    return " ".join(text.split())


def _check_image(path: Path) -> Tuple[str, Tuple[int, int]]:
    """Open and fully decode an image; return the sha256 of its bytes and its upright size."""
    raw = path.read_bytes()
    if not raw:
        raise DataError(f"image {path} is empty (0 bytes)")
    try:
        from io import BytesIO

        with Image.open(BytesIO(raw)) as im:
            im.load()
            w, h = im.size
            if im.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientation turns it by 90 degrees
                w, h = h, w
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"image {path} cannot be read as an image ({exc.__class__.__name__}: {exc})") from None
    return hashlib.sha256(raw).hexdigest(), (w, h)


def load_image(path: Path, target, flip: bool = False) -> Image.Image:
    """The RGB image as it trains: scaled to cover its bucket (``target``: a
    :class:`lora_lab.buckets.Placement`, or a resolution for a centre-cropped square), cropped
    to it, and mirrored when ``flip``."""
    from lora_lab.data.buckets import BucketSpec, place

    im = open_rgb(path)
    p = place(im.size, BucketSpec(int(target))) if isinstance(target, int) else target
    im = im.resize(p.resized, Image.Resampling.LANCZOS)
    top, left = p.crop
    im = im.crop((left, top, left + p.bucket[0], top + p.bucket[1]))
    return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else im
