"""LoHa, LoKr and DoRA trained through LyCORIS: files in LyCORIS' layout (names built here from
the model's own module paths, not by the writer), read back through lora_lab's evaluate path
with the in-memory model's images, batched strengths, and the settings refused before training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from lora_lab.config import TrainConfig
from lora_lab.errors import ConfigError, TrainingError
from lora_lab.evaluate.infotext import RenderSettings, make_scheduler
from lora_lab.lora import adapters as lora_io
from lora_lab.lora import kohya as kohya_io

_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
_TEXT = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _fresh_pipe(tiny_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _cfg(kind, **extra):
    return TrainConfig(network_type=kind, network_dim=4, network_alpha=2.0, conv_dim=2, conv_alpha=1.0,
                       text_encoder_lr=1e-4, **extra)


def _randomise(groups, seed):
    """Every trainable tensor moved off its initial value (LyCORIS starts with a zero change)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for params in groups:
            for p in params:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _expected_layers(pipe):
    """kohya's names for the trained layers, from the model's module paths: UNet attention
    layers inside ``attentions`` (Linear, or 1x1 conv for proj_in / proj_out in SD 1.x), every conv and Linear layer of the ResNet and resampling
    blocks (conv_dim > 0), CLIP's attention and MLP layers."""
    out = {}
    for name, m in pipe.unet.named_modules():
        if "attentions" in name and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(_ATTENTION):
            out["lora_unet_" + name.replace(".", "_")] = m
        elif ("resnets" in name or "samplers" in name) and isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            out["lora_unet_" + name.replace(".", "_")] = m  # kohya's LoCon: ResNet and resampling blocks
    for name, m in pipe.text_encoder.named_modules():
        if isinstance(m, torch.nn.Linear) and "layers" in name and name.endswith(_TEXT):
            path = name if name.startswith("text_model.") else "text_model." + name
            out["lora_te_" + path.replace(".", "_")] = m
    return out


def _sizes(m):
    if isinstance(m, torch.nn.Linear):
        return m.out_features, m.in_features, ()
    return m.out_channels, m.in_channels, tuple(m.kernel_size)


def _split(dim, factor):
    return tuple(sorted((factor, dim // factor)))


def _expected_shapes(kind, m, rank, factor=4):
    out, inp, k = _sizes(m)
    flat_in = inp * int(np.prod(k)) if k else inp
    if kind == "loha":
        return {"hada_w1_a": (out, rank), "hada_w1_b": (rank, flat_in),
                "hada_w2_a": (out, rank), "hada_w2_b": (rank, flat_in)}
    if kind == "dora":
        return {"lora_down.weight": (rank, inp, *k), "lora_up.weight": (out, rank, *((1, 1) if k else ())),
                "dora_scale": (1, inp, *((1, 1) if k else ()))}
    (a, b), (c, d) = _split(out, factor), _split(inp, factor)
    shapes = {"lokr_w1": (a, c)}
    if rank < max(b, d) / 2:  # LyCORIS keeps the second factor whole unless the rank is below half of it
        shapes.update({"lokr_w2_a": (b, rank), "lokr_w2_b": (rank, d * int(np.prod(k)) if k else d)})
    else:
        shapes["lokr_w2"] = (b, d, *k)
    return shapes


@pytest.mark.parametrize("kind", ["loha", "lokr", "dora"])
def test_files_have_lycoris_layout_and_metadata(tiny_dir, tmp_path, kind):
    pipe = _fresh_pipe(tiny_dir)
    cfg = _cfg(kind, factor=4) if kind == "lokr" else _cfg(kind)
    groups = lora_io.attach(pipe.unet, pipe.text_encoder, cfg)
    assert len(groups) == 2 and groups[0] and groups[1]
    tensors = kohya_io.kohya_state_dict(pipe.unet, pipe.text_encoder)
    lora_io.detach(pipe.unet, pipe.text_encoder)
    layers = _expected_layers(pipe)
    found = {}
    for key, value in tensors.items():
        name, _, field = key.partition(".")
        found.setdefault(name, {})[field] = value
    assert set(found) == set(layers)
    for name, fields in found.items():
        rank = 2 if isinstance(layers[name], torch.nn.Conv2d) and _sizes(layers[name])[2] != (1, 1) else 4
        alpha = 1.0 if rank == 2 else 2.0
        shapes = _expected_shapes(kind, layers[name], rank)
        assert {f: tuple(v.shape) for f, v in fields.items() if f != "alpha"} == shapes, name
        assert fields["alpha"].dim() == 0
        if kind == "lokr" and "lokr_w2" in fields:
            assert float(fields["alpha"]) == rank  # no factored matrix: LyCORIS stores alpha = rank, scale 1
        else:
            assert float(fields["alpha"]) == alpha, name


@pytest.mark.parametrize("kind", ["loha", "lokr", "dora", "locon"])
def test_trained_file_renders_like_the_in_memory_network(tiny_dir, tmp_path, kind):
    """The file read back through evaluate's own reader and render() (strength 1) gives the
    images the in-memory network gives; tolerance: PNG rounding, 1/255 plus 1e-4."""
    from lora_lab.data.suites import Prompt
    from lora_lab.evaluate.render import render
    from lora_lab.evaluate.run import read_files
    from lora_lab.train.metadata import network_args

    pipe = _fresh_pipe(tiny_dir)
    pipe.scheduler = make_scheduler("Euler a", dict(pipe.scheduler.config))
    cfg = _cfg(kind, factor=4) if kind == "lokr" else _cfg(kind)
    groups = lora_io.attach(pipe.unet, pipe.text_encoder, cfg)
    _randomise(groups, 3)
    seeds = [5, 6]

    def images():
        return pipe(prompt=["photo of sks woman"] * 2, negative_prompt=["blurry"] * 2, num_inference_steps=3,
                    guidance_scale=7.0, height=32, width=32, output_type="np",
                    generator=[torch.Generator().manual_seed(s) for s in seeds]).images

    with torch.no_grad():
        trained = images()
    meta = kohya_io.kohya_metadata(ss_network_module="lycoris.kohya" if kind != "locon" else "networks.lora",
                                   ss_network_dim=4)
    if kind != "locon":
        meta["ss_network_args"] = json.dumps(network_args(cfg))
    lora_dir = tmp_path / "lora"
    kohya_io.save_kohya(lora_dir / "last.safetensors", kohya_io.kohya_state_dict(pipe.unet, pipe.text_encoder), meta)
    lora_io.detach(pipe.unet, pipe.text_encoder)
    with torch.no_grad():
        plain = images()
    assert np.abs(trained - plain).max() > 2e-2  # the network changes the images

    files = read_files(lora_dir, pipe.unet, (pipe.text_encoder,))
    prompts = [Prompt("likeness", "photo of sks woman", None, 0)]
    settings = RenderSettings("Euler a", 3, 7.0, 32, seeds, "blurry", "tiny", batch_size=16)
    render(pipe, files, [0.0, 1.0], prompts, settings, tmp_path / "out", progress=False)
    for i, seed in enumerate(seeds):
        got = np.asarray(Image.open(tmp_path / "out" / "cells" / "last" / "s1" / f"p00_seed{seed}.png"), np.float32)
        assert np.abs(got / 255 - trained[i]).max() <= 1 / 255 + 1e-4, (kind, seed)


def test_full_rank_files_of_several_epochs_render_in_one_call_each_as_alone(tiny_dir, tmp_path):
    """LoHa and LoKr epochs side by side in one pipeline call: each image equals its file
    rendered alone (1/255)."""
    from lora_lab.data.suites import Prompt
    from lora_lab.evaluate.render import render
    from lora_lab.evaluate.run import read_files

    pipe = _fresh_pipe(tiny_dir)
    pipe.scheduler = make_scheduler("Euler a", dict(pipe.scheduler.config))
    lora_dir = tmp_path / "lora"
    for epoch, (kind, seed) in enumerate((("loha", 1), ("lokr", 2), ("dora", 3)), start=1):
        groups = lora_io.attach(pipe.unet, pipe.text_encoder, _cfg(kind))
        _randomise(groups, seed)
        kohya_io.save_kohya(lora_dir / f"a-{epoch:06d}.safetensors",
                            kohya_io.kohya_state_dict(pipe.unet, pipe.text_encoder),
                            kohya_io.kohya_metadata(ss_epoch=epoch))
        lora_io.detach(pipe.unet, pipe.text_encoder)
    files = read_files(lora_dir, pipe.unet, (pipe.text_encoder,))
    prompts = [Prompt("likeness", "photo of sks woman", None, 0)]
    calls = []
    original = pipe.__class__.__call__

    def counting(self, *args, **kwargs):
        calls.append(len(kwargs["prompt"]))
        return original(self, *args, **kwargs)

    settings = RenderSettings("Euler a", 3, 7.0, 32, [5], "blurry", "tiny", batch_size=16)
    pipe.__class__.__call__ = counting
    try:
        render(pipe, files, [0.0, 0.5, 1.0], prompts, settings, tmp_path / "together", progress=False)
    finally:
        pipe.__class__.__call__ = original
    assert calls == [7]  # 3 files x 2 strengths + the base image, one call
    for epoch in (1, 2, 3):
        render(pipe, [files[epoch - 1]], [0.5, 1.0], prompts, settings, tmp_path / f"alone{epoch}", progress=False)
        for s in ("0.5", "1"):
            rel = f"cells/a-{epoch:06d}/s{s}/p00_seed5.png"
            a, b = (np.asarray(Image.open(tmp_path / d / rel), np.float32) for d in ("together", f"alone{epoch}"))
            assert np.abs(a - b).max() <= 1.0, (epoch, s)


def test_settings_that_cannot_train_are_refused_in_one_sentence(tiny_dir, base, tmp_path):
    with pytest.raises(ConfigError, match=r"train.network_type: unknown value 'lyco'; allowed: lora, locon, loha, lokr, dora"):
        TrainConfig(network_type="lyco")
    with pytest.raises(ConfigError, match=r"train.factor: is LoKr's setting"):
        TrainConfig(network_type="loha", factor=4)
    with pytest.raises(ConfigError, match=r"train.factor: must be -1"):
        TrainConfig(network_type="lokr", factor=0)
    pipe = _fresh_pipe(tiny_dir)
    with pytest.raises(TrainingError, match=r"train.factor=3 does not divide UNet layer .* allowed: -1 .* \(here: -1, 2, 4"):
        lora_io.attach(pipe.unet, pipe.text_encoder, _cfg("lokr", factor=3))
    # refused before anything was wrapped: no network, every layer runs its own forward
    from lora_lab.lora import lycoris_net

    assert lycoris_net.networks_of(pipe.unet) is None and lycoris_net.networks_of(pipe.text_encoder) is None
    assert not any("forward" in m.__dict__ for m in pipe.unet.modules())
    locon = TrainConfig(network_type="locon", network_dim=4, network_alpha=2.0)
    assert (locon.conv_dim, locon.conv_alpha) == (4, 2.0)


def test_a_lokr_factor_is_refused_by_train_before_any_step(base, cache_dir, demo_dir, tmp_path):
    from conftest import make_config

    from lora_lab.data.dataset import load_dataset
    from lora_lab.train.loop import train

    config = make_config(cache_dir, tmp_path / "run", network_type="lokr", factor=3, epochs=1)
    dataset = load_dataset(config.data, cache_dir, config.explicit)
    (tmp_path / "run").mkdir()
    with pytest.raises(TrainingError, match="train.factor=3"):
        train(config, base, dataset, tmp_path / "run")
    assert not (tmp_path / "run" / "lora").exists()


def test_training_a_loha_saves_lycoris_files_with_kohya_metadata(base, cache_dir, demo_dir, tmp_path):
    from conftest import make_config

    from lora_lab.data.dataset import load_dataset
    from lora_lab.train.loop import train

    config = make_config(cache_dir, tmp_path / "run", network_type="loha", network_dim=4, network_alpha=2.0,
                         conv_dim=2, epochs=2, learning_rate=1e-2)
    dataset = load_dataset(config.data, cache_dir, config.explicit)
    (tmp_path / "run").mkdir()
    result = train(config, base, dataset, tmp_path / "run")
    path = result.lora_files[2]
    tensors = load_file(path)
    assert any(k.endswith(".hada_w1_a") for k in tensors) and not any("lora_down" in k for k in tensors)
    assert any(float(v.abs().max()) > 0 for k, v in tensors.items() if k.endswith(".hada_w2_b"))
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]) == {"algo": "loha", "conv_dim": "2", "conv_alpha": "1"}
    # the model is the base model again
    assert not any(hasattr(m, "_lycoris_wrappers") and m._lycoris_wrappers for m in base.unet.modules())


def test_a_lycoris_training_network_renders_nothing_while_epoch_files_render(tiny_dir, tmp_path):
    """The sweep's per-epoch check renders files while a LyCORIS network trains on the same
    layers: the images are the files' alone, and the network is wrapped again afterwards."""
    from lora_lab.data.suites import Prompt
    from lora_lab.evaluate.render import render
    from lora_lab.evaluate.run import read_files

    pipe = _fresh_pipe(tiny_dir)
    pipe.scheduler = make_scheduler("Euler a", dict(pipe.scheduler.config))
    lora_dir = tmp_path / "lora"
    _randomise(lora_io.attach(pipe.unet, pipe.text_encoder, _cfg("loha")), 8)
    kohya_io.save_kohya(lora_dir / "a.safetensors", kohya_io.kohya_state_dict(pipe.unet, pipe.text_encoder),
                        kohya_io.kohya_metadata())
    lora_io.detach(pipe.unet, pipe.text_encoder)
    files = read_files(lora_dir, pipe.unet, (pipe.text_encoder,))
    prompts = [Prompt("likeness", "photo of sks woman", None, 0)]
    settings = RenderSettings("Euler a", 3, 7.0, 32, [5], "blurry", "tiny", batch_size=16)
    render(pipe, files, [0.0, 1.0], prompts, settings, tmp_path / "alone", progress=False)
    training = lora_io.attach(pipe.unet, pipe.text_encoder, _cfg("dora"))
    _randomise(training, 9)
    layer = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    x = torch.randn(1, 4, 32)
    with torch.no_grad():
        before = layer(x)
    try:
        render(pipe, files, [0.0, 1.0], prompts, settings, tmp_path / "beside", progress=False)
        with torch.no_grad():
            assert torch.equal(layer(x), before)  # the training network is back in place
    finally:
        lora_io.detach(pipe.unet, pipe.text_encoder)
    for rel in ("cells/a/s1/p00_seed5.png", "cells/base/p00_seed5.png"):
        a, b = (np.asarray(Image.open(tmp_path / d / rel), np.float32) for d in ("alone", "beside"))
        assert np.abs(a - b).max() <= 1.0, rel


def test_inspect_names_the_network_type_and_its_settings(tiny_dir, tmp_path):
    from lora_lab.lora.inspect import inspect, render
    from lora_lab.train.metadata import network_args

    pipe = _fresh_pipe(tiny_dir)
    cfg = _cfg("lokr", factor=4)
    lora_io.attach(pipe.unet, pipe.text_encoder, cfg)
    meta = kohya_io.kohya_metadata(ss_network_module="lycoris.kohya", ss_network_dim=4, ss_network_alpha=2.0)
    meta["ss_network_args"] = json.dumps(network_args(cfg))
    kohya_io.save_kohya(tmp_path / "k.safetensors", kohya_io.kohya_state_dict(pipe.unet, pipe.text_encoder), meta)
    lora_io.detach(pipe.unet, pipe.text_encoder)
    info = inspect(tmp_path / "k.safetensors")
    assert info["network"] == {"type": "lokr", "trained_with": "lycoris.kohya",
                               "settings": {"algo": "lokr", "conv_dim": "2", "conv_alpha": "1", "factor": "4",
                                            "dim": "4", "alpha": "2.0"}}
    assert "network: lokr, trained with lycoris.kohya; algo lokr, conv_dim 2, conv_alpha 1, factor 4" in render(info)
    lora_io.attach(pipe.unet, pipe.text_encoder, _cfg("lora"))  # conv_dim 2: kohya's LoCon
    kohya_io.save_kohya(tmp_path / "c.safetensors", kohya_io.kohya_state_dict(pipe.unet, pipe.text_encoder),
                        kohya_io.kohya_metadata(ss_network_module="networks.lora"))
    lora_io.detach(pipe.unet, pipe.text_encoder)
    assert inspect(tmp_path / "c.safetensors")["network"]["type"] == "locon"


def test_a_sweep_over_network_types_puts_type_and_size_on_the_leaderboard(tmp_path, cache_dir, demo_dir, caplog):
    import logging

    from lora_lab.cli import compose
    from lora_lab.sweep import run as sweep

    cfg = compose(["+sweep=smoke", f"sweep.root={tmp_path}", f"sweep.reports={tmp_path / 'reports'}",
                   f"cache_dir={cache_dir}", "sweep.grid={train.network_type:[loha,dora]}"])
    with caplog.at_level(logging.INFO, logger="lora_lab.sweep"):
        table = sweep.run(cfg)
    assert set(table.state) == {"complete"}
    assert list(table.columns[:4]) == ["trial", "state", "train.network_type", "network"]
    assert set(table.network) == {"loha", "dora"} and (table.network == table["train.network_type"]).all()
    counts = dict(zip(table.network, table.trainable_params))
    assert counts["loha"] > 0 and counts["dora"] > 0 and counts["loha"] != counts["dora"]
    t = cfg.train
    for row in table.itertuples():
        tdir = tmp_path / "smoke" / f"trial_{row.trial}"
        info = json.loads((tdir / "trial.json").read_text())
        lora_file = tdir / "lora" / f"smoke_trial_{row.trial}.safetensors"
        assert info["network"]["trainable_params"] == counts[row.network]
        assert info["network"]["file_bytes"] == lora_file.stat().st_size
        assert info["network"]["steps_per_s"] > 0
        assert any(k.endswith(".hada_w1_a" if row.network == "loha" else ".dora_scale") for k in load_file(lora_file))
        assert (f"trial {row.trial}: {row.network} dim {t.network_dim} alpha {t.network_alpha:g}: "
                f"{counts[row.network]:,} trainable parameters") in caplog.text
    page = (tmp_path / "reports" / "smoke" / "index.html").read_text(encoding="utf-8")
    assert "trainable_params" in page and str(counts["loha"]) in page


def test_bench_network_means_per_type_over_subjects():
    from lora_lab.bench.network import by_type, text

    def row(subject, kind, fidelity, speed):
        return {"subject": subject, "type": kind, "trainable_params": 100, "file_mb": 0.5, "steps_per_s": speed,
                "fidelity": fidelity, "flexibility": 1.0, "fidelity_top": fidelity, "flexibility_top": 0.5,
                "top_strength": 1.5, "diversity": 0.1, "true_good_cells": 6, "cells": 12, "pick_true_share": 0.9}

    rows = [row("a", "lokr", 0.5, 2.0), row("b", "lokr", 1.0, 4.0), row("a", "lora", 0.25, 1.0)]
    types = by_type(rows)
    assert list(types) == ["lora", "lokr"]  # the types' own order, not the rows'
    assert types["lokr"]["fidelity"] == 0.75 and types["lokr"]["steps_per_s"] == 3.0 and types["lokr"]["subjects"] == 2
    out = text({"subjects": ["a", "b"], "types": types})
    assert "lokr          100     0.50     3.00       75%         100%        75% / 50%" in out
