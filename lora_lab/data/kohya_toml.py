"""kohya's ``dataset_config.toml`` with kohya's meaning: every key applied or refused by name.

``[general]`` holds defaults for every dataset and subset, ``[[datasets]]`` dataset keys (and
defaults for its subsets), ``[[datasets.subsets]]`` subset keys; the nearest level wins. Keys
lora_lab applies: ``image_dir``, ``num_repeats``, ``class_tokens``, ``is_reg``,
``caption_extension`` (kohya's default for DreamBooth subsets: ``.caption``),
``shuffle_caption``, ``keep_tokens``, ``keep_tokens_separator``, ``caption_prefix`` /
``caption_suffix``, ``caption_dropout_rate``, ``caption_tag_dropout_rate``, ``flip_aug``,
``resolution`` and ``batch_size`` (the run trains at them), ``prior_loss_weight``, and the
bucket keys ``enable_bucket``, ``min_bucket_reso``, ``max_bucket_reso``, ``bucket_reso_steps``,
``bucket_no_upscale`` (left out: kohya's default, no buckets; the sizes left out scale with the
resolution as lora_lab's do). Any other kohya key is accepted at its kohya default (it changes
nothing) and refused otherwise with a sentence naming it; a key kohya does not know is refused.
A value given on the command line (``train.batch_size=4``) or by a sweep wins over the file.
"""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path
from typing import Any, Dict, List, Tuple

from lora_lab.errors import DataError

log = logging.getLogger(__name__)

# kohya's keys and defaults (library/config_util.py: BaseSubsetParams, DreamBoothSubsetParams,
# BaseDatasetParams, DreamBoothDatasetParams).
SUBSET_DEFAULTS: Dict[str, Any] = {
    "image_dir": None, "num_repeats": 1, "shuffle_caption": False, "caption_separator": ",", "keep_tokens": 0,
    "keep_tokens_separator": None, "secondary_separator": None, "enable_wildcard": False, "color_aug": False,
    "flip_aug": False, "face_crop_aug_range": None, "random_crop": False, "caption_prefix": None,
    "caption_suffix": None, "caption_dropout_rate": 0.0, "caption_dropout_every_n_epochs": 0,
    "caption_tag_dropout_rate": 0.0, "token_warmup_min": 1, "token_warmup_step": 0, "custom_attributes": None,
    "validation_seed": 0, "validation_split": 0.0, "resize_interpolation": None,
    "is_reg": False, "class_tokens": None, "caption_extension": ".caption", "cache_info": False, "alpha_mask": False,
    "metadata_file": None,
}
DATASET_DEFAULTS: Dict[str, Any] = {
    "resolution": None, "network_multiplier": 1.0, "debug_dataset": False, "validation_seed": None,
    "validation_split": 0.0, "resize_interpolation": None, "batch_size": 1, "enable_bucket": False,
    "min_bucket_reso": 256, "max_bucket_reso": 1024, "bucket_reso_steps": 64, "bucket_no_upscale": False,
    "prior_loss_weight": 1.0,
}
BUCKET_KEYS = ("enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale")
APPLIED = {"image_dir", "num_repeats", "class_tokens", "is_reg", "caption_extension", "shuffle_caption",
           "keep_tokens", "keep_tokens_separator", "caption_prefix", "caption_suffix", "caption_dropout_rate",
           "caption_tag_dropout_rate", "flip_aug", "resolution", "batch_size", "prior_loss_weight", *BUCKET_KEYS}
# Where a subset or dataset key sits, and the run setting a dataset key becomes.
RUN_SETTINGS = {"resolution": "train.resolution", "batch_size": "train.batch_size",
                "prior_loss_weight": "data.prior_loss_weight", **{k: f"data.{k}" for k in BUCKET_KEYS}}


def read(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise DataError(f"{path}: not valid TOML ({exc})") from None


def _check(path: Path, where: str, table: dict, allowed: Dict[str, Any]) -> None:
    for key, value in table.items():
        if key in ("datasets", "subsets") and isinstance(value, list):
            continue
        if key not in allowed:
            raise DataError(f"{path}: {where}.{key} is not a key of kohya's dataset config; allowed here: "
                            f"{', '.join(sorted(allowed))}")
        if key == "metadata_file":
            raise DataError(f"{path}: {where}.metadata_file: fine-tuning subsets are not read from a TOML; point "
                            "data.path at the folder with its metadata.jsonl instead")
        if key not in APPLIED and value != allowed[key]:
            raise DataError(f"{path}: {where}.{key} = {value!r}: lora_lab does not apply {key} yet (kohya's "
                            f"default: {allowed[key]!r}); remove it or set the default to train without it")


def subsets(path: Path, doc: dict) -> List[Tuple[str, dict]]:
    """Every subset with its effective options (general < dataset < subset), keys checked."""
    general = doc.get("general", {})
    _check(path, "general", general, {**DATASET_DEFAULTS, **SUBSET_DEFAULTS})
    for key in doc:
        if key not in ("general", "datasets"):
            raise DataError(f"{path}: [{key}] is not a table of kohya's dataset config; allowed: general, datasets")
    datasets = doc.get("datasets", [])
    if not datasets:
        raise DataError(f"{path}: no [[datasets]] table")
    out = []
    for d, dataset in enumerate(datasets):
        _check(path, f"datasets[{d}]", dataset, {**DATASET_DEFAULTS, **SUBSET_DEFAULTS})
        subs = dataset.get("subsets", [])
        if not subs:
            raise DataError(f"{path}: datasets[{d}] has no [[datasets.subsets]]")
        for s, subset in enumerate(subs):
            _check(path, f"datasets[{d}].subsets[{s}]", subset, SUBSET_DEFAULTS)
            opts = {**{k: v for k, v in general.items()}, **{k: v for k, v in dataset.items() if k != "subsets"},
                    **subset}
            out.append((f"datasets[{d}].subsets[{s}]", opts))
    return out


def run_settings(path: Path) -> Dict[str, Any]:
    """The run-wide values the file sets (``train.resolution``, ``train.batch_size``,
    ``data.prior_loss_weight``), one value each across its datasets."""
    doc = read(path)
    found: Dict[str, Any] = {}
    for where, opts in subsets(path, doc):
        for key, setting in RUN_SETTINGS.items():
            if key in ("enable_bucket", "bucket_no_upscale"):  # kohya's default when left out: no buckets
                opts = {key: DATASET_DEFAULTS[key], **opts}
            if key not in opts:
                continue
            value = opts[key]
            if key == "resolution":
                value = _square(path, where, value)
            if setting in found and found[setting] != value:
                raise DataError(f"{path}: {where}.{key} = {opts[key]!r} differs from another dataset's "
                                f"({found[setting]!r}); lora_lab trains every dataset at one {key}")
            found[setting] = value
    return found


def _square(path: Path, where: str, value) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, list) and len(value) == 2 and value[0] == value[1]:
        return int(value[0])
    raise DataError(f"{path}: {where}.resolution = {value!r}: lora_lab trains at one square resolution (one "
                    "number, or [n, n]), the area of its buckets; enable_bucket = true keeps other shapes")


def apply(config):
    """``config`` with the TOML's run-wide values where the command line did not set them
    (``config.explicit``); says what it applied. Other data sources leave ``config`` as it is."""
    from dataclasses import replace

    path = config.data.path
    if not path or Path(path).suffix != ".toml" or not Path(path).expanduser().is_file():
        return config
    explicit = set(config.explicit)
    applied = []
    train, data = config.train, config.data
    for setting, value in run_settings(Path(path).expanduser()).items():
        if setting in explicit:
            continue
        section, key = setting.split(".")
        if section == "train":
            train = replace(train, **{key: value})
        else:
            data = replace(data, **{key: value})
        applied.append(f"{setting}={value}")
    if applied:
        log.info(f"{Path(path).name} sets {', '.join(applied)} (the command line wins where it sets them)")
    return replace(config, train=train, data=data)
