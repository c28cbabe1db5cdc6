"""SDXL end to end on a tiny SDXL-shaped model: loading (folder, single file, the wrong
architecture refused), the kohya SDXL key names against the original checkpoint's layer names,
a round trip through diffusers' own loader, training with size conditioning, the metadata A1111
reads, and a sweep plus an evaluation of a kohya SDXL file from the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import make_config, run_cli
from lora_lab.config import ModelConfig, TrainConfig
from lora_lab.data.buckets import BucketSpec, place
from lora_lab.data.dataset import load_dataset
from lora_lab.errors import LoraLabError, ModelError, TrainingError
from lora_lab.lora import adapters as lora_io
from lora_lab.lora import kohya as kohya_io
from lora_lab.models.base import load_base
from lora_lab.train import cache
from lora_lab.train.loop import train

sys.path.insert(0, str(Path(__file__).parent))
from ldm_export import to_ldm, to_sgm_xl  # noqa: E402

CPU = torch.device("cpu")


def _xl_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"name": "tiny-sdxl", "builtin": None, "preset": "sdxl", "base_version": "sdxl_base_v1-0",
                          **kw})


@pytest.fixture(scope="module")
def xl_file(xl_base, tmp_path_factory) -> Path:
    """The tiny SDXL model as the single-file checkpoint A1111 and ComfyUI users have."""
    path = tmp_path_factory.mktemp("xl") / "tiny-sdxl.safetensors"
    save_file(to_sgm_xl(xl_base.pipe), str(path))
    return path


def test_tiny_model_has_sdxl_shape(xl_base, xl_dir):
    assert type(xl_base.pipe).__name__ == "StableDiffusionXLPipeline" and xl_base.is_sdxl
    assert [type(e).__name__ for e in xl_base.text_encoders] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
    assert xl_base.unet.config.addition_embed_type == "text_time"
    assert xl_base.tokenizers[1].pad_token == "!" and xl_base.tokenizers[0].pad_token == "<|endoftext|>"
    assert json.loads((xl_dir / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"


def test_single_file_loads_the_same_weights(xl_base, xl_file, xl_dir, tmp_path):
    loaded = load_base(_xl_cfg(pretrained=str(xl_file), config_dir=str(xl_dir)), tmp_path, CPU)
    assert loaded.is_sdxl
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(xl_base.pipe, name).state_dict(), getattr(loaded.pipe, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k].reshape(a[k].shape)) for k in a), name


def test_a_checkpoint_of_another_architecture_is_refused_by_name(base, xl_file, tmp_path):
    with pytest.raises(ModelError, match=r"is an SDXL checkpoint, but model=sd15 expects SD 1.x; use model=sdxl"):
        load_base(ModelConfig(name="sd15", pretrained=str(xl_file), builtin=None, preset="sd15"), tmp_path, CPU)
    sd1 = tmp_path / "sd1.safetensors"
    save_file(to_ldm(base.pipe), str(sd1))
    with pytest.raises(ModelError, match=r"is an SD 1.x checkpoint, but model=sdxl expects SDXL; use model=sd15"):
        load_base(_xl_cfg(name="sdxl", pretrained=str(sd1)), tmp_path, CPU)


def test_an_sdxl_folder_under_an_sd_model_is_refused(xl_dir, tiny_dir, tmp_path):
    with pytest.raises(ModelError, match=r"folder .* is an SDXL checkpoint, but model=tiny expects SD 1.x / 2.x; "
                                         r"use model=sdxl"):
        load_base(ModelConfig(name="tiny", pretrained=str(xl_dir), builtin=None), tmp_path, CPU)
    with pytest.raises(ModelError, match=r"holds a StableDiffusionPipeline, not an SDXL pipeline"):
        load_base(_xl_cfg(pretrained=str(tiny_dir), preset=None), tmp_path, CPU)


def test_sdxl_preset_ships_the_real_architecture(tmp_path):
    from diffusers import UNet2DConditionModel

    from lora_lab.models.builtin import preset_folder

    folder = preset_folder("sdxl", tmp_path)
    config = UNet2DConditionModel.load_config(folder / "unet")
    assert config["transformer_layers_per_block"] == [1, 2, 10] and config["cross_attention_dim"] == 2048
    assert config["projection_class_embeddings_input_dim"] == 2816  # 6 x 256 size ids + 1280 pooled
    assert (folder / "tokenizer_2" / "vocab.json").exists()
    assert json.loads((folder / "tokenizer_2" / "tokenizer_config.json").read_text())["pad_token"] == "!"


def _attach_random(pipe, cfg):
    encoders = (pipe.text_encoder, pipe.text_encoder_2)
    lora_io.attach(pipe.unet, encoders, cfg)
    g = torch.Generator().manual_seed(3)
    for module in (pipe.unet, *encoders):
        for name, p in module.named_parameters():
            if "lora_" in name:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return encoders


def test_file_keys_are_the_original_checkpoints_layer_names(xl_dir, xl_file):
    """A1111 finds an SDXL LoRA's UNet layer by replacing lora_unet with diffusion_model in the
    original checkpoint's module names; every trained layer must be there, shape for shape, and
    every attention layer of the checkpoint must have its LoRA."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(xl_dir)
    cfg = TrainConfig(network_dim=4, network_alpha=2.0, conv_dim=2, conv_alpha=1.0, text_encoder_lr=1e-4)
    encoders = _attach_random(pipe, cfg)
    tensors = kohya_io.kohya_state_dict(pipe.unet, encoders)
    with safe_open(str(xl_file), framework="pt") as fh:
        ckpt = {k: fh.get_slice(k).get_shape() for k in fh.keys()}
    modules = {k[len("model."):-len(".weight")].replace(".", "_"): shape for k, shape in ckpt.items()
               if k.startswith("model.diffusion_model.") and k.endswith(".weight")}
    te1 = {k[len("conditioner.embedders.0.transformer."):-len(".weight")].replace(".", "_"): shape
           for k, shape in ckpt.items() if k.startswith("conditioner.embedders.0.") and k.endswith(".weight")}
    names = {k[: -len(".lora_down.weight")] for k in tensors if k.endswith(".lora_down.weight")}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_output_blocks_2_2_conv" in names and "lora_unet_input_blocks_3_0_op" in names
    unet_names = {n for n in names if n.startswith("lora_unet_")}
    for name in unet_names:
        shape = modules[name.replace("lora_unet_", "diffusion_model_", 1)]
        assert tensors[f"{name}.lora_up.weight"].shape[0] == shape[0], name
        assert tensors[f"{name}.lora_down.weight"].shape[1] == shape[1], name
    attention = {m for m in modules if "_transformer_blocks_" in m and m.endswith(
        ("_to_q", "_to_k", "_to_v", "_to_out_0", "_ff_net_0_proj", "_ff_net_2"))}
    assert attention and attention <= {n.replace("lora_unet_", "diffusion_model_", 1) for n in unet_names}
    te1_names = {n for n in names if n.startswith("lora_te1_")}
    assert te1_names and all(n[len("lora_te1_"):] in te1 for n in te1_names)
    te2_names = {n for n in names if n.startswith("lora_te2_")}
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj" in te2_names
    assert all(n.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for n in names)
    assert {float(tensors[f"{n}.alpha"]) for n in names} == {2.0, 1.0}  # alpha as trained; conv alpha 1


def _unet_out(pipe):
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    hidden, pooled = cache.encode(["photo of sks woman"], (pipe.tokenizer, pipe.tokenizer_2),
                                  (pipe.text_encoder, pipe.text_encoder_2), 1)
    ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    with torch.no_grad():
        return pipe.unet(sample, torch.tensor([500]), hidden,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample


def test_diffusers_load_lora_weights_reproduces_the_trained_output(xl_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(xl_dir)
    cfg = TrainConfig(network_dim=4, network_alpha=1.0, conv_dim=2, conv_alpha=1.0, text_encoder_lr=1e-4)
    encoders = _attach_random(pipe, cfg)
    with torch.no_grad():
        expected = _unet_out(pipe)
    path = tmp_path / "xl.safetensors"
    kohya_io.save_kohya(path, kohya_io.kohya_state_dict(pipe.unet, encoders), {"ss_network_dim": "4"})
    lora_io.detach(pipe.unet, encoders)
    with torch.no_grad():
        base_out = _unet_out(pipe)
    assert (expected - base_out).abs().max() > 1e-3
    fresh = StableDiffusionXLPipeline.from_pretrained(xl_dir)
    fresh.load_lora_weights(str(path))
    with torch.no_grad():
        got = _unet_out(fresh)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # ... and our own loader (the evaluation's) puts it back the same way.
    kohya_io.load_into(pipe.unet, encoders, load_file(path))
    with torch.no_grad():
        torch.testing.assert_close(_unet_out(pipe), expected, atol=1e-5, rtol=1e-4)
    lora_io.unload(pipe.unet, encoders)


@pytest.fixture(scope="module")
def xl_trained(xl_base, cache_dir, tmp_path_factory):
    """A run on portrait and landscape photos, the first text encoder trained, the second not."""
    root = tmp_path_factory.mktemp("xl_data")
    folder = root / "data" / "1_sks"
    folder.mkdir(parents=True)
    for i, (w, h) in enumerate([(48, 96), (96, 48), (64, 64), (40, 80)]):
        Image.new("RGB", (w, h), (40 * i, 90, 200 - 40 * i)).save(folder / f"{i}.png")
    out = root / "run"
    cfg = make_config(cache_dir, out, epochs=1, batch_size=2, text_encoder_lr=1e-4, text_encoder_2_lr=0.0)
    cfg.model = ModelConfig(name="tiny-sdxl", builtin="tiny-sdxl", base_version="sdxl_base_v1-0")
    cfg.data.path = str(root / "data")
    seen = []
    hook = xl_base.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone()), with_kwargs=True)
    try:
        result = train(cfg, xl_base, load_dataset(cfg.data, cache_dir), out)
    finally:
        hook.remove()
    return result, seen


def test_training_conditions_on_each_images_size_crop_and_bucket(xl_trained):
    _, seen = xl_trained
    rows = {tuple(int(v) for v in row) for ids in seen for row in ids}
    # (original height, width, crop top, left, target height, width) at resolution 32, in buckets
    # of 8-px steps: a 1:2 portrait goes to the 24x40 bucket (scaled to 24x48, 4 px cut top and
    # bottom), a 2:1 landscape to 40x24, a square to 32x32.
    assert rows == {(96, 48, 4, 0, 40, 24), (48, 96, 0, 4, 24, 40), (64, 64, 0, 0, 32, 32), (80, 40, 4, 0, 40, 24)}
    assert place((48, 96), BucketSpec(32)).crop == (16, 0) and place((48, 96), BucketSpec(32)).resized == (32, 64)


def test_trained_file_has_sdxl_keys_and_metadata(xl_trained):
    result, _ = xl_trained
    path = result.lora_files[1]
    with safe_open(str(path), framework="pt") as fh:
        meta, keys = fh.metadata(), set(fh.keys())
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["ss_resolution"] == "(32, 32)"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in keys)
    assert not any(k.startswith(("lora_te2_", "lora_te_", "lora_unet_down_blocks")) for k in keys)  # te2 lr 0


def test_sd15_lora_on_sdxl_says_so(xl_base, base):
    cfg = TrainConfig(network_dim=2, network_alpha=1.0)
    lora_io.attach(base.unet, base.text_encoder, cfg)
    try:
        sd15 = kohya_io.kohya_state_dict(base.unet)
    finally:
        lora_io.detach(base.unet, base.text_encoder)
    with pytest.raises(LoraLabError, match="its layer names are SD 1.x / 2.x's; this base model is SDXL"):
        kohya_io.load_into(xl_base.unet, xl_base.text_encoders, sd15, source="sd15.safetensors")


def test_second_text_encoder_rate_needs_sdxl(base, cache_dir, tmp_path):
    cfg = make_config(cache_dir, tmp_path / "out", text_encoder_2_lr=1e-4)
    with pytest.raises(TrainingError, match="train.text_encoder_2_lr is for SDXL's second text encoder"):
        train(cfg, base, load_dataset(cfg.data, cache_dir), tmp_path / "out")


def test_vae_nan_is_named_with_the_way_out():
    from types import SimpleNamespace

    vae = SimpleNamespace(dtype=torch.float16)
    params = torch.zeros(2, 8, 4, 4)
    params[1, 0, 0, 0] = float("nan")
    with pytest.raises(TrainingError, match=r"the VAE \(torch.float16\) gave NaN for b.png; SDXL's VAE overflows "
                                            r"in fp16.*model.vae"):
        cache.check_latents(params, [Path("a.png"), Path("b.png")], vae)


def test_sdxl_sweep_and_evaluating_a_kohya_sdxl_file_from_the_command_line(xl_dir, cache_dir, tmp_path):
    """model=sdxl's path for a user, on the tiny SDXL model: a sweep, then lora_lab.evaluate on
    its file as one from another tool (a folder holding kohya SDXL files)."""
    proc = run_cli([sys.executable, "-m", "lora_lab.sweep", "+sweep=smoke", "model=tiny_sdxl",
                    f"sweep.root={tmp_path / 'sweeps'}", f"sweep.reports={tmp_path / 'reports'}",
                    f"cache_dir={cache_dir}", "sweep.grid={train.network_dim:[2]}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tiny-sdxl" in proc.stdout and "best: trial 0" in proc.stdout
    # what the sweep's trials train on, with its fixed settings (smoke: 1 repeat, 32 px), before the first
    assert "kohya steps: 12 images x 1 repeats x 1 epochs / batch 2 = 6 steps" in proc.stdout
    assert proc.stdout.index("dataset doctor: 12 images") < proc.stdout.index("trial 0 start")
    assert (tmp_path / "sweeps" / "smoke" / "doctor.json").exists()
    lora = tmp_path / "sweeps" / "smoke" / "trial_0" / "lora"
    elsewhere = tmp_path / "from_kohya"
    elsewhere.mkdir()
    for f in lora.glob("*.safetensors"):
        (elsewhere / f"my_xl_lora{f.name[f.name.index('.'):]}").write_bytes(f.read_bytes())
    proc = run_cli([sys.executable, "-m", "lora_lab.evaluate", f"lora_dir={elsewhere}", "model=tiny_sdxl",
                    "data=demo", "eval.steps=2", "eval.seeds=[1]", "eval.strengths=[0,1]", "eval.max_prompts=1",
                    f"eval.output_dir={tmp_path / 'ev'}", f"cache_dir={cache_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = sorted((tmp_path / "ev" / "cells").rglob("*.png"))
    assert cells
    info = Image.open(cells[-1]).text["parameters"]
    assert "Size: 64x64" in info and "Model: tiny-sdxl-v1" in info  # the model's own size by default
    assert (tmp_path / "ev" / "verdict.json").exists()


def test_a_diffusers_sdxl_file_with_both_text_encoders_applies(xl_base, tmp_path):
    """What diffusers' SDXL LoRA script writes (unet., text_encoder., text_encoder_2. keys) loads
    into the SDXL model as peft applied it: the UNet by its diffusers names, each encoder its own."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    from lora_lab.lora import formats as lora_formats

    parts = {"unet": (xl_base.unet, ["to_q", "to_v"]), "text_encoder": (xl_base.text_encoders[0], ["q_proj"]),
             "text_encoder_2": (xl_base.text_encoders[1], ["k_proj", "fc1"])}
    layers, expected, cfgs = {}, {}, {}
    x = {"unet": torch.randn(2, 3, 64), "text_encoder": torch.randn(2, 3, 32), "text_encoder_2": torch.randn(2, 3, 64)}
    probe = {"unet": "down_blocks.2.attentions.1.transformer_blocks.1.attn1.to_q",
             "text_encoder": "text_model.encoder.layers.1.self_attn.q_proj" if hasattr(xl_base.text_encoders[0], "text_model")
             else "encoder.layers.1.self_attn.q_proj",
             "text_encoder_2": "text_model.encoder.layers.2.mlp.fc1"}
    try:
        for part, (module, targets) in parts.items():
            cfg = cfgs[part] = LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)
            inject_adapter_in_model(cfg, module, adapter_name="default")
            layers[part] = get_peft_model_state_dict(module, adapter_name="default")
            layer = module.get_submodule(probe[part])
            with torch.no_grad():
                expected[part] = layer(x[part]) - layer.get_base_layer()(x[part])
    finally:
        for module, _ in parts.values():
            lora_io.remove_one(module)
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"], **{f"{part}_lora_adapter_metadata": cfgs[part].to_dict()
                                                                for part in parts})
    tensors, meta = kohya_io.read_kohya(tmp_path / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("text_encoder_2.") for k in tensors)
    kohya, fmt = lora_formats.to_kohya(tensors, meta, "xl.safetensors")
    assert fmt == "diffusers"
    kohya_io.load_into(xl_base.unet, xl_base.text_encoders, kohya)
    try:
        for part, (module, _) in parts.items():
            layer = module.get_submodule(probe[part])
            with torch.no_grad():
                got = layer(x[part]) - layer.get_base_layer()(x[part])
            assert expected[part].abs().max() > 1e-3, part
            torch.testing.assert_close(got, expected[part], atol=1e-5, rtol=1e-4)
    finally:
        lora_io.unload(xl_base.unet, xl_base.text_encoders)


def test_model_vae_swaps_in_another_vae_and_refuses_pickles(xl_base, cache_dir, tmp_path):
    import copy

    vae = copy.deepcopy(xl_base.vae)
    vae.register_to_config(force_upcast=False)  # what an fp16-safe SDXL VAE's config says
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.5)
    vae.save_pretrained(tmp_path / "fp16-fix")
    cfg = ModelConfig(name="tiny-sdxl", builtin="tiny-sdxl", base_version="sdxl_base_v1-0", vae=str(tmp_path / "fp16-fix"))
    loaded = load_base(cfg, cache_dir, CPU)
    assert loaded.vae.config.force_upcast is False
    assert torch.equal(loaded.vae.decoder.conv_out.bias, vae.decoder.conv_out.bias)
    assert not torch.equal(loaded.vae.decoder.conv_out.bias, xl_base.vae.decoder.conv_out.bias)
    for value, message in ((str(tmp_path / "vae.pt"), "model.vae: .*vae.pt is a pickle file"),
                           (str(tmp_path / "none.safetensors"), "model.vae: .*none.safetensors does not exist")):
        with pytest.raises(ModelError, match=message):
            load_base(ModelConfig(name="tiny-sdxl", builtin="tiny-sdxl", base_version="sdxl_base_v1-0", vae=value),
                      cache_dir, CPU)


def test_fp32_decode_gives_the_pipelines_own_image(xl_base):
    """On a GPU, SDXL renders with the UNet in mixed precision and the VAE decoding in fp32
    outside it (render.decode_fp32); on a CPU both are fp32, so the pixels must agree."""
    import numpy as np

    from lora_lab.evaluate.render import decode_fp32

    args = dict(prompt=["photo of sks woman"], num_inference_steps=2, height=32, width=32, guidance_scale=5.0)
    with torch.no_grad():
        latents = xl_base.pipe(**args, generator=torch.Generator().manual_seed(5), output_type="latent").images
        direct = xl_base.pipe(**args, generator=torch.Generator().manual_seed(5), output_type="np").images[0]
    image = np.asarray(decode_fp32(xl_base.pipe, latents)[0], dtype=np.float32) / 255
    assert np.abs(image - direct).max() <= 1 / 255 + 1e-6
    with pytest.raises(LoraLabError, match="the VAE decoded NaN"):
        decode_fp32(xl_base.pipe, torch.full_like(latents, float("nan")))


def test_inspect_an_sdxl_file_against_both_architectures(xl_trained, xl_base, base):
    from lora_lab.lora.inspect import inspect

    path = xl_trained[0].lora_files[1]
    on_xl = inspect(path, xl_base)
    assert on_xl["base_model_version"] == "sdxl_base_v1-0" and on_xl["unmatched"] == []
    assert on_xl["tools"]["A1111"]["ignores"] == 0
    on_sd15 = inspect(path, base)
    assert "made for sdxl_base_v1-0, but the base model is sd_v1" in on_sd15["warnings"]
    assert on_sd15["unmatched"]


def test_text_cache_keeps_both_encoders_and_the_pooled_embedding(xl_base, tmp_path):
    captions = ["photo of sks woman", "sks woman, red hair"]
    fp = "test-encoders"
    first = cache.cache_text(captions, xl_base.tokenizers, xl_base.text_encoders, 1, fp, tmp_path)
    again = cache.cache_text(captions, xl_base.tokenizers, xl_base.text_encoders, 1, fp, tmp_path)  # from disk
    hidden, pooled = cache.encode(captions, xl_base.tokenizers, xl_base.text_encoders, 1)
    for i, c in enumerate(captions):
        assert first[c][0].shape == (77, 32 + 64) and first[c][1].shape == (32,)  # both encoders; pooled
        torch.testing.assert_close(again[c][0], hidden[i].detach())
        torch.testing.assert_close(again[c][1], pooled[i].detach())
    assert len(list(tmp_path.rglob("*.safetensors"))) == 2


def test_several_sdxl_files_share_a_batch_in_one_pass_and_each_image_matches_its_own_render(xl_base, monkeypatch):
    """Two SDXL LoRA files (UNet attention and conv layers, both text encoders) and the base
    model in one pipeline call: each image equals the image rendered alone with peft's own
    forward, and no layer splits the batch into one sub-batch per file."""
    import numpy as np
    from peft.tuners.lora import LoraLayer

    from lora_lab.lora.strengths import SampleStrengths

    pipe = xl_base.pipe
    pipe.set_progress_bar_config(disable=True)
    files = []
    for seed, conv in ((11, 2), (12, 0)):
        cfg = TrainConfig(network_dim=4, network_alpha=2.0, conv_dim=conv, conv_alpha=1.0, text_encoder_lr=1e-4,
                          text_encoder_2_lr=1e-4)
        encoders = _attach_random(pipe, cfg)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in (pipe.unet, *encoders):
                for name, p in module.named_parameters():
                    if "lora_" in name:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        files.append(kohya_io.kohya_state_dict(pipe.unet, encoders))
        lora_io.detach(pipe.unet, encoders)
    assert any(k.startswith("lora_te2_") for k in files[0])
    assert any(v.dim() == 4 and v.shape[-1] == 3 for k, v in files[0].items() if k.endswith(".lora_down.weight"))

    def images(n, seeds):
        with torch.no_grad():
            out = pipe(prompt=["photo of sks woman"] * n, num_inference_steps=2, height=32, width=32,
                       guidance_scale=5.0, generator=[torch.Generator().manual_seed(s) for s in seeds],
                       output_type="np").images
        return [np.asarray(x, dtype=np.float32) for x in out]

    plan, seeds = [(0, 0.0), (0, 0.7), (1, 1.0), (0, 1.0)], [31, 32, 33, 34]
    encoders = xl_base.text_encoders
    names = [lora_io.eval_adapter(0), lora_io.eval_adapter(1)]
    try:
        alone = []
        for (f, s), seed in zip(plan, seeds):
            kohya_io.load_into(pipe.unet, encoders, files[f])
            lora_io.set_strength(pipe.unet, encoders, s)
            alone.append(images(1, [seed])[0])
        lora_io.unload_all(pipe.unet, encoders)
        for name, tensors in zip(names, files):
            kohya_io.load_into(pipe.unet, encoders, tensors, adapter=name)

        def refuse(*args, **kwargs):
            raise AssertionError("a LoRA layer split the batch into one sub-batch per file")

        for cls in {type(m) for m in pipe.unet.modules() if isinstance(m, LoraLayer)}:
            monkeypatch.setattr(cls, "_mixed_batch_forward", refuse)
        with SampleStrengths(pipe.unet, encoders, names) as per_sample:
            per_sample.set([s for _, s in plan], [names[f] for f, _ in plan])
            batched = images(4, seeds)
    finally:
        lora_io.unload_all(pipe.unet, encoders)
    for i in range(4):
        np.testing.assert_allclose(batched[i], alone[i], atol=1e-4, rtol=0)
    assert np.abs(batched[2] - batched[3]).max() > 1e-2  # the second file is not the first
