"""LoRA strength on every layer, hot swaps, samplers, infotext and grids."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lora_lab import lora_io
from lora_lab.config import TrainConfig
from lora_lab.errors import ConfigError, LoraLabError
from lora_lab.render import SAMPLERS, RenderSettings, draw_grid, infotext, make_scheduler


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
    tensors = lora_io.kohya_state_dict(pipe.unet, pipe.text_encoder)
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
    lora_io.load_into(pipe.unet, pipe.text_encoder, tensors)
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
        lora_io.load_into(pipe.unet, pipe.text_encoder, a)
        out_a = _unet_out(pipe)
        lora_io.load_into(pipe.unet, pipe.text_encoder, b)  # same layout: weights copied in place
        swapped = _unet_out(pipe)
    finally:
        lora_io.detach(pipe.unet, pipe.text_encoder)
    fresh = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)
    lora_io.load_into(fresh.unet, fresh.text_encoder, b)
    assert torch.equal(swapped, _unet_out(fresh))
    assert not torch.equal(out_a, swapped)
    # A file with another layout (no conv layers) replaces the adapter instead.
    c = _random_lora(pipe, 3, conv=False)
    lora_io.load_into(fresh.unet, fresh.text_encoder, c)
    assert not any("resnets.0.conv1.lora" in n for n, _ in fresh.unet.named_parameters())


def test_foreign_lora_is_refused(base):
    tensors = {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(32, 4)}
    with pytest.raises(LoraLabError, match="1 LoRA layers match no layer of this base model"):
        lora_io.load_into(base.unet, base.text_encoder, tensors, source="sdxl.safetensors")


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
    assert lines[2] == ("Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 363423421, Size: 512x512, "
                        'Model: sd15, Clip skip: 2, Lora hashes: "last-000004: abcdef012345"')


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
