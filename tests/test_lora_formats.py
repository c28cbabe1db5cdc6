"""LoRA files from other tools: each format's weight change, applied at a strength, equals its
formula on a tiny model; diffusers' own files and checkpoint-N folders; DoRA refused."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lora_lab.errors import LoraLabError
from lora_lab.lora import adapters as lora_io
from lora_lab.lora import formats as lora_formats
from lora_lab.lora import kohya as kohya_io

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "down_blocks.0.resnets.0.conv1"
TEXT = "encoder.layers.0.self_attn.q_proj"
KOHYA = {ATTN: "lora_unet_" + ATTN.replace(".", "_"), CONV: "lora_unet_" + CONV.replace(".", "_"),
         TEXT: "lora_te_text_model_" + TEXT.replace(".", "_")}


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _applied_delta(base, tensors, path, part="unet", strength=0.7):
    """What the loaded file adds to one layer's output at ``strength``, on a random input."""
    module = base.unet if part == "unet" else base.text_encoder
    layer_path = path if part == "unet" else path
    kohya_io.load_into(base.unet, base.text_encoder, tensors, source="test")
    try:
        lora_io.set_strength(base.unet, base.text_encoder, strength)
        layer = module.get_submodule(layer_path)
        weight = layer.get_base_layer().weight
        x = torch.randn((2, weight.shape[1], 8, 8) if weight.dim() == 4 else (2, 5, weight.shape[1]), generator=_g(9))
        with torch.no_grad():
            delta = layer(x) - layer.get_base_layer()(x)
    finally:
        lora_io.unload(base.unet, base.text_encoder)
    return x, delta, layer.get_base_layer()


def _expected(x, change, base_layer, strength=0.7):
    if change.dim() == 4:
        return strength * F.conv2d(x, change, stride=base_layer.stride, padding=base_layer.padding)
    return strength * x @ change.T


def test_loha_with_and_without_tucker_applies_its_formula(base):
    r = 2
    conv_w = base.unet.get_submodule(CONV).weight  # (32, 32, 3, 3)
    out_c, in_c, k, _ = conv_w.shape
    t = {}
    name = KOHYA[ATTN]
    for key, shape in (("hada_w1_a", (32, r)), ("hada_w1_b", (r, 32)), ("hada_w2_a", (32, r)), ("hada_w2_b", (r, 32))):
        t[f"{name}.{key}"] = torch.randn(shape, generator=_g(len(t))) * 0.3
    t[f"{name}.alpha"] = torch.tensor(1.0)
    conv = KOHYA[CONV]
    for key, shape in (("hada_w1_a", (r, out_c)), ("hada_w1_b", (r, in_c)), ("hada_w2_a", (r, out_c)),
                       ("hada_w2_b", (r, in_c)), ("hada_t1", (r, r, k, k)), ("hada_t2", (r, r, k, k))):
        t[f"{conv}.{key}"] = torch.randn(shape, generator=_g(10 + len(t))) * 0.3
    assert lora_formats.detect(t) == "loha"
    kohya, fmt = lora_formats.to_kohya(t, {}, "loha.safetensors")
    assert fmt == "loha"
    # The formula, written out: (w1a @ w1b) * (w2a @ w2b) * alpha / rank; Tucker cores rebuilt.
    lin = (t[f"{name}.hada_w1_a"] @ t[f"{name}.hada_w1_b"]) * (t[f"{name}.hada_w2_a"] @ t[f"{name}.hada_w2_b"]) * 0.5
    x, delta, layer = _applied_delta(base, kohya, ATTN)
    torch.testing.assert_close(delta, _expected(x, lin, layer), atol=1e-5, rtol=1e-4)

    def rebuild(core, down, up):
        out = torch.zeros(out_c, in_c, k, k)
        for a in range(r):
            for b in range(r):
                out += core[a, b][None, None] * torch.outer(up[a], down[b])[:, :, None, None]
        return out

    conv_change = (rebuild(t[f"{conv}.hada_t1"], t[f"{conv}.hada_w1_b"], t[f"{conv}.hada_w1_a"])
                   * rebuild(t[f"{conv}.hada_t2"], t[f"{conv}.hada_w2_b"], t[f"{conv}.hada_w2_a"]))  # no alpha: 1
    x, delta, layer = _applied_delta(base, kohya, CONV)
    torch.testing.assert_close(delta, _expected(x, conv_change, layer), atol=1e-4, rtol=1e-4)


def test_lokr_applies_the_kronecker_formula(base):
    name = KOHYA[TEXT]
    t = {f"{name}.lokr_w1": torch.randn(4, 4, generator=_g(1)),  # whole
         f"{name}.lokr_w2_a": torch.randn(8, 2, generator=_g(2)) * 0.3,  # factored, rank 2
         f"{name}.lokr_w2_b": torch.randn(2, 8, generator=_g(3)) * 0.3,
         f"{name}.alpha": torch.tensor(1.0)}
    conv = KOHYA[CONV]
    t[f"{conv}.lokr_w1_a"] = torch.randn(4, 1, generator=_g(4)) * 0.5
    t[f"{conv}.lokr_w1_b"] = torch.randn(1, 4, generator=_g(5)) * 0.5
    t[f"{conv}.lokr_w2"] = torch.randn(8, 8, 3, 3, generator=_g(6)) * 0.1
    t[f"{conv}.alpha"] = torch.tensor(3.0)
    kohya, fmt = lora_formats.to_kohya(t, {}, "lokr.safetensors")
    assert fmt == "lokr"
    w2 = t[f"{name}.lokr_w2_a"] @ t[f"{name}.lokr_w2_b"]
    text_change = torch.kron(t[f"{name}.lokr_w1"], w2) * (1.0 / 2)  # alpha / rank of the factored w2
    x, delta, layer = _applied_delta(base, kohya, TEXT, part="text_encoder")
    torch.testing.assert_close(delta, _expected(x, text_change, layer), atol=1e-5, rtol=1e-4)
    w1 = (t[f"{conv}.lokr_w1_a"] @ t[f"{conv}.lokr_w1_b"])[:, :, None, None]
    conv_change = torch.kron(w1, t[f"{conv}.lokr_w2"]) * 3.0  # alpha / rank of w1 (1)
    assert conv_change.shape == (32, 32, 3, 3)
    x, delta, layer = _applied_delta(base, kohya, CONV)
    torch.testing.assert_close(delta, _expected(x, conv_change, layer), atol=1e-4, rtol=1e-4)


def _peft_unet_file(base, tmp_path, alpha=8, rank=4):
    """A LoRA as diffusers writes it: peft adapter on the UNet, saved by the pipeline's own
    save_lora_weights with its adapter metadata."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                     init_lora_weights=False)
    inject_adapter_in_model(cfg, base.unet, adapter_name="default")
    try:
        state = get_peft_model_state_dict(base.unet, adapter_name="default")
        StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=state,
                                                  unet_lora_adapter_metadata=cfg.to_dict())
        x = torch.randn(2, 5, 32, generator=_g(9))
        layer = base.unet.get_submodule(ATTN)
        with torch.no_grad():
            expected = layer(x) - layer.get_base_layer()(x)
    finally:
        lora_io.remove_one(base.unet)
    return tmp_path / "pytorch_lora_weights.safetensors", x, expected


def test_a_diffusers_file_applies_as_peft_applied_it(base, tmp_path):
    path, x, expected = _peft_unet_file(base, tmp_path, alpha=8, rank=4)
    tensors, meta = kohya_io.read_kohya(path)
    assert lora_formats.detect(tensors) == "diffusers" and all(k.startswith("unet.") for k in tensors)
    kohya, _ = lora_formats.to_kohya(tensors, meta, str(path))
    assert float(kohya[KOHYA[ATTN] + ".alpha"]) == 8.0  # from diffusers' adapter metadata, not the rank
    kohya_io.load_into(base.unet, base.text_encoder, kohya)
    try:
        layer = base.unet.get_submodule(ATTN)
        with torch.no_grad():
            got = layer(x) - layer.get_base_layer()(x)
    finally:
        lora_io.unload(base.unet, base.text_encoder)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # Older diffusers names (attention processors) map to the same modules.
    old = {f"unet.{ATTN[:-5]}.processor.to_q_lora.down.weight": torch.ones(4, 32),
           f"unet.{ATTN[:-5]}.processor.to_q_lora.up.weight": torch.ones(32, 4)}
    converted, _ = lora_formats.to_kohya(old, {}, "old.safetensors")
    assert set(converted) == {KOHYA[ATTN] + s for s in (".lora_down.weight", ".lora_up.weight", ".alpha")}
    assert float(converted[KOHYA[ATTN] + ".alpha"]) == 4.0  # no metadata: alpha = rank, scale 1
    with pytest.raises(LoraLabError, match=r"key vae\.x\.lora_A\.weight names no UNet or text-encoder"):
        lora_formats.to_kohya({**old, "vae.x.lora_A.weight": torch.ones(4, 8)}, {}, "odd.safetensors")


def test_checkpoint_folders_of_diffusers_training_are_epochs_in_order(base, tmp_path):
    from lora_lab.evaluate.run import list_lora_files

    path, _, _ = _peft_unet_file(base, tmp_path / "src")
    run = tmp_path / "run"
    for n in (500, 100, 1000):
        (run / f"checkpoint-{n}").mkdir(parents=True)
        (run / f"checkpoint-{n}" / "pytorch_lora_weights.safetensors").write_bytes(path.read_bytes())
        (run / f"checkpoint-{n}" / "optimizer.bin").write_bytes(b"x")
    (run / "pytorch_lora_weights.safetensors").write_bytes(path.read_bytes())
    files = list_lora_files(run)
    assert [e for e, *_ in files] == [100, 500, 1000, 1001]
    assert [m.get("lora_lab_label", p.stem) for _, p, _, m in files] == [
        "checkpoint-100", "checkpoint-500", "checkpoint-1000", "pytorch_lora_weights"]
    assert all(m["lora_lab_format"] == "diffusers" for *_, m in files)


def test_unknown_files_are_refused_by_name():
    with pytest.raises(LoraLabError, match=r"e\.safetensors: no LoRA weights this tool knows \(keys like emb\)"):
        lora_formats.to_kohya({"emb": torch.zeros(2)}, {}, "e.safetensors")


def _comfy_dora(w, down, up, alpha, m):
    """ComfyUI's DoRA merge, written out for one linear layer: the norm per input column of
    W + dW (m of shape (1, in)), or per output row of W (m of shape (out, 1))."""
    dw = up @ down * (alpha / down.shape[0])
    merged = w + dw
    if m.shape[0] == w.shape[0]:
        norm = w.norm(dim=1, keepdim=True)
    else:
        norm = merged.norm(dim=0, keepdim=True)
    return merged * m / (norm + torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("axis", ["input", "output"])
def test_dora_applies_comfyuis_merge_linearly_in_strength(base, axis):
    name = KOHYA[ATTN]
    w = base.unet.get_submodule(ATTN).weight.detach().clone()
    down = torch.randn(4, 32, generator=_g(1)) * 0.2
    up = torch.randn(32, 4, generator=_g(2)) * 0.2
    m = (torch.rand(1, 32, generator=_g(3)) + 0.5) if axis == "input" else (torch.rand(32, 1, generator=_g(3)) + 0.5)
    t = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0),
         f"{name}.dora_scale": m}
    assert lora_formats.detect(t) == "dora"
    raw, fmt = lora_formats.to_kohya(t, {}, "dora.safetensors")
    assert fmt == "dora" and raw is t  # converted once the base is loaded
    kohya = lora_formats.dora_to_kohya(t, lambda n: kohya_io.base_weight(base.unet, base.text_encoder, n), "d")
    change = _comfy_dora(w, down, up, 2.0, m) - w
    for strength in (1.0, 0.4):  # ComfyUI and A1111: W + strength * (W' - W)
        x, delta, layer = _applied_delta(base, kohya, ATTN, strength=strength)
        torch.testing.assert_close(delta, _expected(x, change, layer, strength), atol=1e-5, rtol=1e-4)
    with pytest.raises(LoraLabError, match="match no layer of this base model"):
        lora_formats.dora_to_kohya({f"lora_unet_nope.{k.split('.', 1)[1]}": v for k, v in t.items()},
                                   lambda n: kohya_io.base_weight(base.unet, base.text_encoder, n), "d")


def test_a_converted_key_that_matches_no_layer_stops_with_its_name(base):
    t = {"lora_unet_input_blocks_4_1_proj_in.hada_w1_a": torch.zeros(8, 2),
         "lora_unet_input_blocks_4_1_proj_in.hada_w1_b": torch.zeros(2, 8),
         "lora_unet_input_blocks_4_1_proj_in.hada_w2_a": torch.zeros(8, 2),
         "lora_unet_input_blocks_4_1_proj_in.hada_w2_b": torch.zeros(2, 8)}
    kohya, _ = lora_formats.to_kohya(t, {}, "sdxl_loha.safetensors")
    with pytest.raises(LoraLabError, match="first: lora_unet_input_blocks_4_1_proj_in"):
        kohya_io.load_into(base.unet, base.text_encoder, kohya, source="sdxl_loha.safetensors")


def test_evaluate_renders_scores_and_judges_loha_and_diffusers_folders(base, cache_dir, demo_dir, tmp_path):
    """A LoHa folder and a diffusers run (checkpoint-N folders) evaluate like our own files:
    grids, cells with A1111 infotext naming each file, scores and verdicts."""
    from PIL import Image

    from conftest import make_config
    from lora_lab.config import ClipScorerConfig, EvalConfig, FaceScorerConfig
    from lora_lab.data.dataset import load_dataset
    from lora_lab.evaluate.run import evaluate

    cfg = make_config(cache_dir, tmp_path / "out")
    cfg.eval = EvalConfig(strengths=[0.0, 1.0], steps=2, seeds=[3], max_prompts=1, size=32,
                          face=FaceScorerConfig(pretrained=None),
                          clip=ClipScorerConfig(model="lora-lab-tiny-clip", pretrained=None))
    cfg.data.token = "sks woman"
    dataset = load_dataset(cfg.data, cache_dir)
    loha = tmp_path / "loha"
    loha.mkdir()
    name = KOHYA[ATTN]
    for epoch in (1, 2):
        t = {f"{name}.{k}": torch.randn(s, generator=_g(epoch * 10 + i)) * 0.5
             for i, (k, s) in enumerate((("hada_w1_a", (32, 2)), ("hada_w1_b", (2, 32)), ("hada_w2_a", (32, 2)),
                                         ("hada_w2_b", (2, 32))))}
        save_file(t, str(loha / f"mine-{epoch:06d}.safetensors"))
    result = evaluate(cfg, base, dataset, loha, tmp_path / "ev_loha", progress=False)
    assert sorted(result.judged[result.judged.strength == 1.0].label) == ["mine-000001", "mine-000002"]
    text = Image.open(tmp_path / "ev_loha" / "cells" / "mine-000002" / "s1" / "p00_seed3.png").text["parameters"]
    assert "<lora:mine-000002:1>" in text
    assert set(json.loads((tmp_path / "ev_loha" / "verdict.json").read_text())["cells"][0]) >= {"verdict", "epoch"}

    dora = tmp_path / "dora"
    dora.mkdir()
    save_file({f"{name}.lora_down.weight": torch.randn(4, 32, generator=_g(5)) * 0.3,
               f"{name}.lora_up.weight": torch.randn(32, 4, generator=_g(6)) * 0.3,
               f"{name}.alpha": torch.tensor(4.0), f"{name}.dora_scale": torch.rand(1, 32, generator=_g(7)) + 0.5},
              str(dora / "d.safetensors"))
    result = evaluate(cfg, base, dataset, dora, tmp_path / "ev_dora", progress=False)
    assert (tmp_path / "ev_dora" / "cells" / "d" / "s1" / "p00_seed3.png").is_file()
    assert list(result.judged[result.judged.strength == 1.0].label) == ["d"]

    path, _, _ = _peft_unet_file(base, tmp_path / "src")
    run = tmp_path / "run"
    for n in (200, 100):
        (run / f"checkpoint-{n}").mkdir(parents=True)
        (run / f"checkpoint-{n}" / "pytorch_lora_weights.safetensors").write_bytes(path.read_bytes())
    result = evaluate(cfg, base, dataset, run, tmp_path / "ev_diffusers", progress=False)
    assert sorted(set(result.scores.epoch)) == [100, 200]
    assert (tmp_path / "ev_diffusers" / "cells" / "checkpoint-200" / "s1" / "p00_seed3.png").is_file()
    assert len(result.grids) == 2 and (tmp_path / "ev_diffusers" / "verdict.json").is_file()


def test_locon_with_a_tucker_core_applies_comfyuis_change(base):
    """kohya LoCon with lora_mid: ComfyUI's change is up @ (down through mid), written out."""
    conv = KOHYA[CONV]
    r, k = 2, 3
    up = torch.randn(32, r, 1, 1, generator=_g(1)) * 0.3
    down = torch.randn(r, 32, 1, 1, generator=_g(2)) * 0.3
    mid = torch.randn(r, r, k, k, generator=_g(3)) * 0.3
    t = {f"{conv}.lora_up.weight": up, f"{conv}.lora_down.weight": down, f"{conv}.lora_mid.weight": mid,
         f"{conv}.alpha": torch.tensor(1.0)}
    kohya, fmt = lora_formats.to_kohya(t, {}, "locon.safetensors")
    assert fmt == "kohya" and f"{conv}.lora_mid.weight" not in kohya
    # ComfyUI: mat2 = (down^T flattened) @ (mid transposed, flattened), reshaped; change = up @ mat2
    mat2 = torch.mm(down.transpose(0, 1).flatten(start_dim=1), mid.transpose(0, 1).flatten(start_dim=1))
    mat2 = mat2.reshape(32, r, k, k).transpose(0, 1)
    change = torch.mm(up.flatten(start_dim=1), mat2.flatten(start_dim=1)).reshape(32, 32, k, k) * (1.0 / r)
    x, delta, layer = _applied_delta(base, kohya, CONV)
    torch.testing.assert_close(delta, _expected(x, change, layer), atol=1e-5, rtol=1e-4)
