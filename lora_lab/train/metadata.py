"""What a trained LoRA file says about itself: kohya's ``ss_*`` keys and Stability AI's
``modelspec.*`` keys, as A1111, ComfyUI, Civitai and kohya's own tools read them.

SDXL files carry ``ss_base_model_version`` = ``sdxl_base_v1-0`` (A1111 shows a LoRA only under
checkpoints of its version) and the model-spec architecture ``stable-diffusion-xl-v1-base/lora``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, Optional

from lora_lab.config import Config
from lora_lab.data.buckets import BucketSpec
from lora_lab.data.dataset import Dataset, SubsetOptions
from lora_lab.data.steps import bucket_table
from lora_lab.files import file_sha256, legacy_file_hash
from lora_lab.lora import kohya as kohya_io
from lora_lab.lora.lycoris_net import LYCORIS_TYPES, network_args
from lora_lab.models.base import BaseModel
from lora_lab.train.optimizers import optimizer_class, optimizer_kwargs
from lora_lab.versions import versions


def metadata(config: Config, base: BaseModel, dataset: Dataset, *, epoch: int, steps: int,
              max_steps: int, started: str, finished: Optional[str], warmup: int,
              batches_per_epoch: int, session_id: int) -> Dict[str, str]:
    """The metadata of one saved epoch file, field by field in kohya's forms: ``None`` where
    kohya writes None (a rate that was not given), JSON for its dicts, and no
    ``ss_network_args`` at all when there are none. ``session_id`` ties one run's epoch files
    together (kohya's random ``ss_session_id``)."""
    t = config.train
    buckets = _bucket_fields(config, dataset)
    out = kohya_io.kohya_metadata(
        ss_session_id=session_id,
        ss_network_module="lycoris.kohya" if t.network_type in LYCORIS_TYPES else "networks.lora",
        ss_network_dim=t.network_dim,
        ss_network_alpha=t.network_alpha,
        ss_learning_rate=t.learning_rate,
        ss_unet_lr=t.unet_lr,
        ss_text_encoder_lr=text_encoder_lr(t),
        ss_network_train_unet_only=not t.trains_text_encoder,
        ss_lr_scheduler=t.lr_scheduler,
        ss_lr_warmup_steps=warmup,
        ss_optimizer=optimizer_record(t, base.device),
        ss_epoch=epoch,
        ss_steps=steps,
        ss_max_train_steps=max_steps,
        ss_num_epochs=t.epochs,
        ss_num_train_images=sum(s.repeats for s in dataset.train),
        ss_num_reg_images=len(dataset.reg),
        ss_batch_size_per_device=t.batch_size,
        ss_gradient_accumulation_steps=t.gradient_accumulation,
        ss_resolution=f"({config.resolution}, {config.resolution})",
        ss_seed=t.seed,
        ss_mixed_precision=t.mixed_precision,
        ss_clip_skip=t.clip_skip,
        ss_noise_offset=t.noise_offset,
        ss_min_snr_gamma=t.min_snr_gamma,
        ss_prior_loss_weight=config.data.prior_loss_weight,
        # kohya's validation keys: the held-out share, its seed, its images x repeats; the loss
        # is taken at every epoch's end (kohya's None for the every-n settings and the cap).
        ss_validation_split=config.data.validation_split,
        ss_validation_seed=config.data.validation_seed,
        ss_num_validation_images=sum(s.repeats for s in dataset.validation),
        ss_max_validation_steps=None,
        ss_validate_every_n_epochs=None,
        ss_validate_every_n_steps=None,
        **checkpoint_fields(base.source),
        ss_base_model_version=base.base_version,
        ss_num_batches_per_epoch=batches_per_epoch,
        ss_cache_latents=t.cache_latents,
        ss_max_grad_norm=t.max_grad_norm,
        ss_datasets=[_dataset_metadata(config, dataset, buckets)],
        ss_v2=base.base_version.startswith("sd_v2"),
        ss_v_parameterization=base.prediction_type == "v_prediction",
        ss_output_name=t.output_name,
        ss_training_started_at=started,
        ss_training_finished_at=finished,
        ss_tag_frequency=dataset.tag_frequency(),
        ss_dataset_dirs={Path(f).name: {"n_repeats": _repeats(dataset, f), "img_count": _count(dataset, f)}
                         for f in dataset.folders},
        ss_caption_extension=config.data.caption_extension,
        # What the images were trained with (a dataset_config.toml sets these per subset).
        ss_shuffle_caption=any(s.shuffle_caption for s in dataset.train),
        ss_keep_tokens=max((s.keep_tokens for s in dataset.train if s.shuffle_caption), default=0),
        ss_flip_aug=any(s.options.flip_aug for s in dataset.train),
        ss_caption_dropout_rate=max((s.options.caption_dropout_rate for s in dataset.train), default=0.0),
        ss_caption_tag_dropout_rate=max((s.options.caption_tag_dropout_rate for s in dataset.train), default=0.0),
        ss_enable_bucket=config.data.enable_bucket,
        ss_bucket_no_upscale=config.data.bucket_no_upscale,
        **buckets,
        **modelspec(config, base, started),
        # kohya records its own commit in ss_sd_scripts_commit_hash; ours, with the libraries
        # whose behaviour shapes the file, as JSON beside it.
        lora_lab_versions=versions(),
    )
    if t.network_type in LYCORIS_TYPES:  # LyCORIS' kohya wrapper: algo and its settings, as strings
        out["ss_network_args"] = json.dumps(network_args(t))
    elif t.conv_dim:  # kohya's form: the --network_args strings as given, as JSON
        out["ss_network_args"] = json.dumps({"conv_dim": _arg(t.conv_dim), "conv_alpha": _arg(t.conv_alpha)})
    return out


def text_encoder_lr(t) -> Optional[object]:
    """kohya's ``ss_text_encoder_lr``: None when the text encoders are not trained (or no rate
    was given), the rate, or SDXL's two rates as a list."""
    if not t.trains_text_encoder:
        return None
    if t.text_encoder_2_lr is not None:
        return [t.text_encoder_lr_of(0), t.text_encoder_lr_of(1)]
    return t.text_encoder_lr


def optimizer_record(t, device) -> str:
    """kohya's ``ss_optimizer``: the optimizer's class path, its arguments appended as
    ``(key=value,...)`` when there are any (``torch.optim.adamw.AdamW``)."""
    cls = optimizer_class(t.optimizer, device)
    args = optimizer_kwargs(t)
    given = ",".join(f"{k}={v}" for k, v in args.items())
    return f"{cls.__module__}.{cls.__name__}" + (f"({given})" if given else "")


def _arg(value) -> str:
    """A number as a user types it into kohya's ``--network_args`` (4, 1, 0.5)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def checkpoint_fields(source: str) -> Dict[str, str]:
    """kohya's ``ss_sd_model_name`` (the checkpoint's file or folder name, or the hub id) and,
    for a single file, ``ss_sd_model_hash`` (A1111's old 8-hex hash) and ``ss_new_sd_model_hash``
    (sha256 of the file; A1111's "Model hash" is its first 10 characters)."""
    path = Path(source)
    if not path.exists():
        return {"ss_sd_model_name": source}
    out = {"ss_sd_model_name": path.name}
    if path.is_file():
        out.update(ss_sd_model_hash=legacy_file_hash(path), ss_new_sd_model_hash=file_sha256(path))
    return out


def modelspec(config: Config, base: BaseModel, started: str) -> Dict[str, str]:
    """The Stability AI model-spec keys that UIs and model sites read, as kohya writes them
    for an SD 1.x, 2.x or SDXL LoRA."""
    if base.is_sdxl:
        arch = "stable-diffusion-xl-v1-base"
    elif base.base_version.startswith("sd_v2"):
        arch = "stable-diffusion-v2-768-v" if base.prediction_type == "v_prediction" else "stable-diffusion-v2-512"
    else:
        arch = "stable-diffusion-v1"
    out = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": config.train.output_name,
        "modelspec.resolution": f"{config.resolution}x{config.resolution}",
        "modelspec.date": datetime.fromtimestamp(int(float(started))).isoformat(),
        "modelspec.prediction_type": "v" if base.prediction_type == "v_prediction" else "epsilon",
        "modelspec.implementation_version": f"lora_lab/{versions().get('lora_lab', 'unknown')}",
    }
    if config.train.clip_skip > 1:
        out["modelspec.encoder_layer"] = str(config.train.clip_skip)
    if config.data.token:
        out["modelspec.trigger_phrase"] = config.data.token
    return out


def _dataset_metadata(config: Config, dataset: Dataset, buckets: dict) -> dict:
    """One entry of kohya's ``ss_datasets``: a DreamBooth-style dataset, a subset per folder."""
    d = config.data
    subsets = []
    for folder in dict.fromkeys(dataset.folders + sorted({str(s.path.parent) for s in dataset.reg})):
        name = Path(folder).name
        reg = any(str(s.path.parent) == folder for s in dataset.reg)
        first = next((s for s in dataset.samples if str(s.path.parent) == folder), None)
        subsets.append({
            "img_count": _count(dataset, folder), "num_repeats": _repeats(dataset, folder), "color_aug": False,
            "random_crop": False,
            **{k: v if v != "" else None for k, v in asdict(first.options if first else SubsetOptions.from_config(d)).items()},
            "image_dir": name,
            "class_tokens": name.split("_", 1)[1] if "_" in name and name.split("_", 1)[0].isdigit() else None,
            "is_reg": reg})
    return {"is_dreambooth": True, "batch_size_per_device": config.train.batch_size,
            "num_train_images": sum(s.repeats for s in dataset.train), "num_reg_images": len(dataset.reg),
            "resolution": [config.resolution, config.resolution], "enable_bucket": d.enable_bucket,
            "min_bucket_reso": buckets["ss_min_bucket_reso"], "max_bucket_reso": buckets["ss_max_bucket_reso"],
            "tag_frequency": dataset.tag_frequency(), "bucket_info": buckets["ss_bucket_info"], "subsets": subsets}


def _bucket_fields(config: Config, dataset: Dataset) -> dict:
    """kohya's bucket keys: the sizes in use and, with buckets on, the bucket table."""
    spec = BucketSpec.from_config(config.data, config.resolution)
    if not spec.enabled:
        return {"ss_min_bucket_reso": None, "ss_max_bucket_reso": None, "ss_bucket_info": None}
    counts, error = bucket_table(dataset, spec)
    info = {"buckets": {str(i): {"resolution": list(reso), "count": n} for i, (reso, n) in enumerate(counts.items())},
            "mean_img_ar_error": error}
    return {"ss_min_bucket_reso": spec.min_reso, "ss_max_bucket_reso": spec.max_reso, "ss_bucket_info": info}


def _repeats(dataset: Dataset, folder: str) -> int:
    return next((s.repeats for s in dataset.samples if str(s.path.parent) == folder), 0)


def _count(dataset: Dataset, folder: str) -> int:
    return sum(1 for s in dataset.samples if str(s.path.parent) == folder)


def now() -> str:
    return str(datetime.now(timezone.utc).timestamp())
