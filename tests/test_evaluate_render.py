"""LoRA strength on every layer, hot swaps, samplers, infotext and grids."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from lora_lab.config import TrainConfig
from lora_lab.errors import ConfigError, LoraLabError
from lora_lab.evaluate.grids import draw_grid
from lora_lab.evaluate.infotext import SAMPLERS, RenderSettings, infotext, make_scheduler
from lora_lab.lora import adapters as lora_io
from lora_lab.lora import kohya as kohya_io
from lora_lab.lora.strengths import SampleStrengths


def _random_lora(pipe, seed, conv=True):
    cfg = TrainConfig(network_dim=4, network_alpha=2.0, conv_dim=2 if conv else 0, conv_alpha=1.0,
                      text_encoder_lr=1e-4)
    lora_io.attach(pipe.unet, pipe.text_encoder, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (pipe.unet, pipe.text_encoder):
            for name, p in module.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    tensors = kohya_io.kohya_state_dict(pipe.unet, pipe.text_encoder)
    lora_io.detach(pipe.unet, pipe.text_encoder)
    return tensors


def _unet_out(pipe):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    h = torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([300]), h).sample


def _layer_out(module, x):
    with torch.no_grad():
        return module(x)


def test_strength_is_linear_on_attention_and_conv_layers_and_zero_is_base(base):
    pipe = base.pipe
    tensors = _random_lora(pipe, 1)
    base_out = _unet_out(pipe)
    kohya_io.load_into(pipe.unet, pipe.text_encoder, tensors)
    try:
        for name, x in (("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", torch.randn(2, 5, 32)),
                        ("down_blocks.0.resnets.0.conv1", torch.randn(1, 32, 8, 8))):
            layer = pipe.unet.get_submodule(name)
            outs = {}
            for s in (0.0, 1.0, 0.35):
                lora_io.set_strength(pipe.unet, pipe.text_encoder, s)
                outs[s] = _layer_out(layer, x)
            base_layer = _layer_out(layer.get_base_layer(), x)
            assert torch.equal(outs[0.0], base_layer)
            delta = outs[1.0] - base_layer
            assert delta.abs().max() > 1e-3
            torch.testing.assert_close(outs[0.35], base_layer + 0.35 * delta, atol=1e-5, rtol=1e-5)
        lora_io.set_strength(pipe.unet, pipe.text_encoder, 0.0)
        assert torch.equal(_unet_out(pipe), base_out)
    finally:
        lora_io.detach(pipe.unet, pipe.text_encoder)
    assert torch.equal(_unet_out(pipe), base_out)


def test_hot_swap_equals_a_fresh_load(base, tiny_dir):
    from diffusers import StableDiffusionPipeline

    pipe = base.pipe
    a, b = _random_lora(pipe, 1), _random_lora(pipe, 2)
    try:
        kohya_io.load_into(pipe.unet, pipe.text_encoder, a)
        out_a = _unet_out(pipe)
        kohya_io.load_into(pipe.unet, pipe.text_encoder, b)  # same layout: weights copied in place
        swapped = _unet_out(pipe)
    finally:
        lora_io.detach(pipe.unet, pipe.text_encoder)
    fresh = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)
    kohya_io.load_into(fresh.unet, fresh.text_encoder, b)
    assert torch.equal(swapped, _unet_out(fresh))
    assert not torch.equal(out_a, swapped)
    # A file with another layout (no conv layers) replaces the adapter instead.
    c = _random_lora(pipe, 3, conv=False)
    kohya_io.load_into(fresh.unet, fresh.text_encoder, c)
    assert not any("resnets.0.conv1.lora" in n for n, _ in fresh.unet.named_parameters())


def test_foreign_lora_is_refused(base):
    tensors = {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(32, 4)}
    with pytest.raises(LoraLabError, match="1 LoRA layers match no layer of this base model"):
        kohya_io.load_into(base.unet, base.text_encoder, tensors, source="sdxl.safetensors")


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samplers_map_to_diffusers(base, name):
    sched = make_scheduler(name, dict(base.pipe.scheduler.config))
    cls_name, extra = SAMPLERS[name]
    assert sched.__class__.__name__ == cls_name
    for key, value in extra.items():
        assert sched.config[key] == value
    assert sched.config.beta_schedule == "scaled_linear"


def test_unknown_sampler():
    with pytest.raises(ConfigError, match="eval.sampler: unknown sampler 'Euler b'; allowed: Euler, Euler a"):
        make_scheduler("Euler b", {})


def test_infotext_is_a1111_parameters():
    s = RenderSettings("DPM++ 2M Karras", 30, 7.0, 512, [363423421], "blurry", "sd15", clip_skip=2)
    text = infotext("photo of anantn", s, 363423421, "last-000004", 0.7, "abcdef0123456789")
    lines = text.split("\n")
    assert lines[0] == "photo of anantn <lora:last-000004:0.7>"
    assert lines[1] == "Negative prompt: blurry"
    assert lines[2] == ("Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 363423421, "
                        'Size: 512x512, Model: sd15, Clip skip: 2, RNG: CPU, Lora hashes: "last-000004: abcdef012345"')
    s.model_hash, s.sampler = "0123456789", "Euler a"
    assert ("Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 363423421, Size: 512x512, "
            "Model hash: 0123456789, Model: sd15,") in infotext("p", s, 363423421, None, 0, None)


# How A1111 (modules/infotext_utils.py, v1.10) reads a PNG's parameters: the last line is the
# settings when it holds at least three "Key: value" pairs; a line starting "Negative prompt:"
# begins the negative prompt; a quoted value is JSON; a missing RNG means GPU noise and a
# missing Schedule type means Automatic.
_A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _a1111_parse(text: str) -> dict:
    *lines, last = text.strip().split("\n")
    if len(_A1111_PARAM.findall(last)) < 3:
        lines, last = lines + [last], ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _A1111_PARAM.findall(last):
        out[key] = json.loads(value) if value[:1] == '"' == value[-1:] else value
    out.setdefault("RNG", "GPU")
    out.setdefault("Schedule type", "Automatic")
    return out


def test_infotext_reads_back_as_a1111_reads_it():
    s = RenderSettings("Euler a", 20, 7.0, 64, [5], "", "tiny")
    parsed = _a1111_parse(infotext("photo of sks person, red hair", s, 5, "last-000002", 0.5, "0123456789abcdef"))
    assert parsed["Prompt"] == "photo of sks person, red hair <lora:last-000002:0.5>"
    assert parsed["Negative prompt"] == ""  # no empty "Negative prompt:" line, as A1111 writes none
    assert "Negative prompt" not in infotext("p", s, 5, None, 0, None)
    assert (parsed["Steps"], parsed["Sampler"], parsed["Schedule type"], parsed["CFG scale"], parsed["Seed"]) == (
        "20", "Euler a", "Automatic", "7", "5")
    assert parsed["RNG"] == "CPU"  # noise drawn on the CPU: a paste into A1111 draws the same noise
    assert parsed["Lora hashes"] == "last-000002: 0123456789ab"
    s.noise_device = "cuda"
    assert _a1111_parse(infotext("p", s, 5, None, 0, None))["RNG"] == "GPU"  # A1111's default, unwritten


def test_samplers_use_a1111_19s_automatic_schedule_and_say_it():
    """A1111 1.9+ gives DPM++ 2M, DPM++ SDE, DPM2 and DPM2 a Karras sigmas and DPM++ 2M SDE
    exponential ones when the schedule is Automatic; the others keep the model's own."""
    from lora_lab.evaluate.infotext import a1111_sampler

    expected = {"DPM++ 2M": "Karras", "DPM++ SDE": "Karras", "DPM2": "Karras", "DPM2 a": "Karras",
                "DPM++ 2M SDE": "Exponential", "DPM++ 2M Karras": "Karras", "DPM++ 2M SDE Karras": "Karras",
                "LMS Karras": "Karras", "Euler": None, "Euler a": None, "DDIM": None, "Heun": None, "LMS": None,
                "UniPC": None}
    for name, schedule in expected.items():
        sampler, got = a1111_sampler(name)
        assert got == schedule, name
        assert sampler == name.removesuffix(" Karras")
        extra = SAMPLERS[name][1]
        assert extra.get("use_karras_sigmas", False) == (schedule == "Karras"), name
        assert extra.get("use_exponential_sigmas", False) == (schedule == "Exponential"), name


def test_a1111_model_name_and_hash_of_the_checkpoint(tmp_path):
    import hashlib

    from lora_lab.models.base import checkpoint_identity

    ckpt = tmp_path / "counterfeit-v3.safetensors"
    ckpt.write_bytes(b"weights" * 1000)
    assert checkpoint_identity(str(ckpt)) == ("counterfeit-v3", hashlib.sha256(b"weights" * 1000).hexdigest()[:10])
    assert checkpoint_identity(str(tmp_path)) == (tmp_path.name, None)
    assert checkpoint_identity("runwayml/stable-diffusion-v1-5") == ("stable-diffusion-v1-5", None)


def test_grid_layout():
    import numpy as np

    colours = {(r, c): (200, 40 + 60 * c, 40 + 100 * r) for r in range(2) for c in range(3)}
    cells = [[Image.new("RGB", (20, 20), colours[(r, c)]) for c in range(3)] for r in range(2)]
    grid = np.asarray(draw_grid(cells, ["epoch 1", "epoch 2", "epoch 3"], ["strength 1", "strength 0.5"], title="t"))
    centres = {}
    for key, colour in colours.items():
        ys, xs = np.nonzero((grid == colour).all(axis=-1))
        assert len(ys) == 400, key  # each cell pasted whole, once
        centres[key] = (ys.mean(), xs.mean())
    assert centres[(0, 0)][1] < centres[(0, 1)][1] < centres[(0, 2)][1]  # X axis: epochs left to right
    assert centres[(0, 2)][0] < centres[(1, 2)][0]  # Y axis: strengths top to bottom
    assert min(y for y, _ in centres.values()) > 30  # labels above the cells


def _pipe_images(pipe, n_prompts, seeds, cfg_scale, **kwargs):
    return pipe(prompt=["photo of sks woman"] * n_prompts, negative_prompt=["blurry"] * n_prompts,
                num_inference_steps=3, guidance_scale=cfg_scale, height=32, width=32, output_type="np",
                generator=[torch.Generator().manual_seed(s) for s in seeds], **kwargs).images


@pytest.mark.parametrize("cfg_scale", [7.0, 1.0])  # with classifier-free guidance (batch doubled) and without
def test_batched_strengths_equal_one_at_a_time(base, cfg_scale):
    pipe = base.pipe
    pipe.set_progress_bar_config(disable=True)
    tensors = _random_lora(pipe, 4)
    strengths, seeds = [0.0, 0.5, 1.0, 1.5], [11, 12, 13, 14]
    base_images = _pipe_images(pipe, 4, seeds, cfg_scale)
    kohya_io.load_into(pipe.unet, pipe.text_encoder, tensors)
    try:
        single = []
        for s, seed in zip(strengths, seeds):
            lora_io.set_strength(pipe.unet, pipe.text_encoder, s)
            single.append(_pipe_images(pipe, 1, [seed], cfg_scale)[0])
        with SampleStrengths(pipe.unet, pipe.text_encoder) as per_sample:
            per_sample.set(strengths)
            batched = _pipe_images(pipe, 4, seeds, cfg_scale)
    finally:
        lora_io.unload(pipe.unet, pipe.text_encoder)
    for i in range(4):
        np.testing.assert_allclose(batched[i], single[i], atol=1e-4, rtol=0)
    np.testing.assert_allclose(batched[0], base_images[0], atol=1e-4, rtol=0)  # strength 0: the base model
    assert np.abs(batched[3] - batched[0]).max() > 1e-2  # the LoRA changes the picture
    assert np.abs(batched[3] - batched[2]).max() > 1e-3  # and 1.5 differs from 1


def test_sample_strengths_refuse_a_batch_they_do_not_describe(base):
    pipe = base.pipe
    kohya_io.load_into(pipe.unet, pipe.text_encoder, _random_lora(pipe, 5))
    try:
        with SampleStrengths(pipe.unet, pipe.text_encoder) as per_sample:
            per_sample.set([1.0, 0.5, 0.0])
            with pytest.raises(RuntimeError, match="LoRA strengths for 3 samples, but a layer saw a batch of 4"):
                pipe.text_encoder(torch.zeros(4, 77, dtype=torch.long))
        # Leaving the block removes the hooks: any batch size runs again.
        pipe.text_encoder(torch.zeros(4, 77, dtype=torch.long))
    finally:
        lora_io.unload(pipe.unet, pipe.text_encoder)


def test_auto_batch_size_from_free_memory():
    from lora_lab.evaluate.render import AUTO_MAX_BATCH, MEMORY_SHARE, auto_batch_size

    gib = 2**30
    assert auto_batch_size(None, 100 * gib) == 8  # unmeasured: a safe default
    assert auto_batch_size(gib, 10 * gib) == int(10 * MEMORY_SHARE)  # memory-bound
    assert auto_batch_size(gib, gib // 2) == 1  # never below one image
    assert auto_batch_size(2**20, 100 * gib) == AUTO_MAX_BATCH


def test_peak_memory_of_a_call_is_measured_on_cpu():
    from lora_lab.device import PeakMemory

    with PeakMemory(torch.device("cpu")) as peak:
        block = torch.ones(128 * 2**20 // 4)  # 128 MiB, touched
        del block
    # Resident memory the allocator already held may serve part of it: at least half shows.
    assert peak.bytes is not None and 64 * 2**20 < peak.bytes < 1024 * 2**20


def test_render_batches_every_strength_of_an_epoch(base, tmp_path):
    from lora_lab.data.suites import Prompt
    from lora_lab.evaluate.render import render

    pipe = base.pipe
    files = [(1, tmp_path / "a-000001.safetensors", _random_lora(pipe, 6), {}),
             (2, tmp_path / "a-000002.safetensors", _random_lora(pipe, 7), {})]
    prompts = [Prompt("likeness", "photo of sks woman", None, 0), Prompt("adaptability", "sks woman, red hair", None, 1)]
    settings = RenderSettings("Euler a", 2, 7.0, 32, [1, 2], "", "tiny", batch_size=None)
    calls = []
    original = pipe.__class__.__call__

    def counting(self, *args, **kwargs):
        calls.append(len(kwargs["prompt"]))
        return original(self, *args, **kwargs)

    plan, timing = {}, {}
    pipe.__class__.__call__ = counting
    try:
        cells = render(pipe, files, [0.0, 0.5, 1.0], prompts, settings, tmp_path, progress=False, timing=timing,
                       plan=plan)
    finally:
        pipe.__class__.__call__ = original
    size = timing["batch_size"]
    assert size == plan[("batch", 32, "cpu")] and 1 <= size <= 32
    # Epoch 1: 4 base + 8 LoRA images, the first call probing one image; epoch 2: 8 images.
    assert calls[0] == 1 and sum(calls) == 4 + 8 + 8
    assert len(calls) == 1 + -(-11 // size) + -(-8 // size)
    assert timing["images"] == 20 and len(cells) == 2 * 3 * 2 * 2
    text = Image.open(tmp_path / "cells" / "a-000002" / "s0.5" / "p01_seed2.png").text["parameters"]
    assert text.startswith("sks woman, red hair <lora:a-000002:0.5>") and "Seed: 2," in text
    assert "<lora:" not in Image.open(tmp_path / "cells" / "base" / "p00_seed1.png").text["parameters"]


@pytest.mark.parametrize("cfg_scale", [7.0, 1.0])
def test_several_files_share_a_batch_and_each_image_matches_its_own_render(base, cfg_scale):
    pipe = base.pipe
    pipe.set_progress_bar_config(disable=True)
    first, second = _random_lora(pipe, 8), _random_lora(pipe, 9, conv=False)  # different layouts too
    seeds = [21, 22, 23, 24]
    plan = [(first, 0.0), (first, 0.7), (second, 1.0), (first, 1.0)]
    base_images = _pipe_images(pipe, 1, seeds[:1], cfg_scale)
    single = []
    try:
        for (tensors, s), seed in zip(plan, seeds):
            kohya_io.load_into(pipe.unet, pipe.text_encoder, tensors)
            lora_io.set_strength(pipe.unet, pipe.text_encoder, s)
            single.append(_pipe_images(pipe, 1, [seed], cfg_scale)[0])
        names = [lora_io.eval_adapter(0), lora_io.eval_adapter(1)]
        kohya_io.load_into(pipe.unet, pipe.text_encoder, first, adapter=names[0])
        kohya_io.load_into(pipe.unet, pipe.text_encoder, second, adapter=names[1])
        with SampleStrengths(pipe.unet, pipe.text_encoder, names) as per_sample:
            per_sample.set([s for _, s in plan], [names[0], names[0], names[1], names[0]])
            batched = _pipe_images(pipe, 4, seeds, cfg_scale)
    finally:
        lora_io.unload_all(pipe.unet, pipe.text_encoder)
    assert not any(n.startswith(lora_io.EVAL_ADAPTER) for n in getattr(pipe.unet, "peft_config", {}) or {})
    for i in range(4):
        np.testing.assert_allclose(batched[i], single[i], atol=1e-4, rtol=0)
    np.testing.assert_allclose(batched[0], base_images[0], atol=1e-4, rtol=0)
    assert np.abs(batched[2] - batched[3]).max() > 1e-2  # the second file is not the first


def test_render_puts_several_epochs_in_one_call_when_the_batch_holds_them(base, tmp_path):
    from lora_lab.data.suites import Prompt
    from lora_lab.evaluate.render import render

    pipe = base.pipe
    files = [(e, tmp_path / f"a-00000{e}.safetensors", _random_lora(pipe, 10 + e), {}) for e in (1, 2, 3)]
    prompts = [Prompt("likeness", "photo of sks woman", None, 0)]
    settings = RenderSettings("Euler a", 2, 7.0, 32, [1, 2], "", "tiny", batch_size=10)
    calls = []
    original = pipe.__class__.__call__

    def counting(self, *args, **kwargs):
        calls.append(len(kwargs["prompt"]))
        return original(self, *args, **kwargs)

    pipe.__class__.__call__ = counting
    try:
        cells = render(pipe, files, [0.0, 0.5, 1.0], prompts, settings, tmp_path, progress=False)
    finally:
        pipe.__class__.__call__ = original
    # 4 images per epoch: a batch of 10 holds two epochs (plus the 2 base images), then one.
    assert calls == [10, 4]
    assert len(cells) == 3 * 3 * 2
    for e in (1, 2, 3):
        text = Image.open(tmp_path / "cells" / f"a-00000{e}" / "s1" / "p00_seed2.png").text["parameters"]
        assert f"<lora:a-00000{e}:1>" in text
    # Each epoch's image is its own file's: epochs differ pixel for pixel.
    px = [np.asarray(Image.open(tmp_path / "cells" / f"a-00000{e}" / "s1" / "p00_seed1.png")) for e in (1, 2, 3)]
    assert not np.array_equal(px[0], px[1]) and not np.array_equal(px[1], px[2])


def test_render_of_mixed_epochs_equals_each_image_alone_even_beside_a_training_adapter(base, tmp_path):
    """render() stacks the epoch files on the model's own layers (no peft adapter per file): each
    cell equals the image of its file alone at its strength through peft (PNG rounding: 1/255),
    a training adapter on the same layers renders nothing and is trainable again afterwards."""
    from lora_lab.data.suites import Prompt
    from lora_lab.evaluate.render import render

    pipe = base.pipe
    pipe.set_progress_bar_config(disable=True)
    first, second = _random_lora(pipe, 40), _random_lora(pipe, 41, conv=False)
    files = [(1, tmp_path / "a-000001.safetensors", first, {}), (2, tmp_path / "a-000002.safetensors", second, {})]
    prompts = [Prompt("likeness", "photo of sks woman", None, 0)]
    settings = RenderSettings("Euler a", 3, 7.0, 32, [5, 6], "blurry", "tiny", batch_size=16)
    pipe.scheduler = make_scheduler("Euler a", dict(pipe.scheduler.config))  # as render sets it
    alone = {}
    for (epoch, _, tensors, _), label in zip(files, ("a-000001", "a-000002")):
        kohya_io.load_into(pipe.unet, pipe.text_encoder, tensors)
        try:
            for s in (0.5, 1.0):
                lora_io.set_strength(pipe.unet, pipe.text_encoder, s)
                for seed in (5, 6):
                    alone[(label, s, seed)] = _pipe_images(pipe, 1, [seed], 7.0)[0]
        finally:
            lora_io.unload(pipe.unet, pipe.text_encoder)
    cfg = TrainConfig(network_dim=4, network_alpha=4.0, text_encoder_lr=1e-4)
    params = [p for group in lora_io.attach(pipe.unet, pipe.text_encoder, cfg) for p in group]  # mid-training
    try:
        with torch.no_grad():
            for p in params:
                p.copy_(torch.full_like(p, 0.05))
        render(pipe, files, [0.0, 0.5, 1.0], prompts, settings, tmp_path, progress=False)
        assert all(p.requires_grad for p in params)
        layer = next(m for m in pipe.unet.modules() if hasattr(m, "lora_A") and lora_io.ADAPTER in m.lora_A)
        assert layer.active_adapters == [lora_io.ADAPTER] and not layer.disable_adapters
    finally:
        lora_io.detach(pipe.unet, pipe.text_encoder)
    for (label, s, seed), expected in alone.items():
        got = np.asarray(Image.open(tmp_path / "cells" / label / f"s{s:g}" / f"p00_seed{seed}.png"), dtype=np.float32)
        assert np.abs(got / 255 - expected).max() <= 1 / 255 + 1e-4, (label, s, seed)
    a, b = (np.asarray(Image.open(tmp_path / "cells" / f"a-00000{e}" / "s1" / "p00_seed5.png")) for e in (1, 2))
    assert not np.array_equal(a, b)
