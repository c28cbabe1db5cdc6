"""Training on the tiny model: files, metadata, TensorBoard, determinism, NaN, optimizers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import make_config, run_cli
from lora_lab.data.dataset import load_dataset
from lora_lab.errors import TrainingError
from lora_lab.train.loop import train
from lora_lab.train.optimizers import check_environment


def _run(base, cache_dir, out, **train_kw):
    cfg = make_config(cache_dir, out, **train_kw)
    ds = load_dataset(cfg.data, cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    return cfg, train(cfg, base, ds, out)


def _scalars(tb_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_epoch_files_metadata_and_tensorboard(base, cache_dir, demo_dir, tmp_path):
    cfg, result = _run(base, cache_dir, tmp_path / "run", epochs=3, save_every_n_epochs=1)
    lora = tmp_path / "run" / "lora"
    assert sorted(p.name for p in lora.iterdir()) == ["last-000001.safetensors", "last-000002.safetensors",
                                                      "last.safetensors"]
    assert result.steps == 18  # 12 images x 1 repeat / batch 2 x 3 epochs
    with safe_open(str(lora / "last-000002.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["ss_epoch"] == "2" and meta["ss_steps"] == "12" and meta["ss_max_train_steps"] == "18"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_lr_scheduler"] == "constant"
    assert meta["ss_resolution"] == "(32, 32)" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_training_finished_at"] == "None"
    import json

    assert json.loads(meta["ss_tag_frequency"])["10_sks woman"]["photo of sks woman"] == 12
    assert json.loads(meta["ss_dataset_dirs"])["10_sks woman"] == {"n_repeats": 1, "img_count": 12}
    for key in ("ss_optimizer", "ss_seed", "ss_clip_skip", "ss_num_train_images", "ss_sd_model_name",
                "ss_output_name", "ss_training_started_at", "sshs_model_hash", "ss_batch_size_per_device",
                "ss_mixed_precision", "ss_noise_offset", "ss_min_snr_gamma", "ss_lr_warmup_steps",
                "ss_num_epochs", "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr"):
        assert key in meta, key
    # As kohya writes them: the checkpoint's own name, batches per epoch, caches, the dataset.
    assert meta["ss_sd_model_name"] == Path(result_source := base.source).name and result_source
    assert meta["ss_num_batches_per_epoch"] == "6" and meta["ss_cache_latents"] == "True"
    assert meta["ss_max_grad_norm"] == "1.0"
    (ds,) = json.loads(meta["ss_datasets"])
    assert ds["is_dreambooth"] is True and ds["num_train_images"] == 12 and ds["resolution"] == [32, 32]
    assert ds["subsets"] == [{"img_count": 12, "num_repeats": 1, "color_aug": False, "flip_aug": False,
                              "random_crop": False, "shuffle_caption": False, "keep_tokens": 0,
                              "keep_tokens_separator": None, "caption_dropout_rate": 0.0,
                              "caption_tag_dropout_rate": 0.0, "caption_prefix": None, "caption_suffix": None,
                              "image_dir": "10_sks woman", "class_tokens": "sks woman", "is_reg": False}]
    # the demo's square photos, in buckets: one square bucket, as kohya's bucket_info writes it
    assert ds["enable_bucket"] is True and ds["min_bucket_reso"] == 16 and ds["max_bucket_reso"] == 64
    assert ds["bucket_info"] == {"buckets": {"0": {"resolution": [32, 32], "count": 12}}, "mean_img_ar_error": 0.0}
    assert meta["ss_enable_bucket"] == "True" and meta["ss_flip_aug"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.sai_model_spec"] == "1.0.1" and meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.title"] == "last" and meta["modelspec.resolution"] == "32x32"
    assert meta["modelspec.prediction_type"] == "epsilon" and "modelspec_title" not in meta
    with safe_open(str(lora / "last.safetensors"), framework="pt") as fh:
        last = fh.metadata()
    assert last["ss_training_finished_at"] != "None"
    # kohya's forms: no network args -> no key; rates not given -> None; the optimizer's class path;
    # one random session id for all epoch files of a run; its validation keys.
    assert "ss_network_args" not in meta
    assert meta["ss_text_encoder_lr"] == "None" and meta["ss_unet_lr"] == "None"
    assert meta["ss_network_train_unet_only"] == "True"
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW"
    assert meta["ss_session_id"].isdigit() and 0 <= int(meta["ss_session_id"]) <= 2**32
    assert last["ss_session_id"] == meta["ss_session_id"]
    assert (meta["ss_validation_split"], meta["ss_validation_seed"], meta["ss_num_validation_images"]) == (
        "0.0", "0", "0")
    assert meta["ss_validate_every_n_epochs"] == "None" and meta["ss_max_validation_steps"] == "None"
    ups = [v for k, v in load_file(lora / "last.safetensors").items() if k.endswith("lora_up.weight")]
    assert ups and all(v.abs().sum() > 0 for v in ups)  # training moved every up matrix off zero
    scalars = _scalars(tmp_path / "run" / "tb")
    assert {"loss/current", "loss/average", "lr/unet", "loss/epoch"} <= set(scalars)
    assert [s for s, _ in scalars["loss/epoch"]] == [1, 2, 3]
    assert len(scalars["loss/current"]) == 18
    assert scalars["lr/unet"][0][1] == pytest.approx(1e-3)
    # The adapter is gone afterwards: the base model is untouched for the next run.
    assert not any("lora" in n for n, _ in base.unet.named_parameters())


def test_same_seed_same_weights_other_seed_differs(base, cache_dir, demo_dir, tmp_path):
    _run(base, cache_dir, tmp_path / "a", epochs=1)
    _run(base, cache_dir, tmp_path / "b", epochs=1)
    _run(base, cache_dir, tmp_path / "c", epochs=1, seed=7)
    a, b, c = (load_file(tmp_path / x / "lora" / "last.safetensors") for x in "abc")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_text_encoder_lora_and_loss_options(base, cache_dir, demo_dir, tmp_path):
    _run(base, cache_dir, tmp_path / "te", epochs=1, text_encoder_lr=5e-4, min_snr_gamma=5.0,
         noise_offset=0.05, clip_skip=2, lr_scheduler="cosine", lr_warmup_steps=0.5,
         gradient_accumulation=2)
    tensors = load_file(tmp_path / "te" / "lora" / "last.safetensors")
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in tensors)
    with safe_open(str(tmp_path / "te" / "lora" / "last.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["ss_text_encoder_lr"] == "0.0005" and meta["ss_network_train_unet_only"] == "False"
    scalars = _scalars(tmp_path / "te" / "tb")
    lrs = [v for _, v in scalars["lr/unet"]]
    assert len(lrs) == 3 and lrs[0] < lrs[1] and lrs[2] < lrs[1]  # one warmup step, then cosine decay
    assert "lr/textencoder" in scalars


def test_metadata_of_a_run_with_network_args_rates_and_validation_as_kohya_writes_it(base, cache_dir, demo_dir,
                                                                                      tmp_path):
    """kohya's train_network.py forms: ``ss_network_args`` the --network_args strings as JSON,
    ``ss_optimizer`` the class path with its arguments, the rates as given, the validation keys."""
    import dataclasses
    import json

    cfg = make_config(cache_dir, tmp_path / "run", epochs=1, conv_dim=2, conv_alpha=0.5, unet_lr=2e-4,
                      optimizer_args={"weight_decay": 0.1})
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, validation_split=0.25, validation_seed=3))
    ds = load_dataset(cfg.data, cache_dir)
    train(cfg, base, ds, tmp_path / "run")
    with safe_open(str(tmp_path / "run" / "lora" / "last.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "0.5"}
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW(weight_decay=0.1)"
    assert meta["ss_unet_lr"] == "0.0002" and meta["ss_learning_rate"] == "0.001"
    assert meta["ss_text_encoder_lr"] == "None"
    assert (meta["ss_validation_split"], meta["ss_validation_seed"], meta["ss_num_validation_images"]) == (
        "0.25", "3", "3")  # 3 of the 12 demo images, 1 repeat


def test_adapters_attach_through_peft_not_the_model_libraries(base, cache_dir, demo_dir, tmp_path, monkeypatch):
    """transformers' and diffusers' add_adapter check peft's version against their own minimum
    (transformers 5.24 refused every released peft): training must not depend on either."""
    import diffusers.loaders.peft
    import transformers.integrations.peft

    def refuse(*a, **k):
        raise ValueError("The version of PEFT you are using is not compatible")

    monkeypatch.setattr(transformers.integrations.peft.PeftAdapterMixin, "add_adapter", refuse)
    monkeypatch.setattr(diffusers.loaders.peft.PeftAdapterMixin, "add_adapter", refuse)
    _, result = _run(base, cache_dir, tmp_path / "te", epochs=1, text_encoder_lr=5e-4)
    tensors = load_file(tmp_path / "te" / "lora" / "last.safetensors")
    te = [k for k in tensors if k.startswith("lora_te_") and k.endswith("lora_up.weight")]
    assert te and any(tensors[k].abs().sum() > 0 for k in te)  # the text-encoder LoRA trained
    assert not any("lora_A" in n for n, _ in base.text_encoder.named_parameters())  # and was removed


def test_files_record_the_library_versions_that_made_them(base, cache_dir, demo_dir, tmp_path):
    import json
    from importlib.metadata import version

    _run(base, cache_dir, tmp_path / "v", epochs=1)
    with safe_open(tmp_path / "v" / "lora" / "last.safetensors", "pt") as f:
        made_by = json.loads(f.metadata()["lora_lab_versions"])
    for name in ("torch", "diffusers", "transformers", "peft"):
        assert made_by[name] == version(name)


def test_nan_loss_stops_with_step_and_epoch(base, cache_dir, demo_dir, tmp_path, monkeypatch):
    from lora_lab.train import cache

    real = cache.cache_latents

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        return {k: torch.full_like(v, float("nan")) for k, v in out.items()}

    monkeypatch.setattr(cache, "cache_latents", poisoned)
    with pytest.raises(TrainingError, match=r"loss became nan at step 1 \(epoch 1\)"):
        _run(base, cache_dir, tmp_path / "nan", epochs=1)
    assert not any("lora" in n for n, _ in base.unet.named_parameters())


@pytest.mark.parametrize("optimizer,lr", [("adafactor", 1e-3), ("prodigy", 1.0), ("dadaptation", 1.0),
                                          ("lion", 1e-4)])
def test_optional_optimizers_train(base, cache_dir, demo_dir, tmp_path, optimizer, lr):
    _, result = _run(base, cache_dir, tmp_path / optimizer, epochs=1, optimizer=optimizer, learning_rate=lr)
    assert result.steps == 6 and result.final_loss == result.final_loss


def test_adamw_runs_fused_unless_the_user_chose_an_implementation():
    """AdamW's update in one kernel: the same step as torch's one-tensor-at-a-time default."""
    from lora_lab.config import TrainConfig
    from lora_lab.train.optimizers import make_optimizer

    def step(cfg):
        p = torch.nn.Parameter(torch.zeros(4, 3))
        opt = make_optimizer(cfg, [{"params": [p], "lr": 1e-2}], torch.device("cpu"))
        for _ in range(3):
            p.grad = torch.ones_like(p)
            opt.step()
        return opt, p.detach()

    fused, a = step(TrainConfig(optimizer="adamw"))
    plain, b = step(TrainConfig(optimizer="adamw", optimizer_args={"foreach": False}))
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, torch.full((4, 3), -0.03), atol=1e-4)
    opt, _ = step(TrainConfig(optimizer="adafactor", learning_rate=1e-3))  # only AdamW is given the flag
    assert "fused" not in opt.defaults or not opt.defaults["fused"]


def test_cuda_only_settings_are_refused_on_cpu():
    from lora_lab.config import TrainConfig

    with pytest.raises(TrainingError, match="adamw8bit .* needs a CUDA GPU"):
        check_environment(TrainConfig(optimizer="adamw8bit"), torch.device("cpu"))
    with pytest.raises(TrainingError, match="mixed_precision=bf16 needs a CUDA GPU"):
        check_environment(TrainConfig(mixed_precision="bf16"), torch.device("cpu"))


def test_missing_optimizer_package_is_named(monkeypatch):
    from lora_lab.config import TrainConfig

    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # import now raises ImportError
    with pytest.raises(TrainingError, match="needs the package prodigyopt: pip install prodigyopt"):
        check_environment(TrainConfig(optimizer="prodigy", learning_rate=1.0), torch.device("cpu"))


def test_latent_cache_is_keyed_by_content_bucket_and_mirroring(base, cache_dir, demo_dir, tmp_path):
    from dataclasses import replace

    from lora_lab.data.buckets import BucketSpec, place
    from lora_lab.models.base import module_fingerprint
    from lora_lab.train.cache import cache_latents

    ds = load_dataset(make_config(cache_dir, tmp_path).data, cache_dir)
    root = tmp_path / "c"
    fp = module_fingerprint(base.vae)
    square = {s.id: place(s.size, BucketSpec(32)) for s in ds.samples}
    first = cache_latents(ds.samples, base.vae, square, fp, root)
    backwards = cache_latents(list(reversed(ds.samples)), base.vae, square, fp, root)
    assert len(list(root.rglob("*.safetensors"))) == 12
    assert all(torch.equal(first[k], backwards[k]) for k in first)
    assert not torch.equal(first[(ds.samples[0].id, False)], first[(ds.samples[1].id, False)])
    # Another crop (here a smaller square) is another latent, never the cached one.
    small = cache_latents(ds.samples, base.vae, {s.id: place(s.size, BucketSpec(24)) for s in ds.samples}, fp, root)
    assert len(list(root.rglob("*.safetensors"))) == 24
    assert small[(ds.samples[0].id, False)].shape[-1] == 6 and first[(ds.samples[0].id, False)].shape[-1] == 8
    # flip_aug caches the mirrored image beside the upright one.
    mirrored = [replace(s, options=replace(s.options, flip_aug=True)) for s in ds.samples[:2]]
    both = cache_latents(mirrored, base.vae, square, fp, root, flips=True)
    assert len(list(root.rglob("*.safetensors"))) == 26
    sid = ds.samples[0].id
    assert torch.equal(both[(sid, False)], first[(sid, False)])
    assert not torch.allclose(both[(sid, True)], both[(sid, False)], atol=1e-3)
    from lora_lab.train.cache import image_tensor

    with torch.no_grad():  # it is the mirrored picture's latent
        expected = base.vae.encode(image_tensor(mirrored[0], square[sid], flip=True)[None]).latent_dist.parameters[0]
    torch.testing.assert_close(both[(sid, True)], expected, atol=1e-5, rtol=1e-4)


def _cli(*args, cwd):
    return run_cli([sys.executable, "-m", "lora_lab.train", *args], cwd=cwd)


def test_cli_trains_and_reports(cache_dir, tmp_path):
    out = tmp_path / "cli"
    proc = _cli("model=tiny", "data=demo", "train.epochs=1", "train.resolution=32",
                "data.repeats=1", f"output_dir={out}", f"cache_dir={cache_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "kohya steps: 12 images x 1 repeats x 1 epochs / batch 2 = 6 steps" in proc.stdout
    assert (out / "lora" / "last.safetensors").exists() and (out / "config.yaml").exists()
    assert list((out / "tb").glob("events.out.tfevents.*"))


def test_cli_bad_input_fails_early_and_leaves_nothing(cache_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = _cli(f"output_dir={blocker}/run", f"cache_dir={cache_dir}", cwd=tmp_path)
    assert proc.returncode == 2 and f"error: output_dir: cannot write to {blocker}/run" in proc.stderr
    empty = tmp_path / "empty_data"
    empty.mkdir()
    out = tmp_path / "never"
    proc = _cli("data=folder", f"data.path={empty}", f"output_dir={out}", f"cache_dir={cache_dir}", cwd=tmp_path)
    assert proc.returncode == 2 and "has no '<repeats>_<token>' folder with images" in proc.stderr
    assert not out.exists()
    proc = _cli("train.optimizer=adamw9bit", cwd=tmp_path)
    assert proc.returncode == 2 and "error: train.optimizer: unknown value 'adamw9bit'" in proc.stderr


def test_training_without_caches_matches_training_with_them(base, cache_dir, demo_dir, tmp_path):
    _run(base, cache_dir, tmp_path / "cached", epochs=1)
    _run(base, cache_dir, tmp_path / "online", epochs=1, cache_latents=False, cache_text_embeddings=False)
    a = load_file(tmp_path / "cached" / "lora" / "last.safetensors")
    b = load_file(tmp_path / "online" / "lora" / "last.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3)


def test_checkpoint_name_and_hashes_as_kohya_and_a1111_compute_them(tmp_path):
    import hashlib

    from lora_lab.train.metadata import checkpoint_fields

    blob = bytes(range(256)) * 8192  # 2 MiB
    ckpt = tmp_path / "anything-v3.safetensors"
    ckpt.write_bytes(blob)
    fields = checkpoint_fields(str(ckpt))
    assert fields == {"ss_sd_model_name": "anything-v3.safetensors",
                      "ss_sd_model_hash": hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8],
                      "ss_new_sd_model_hash": hashlib.sha256(blob).hexdigest()}
    assert checkpoint_fields(str(tmp_path)) == {"ss_sd_model_name": tmp_path.name}  # a diffusers folder
    assert checkpoint_fields("runwayml/stable-diffusion-v1-5") == {"ss_sd_model_name": "runwayml/stable-diffusion-v1-5"}
