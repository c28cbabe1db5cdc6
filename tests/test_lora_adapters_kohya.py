"""kohya-format files: keys, alpha, metadata, and a round trip through diffusers' own loader."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_lab.config import TrainConfig
from lora_lab.lora import adapters as lora_io
from lora_lab.lora import kohya as kohya_io


def _randomise(module):
    g = torch.Generator().manual_seed(7)
    for name, p in module.named_parameters():
        if "lora_" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _unet_out(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    ids = pipe.tokenizer(["photo of sks woman"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
        return pipe.unet(sample, torch.tensor([500]), hidden).sample


def _fresh_pipe(tiny_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)


def _trained_file(tiny_dir, tmp_path, cfg):
    pipe = _fresh_pipe(tiny_dir)
    lora_io.attach(pipe.unet, pipe.text_encoder, cfg)
    _randomise(pipe.unet)
    _randomise(pipe.text_encoder)
    expected = _unet_out(pipe)
    tensors = kohya_io.kohya_state_dict(pipe.unet, pipe.text_encoder if cfg.trains_text_encoder else None)
    path = tmp_path / "lora.safetensors"
    kohya_io.save_kohya(path, tensors, kohya_io.kohya_metadata(ss_network_dim=cfg.network_dim))
    lora_io.detach(pipe.unet, pipe.text_encoder)
    base_out = _unet_out(pipe)
    return path, expected, base_out


def test_keys_alpha_and_hash(tiny_dir, tmp_path):
    cfg = TrainConfig(network_dim=4, network_alpha=1.0, conv_dim=2, conv_alpha=0.5, text_encoder_lr=5e-5)
    path, _, _ = _trained_file(tiny_dir, tmp_path, cfg)
    tensors = load_file(path)
    keys = set(tensors)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {f"{q}.lora_down.weight", f"{q}.lora_up.weight", f"{q}.alpha"} <= keys
    assert tensors[f"{q}.alpha"].dim() == 0 and float(tensors[f"{q}.alpha"]) == 1.0
    assert tensors[f"{q}.lora_down.weight"].shape == (4, 32)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert tensors[f"{conv}.lora_down.weight"].shape == (2, 32, 3, 3)
    assert tensors[f"{conv}.lora_up.weight"].shape == (32, 2, 1, 1)
    assert float(tensors[f"{conv}.alpha"]) == 0.5
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_2_mlp_fc2.alpha" in keys
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    raw = path.read_bytes()
    import hashlib

    header = int.from_bytes(raw[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + header:]).hexdigest()
    assert meta["ss_network_dim"] == "4"


def test_hashes_are_kohyas_over_the_tensors_and_the_training_record(tmp_path):
    """kohya's precalculate_safetensors_hashes: both hashes over the tensors serialized with the
    ``ss_*`` metadata only; the legacy one (64 KiB at 1 MiB) needs a file past 1 MiB to mean
    anything, so this file is 2 MiB."""
    import hashlib

    from safetensors.torch import save as serialize

    tensors = {"lora_unet_x.lora_down.weight": torch.arange(512 * 1024, dtype=torch.float32).reshape(512, 1024),
               "lora_unet_x.alpha": torch.tensor(1.0)}
    path = tmp_path / "big.safetensors"
    kohya_io.save_kohya(path, tensors, {"ss_network_dim": 512, "ss_output_name": "big", "modelspec.title": "big"})
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    record = {k: v for k, v in meta.items() if k.startswith("ss_")}
    assert record == {"ss_network_dim": "512", "ss_output_name": "big"}
    blob = serialize(load_file(path), record)
    header = int.from_bytes(blob[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(blob[8 + header:]).hexdigest()
    assert meta["sshs_legacy_hash"] == hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    bare = serialize(load_file(path))  # what it was before: the tensors alone
    assert meta["sshs_legacy_hash"] != hashlib.sha256(bare[0x100000:0x110000]).hexdigest()[:8]


def test_diffusers_loader_reproduces_trained_output(tiny_dir, tmp_path):
    cfg = TrainConfig(network_dim=4, network_alpha=1.0, conv_dim=2, conv_alpha=1.0, text_encoder_lr=5e-5)
    path, expected, base_out = _trained_file(tiny_dir, tmp_path, cfg)
    assert (expected - base_out).abs().max() > 1e-3  # the adapter really changes the output
    pipe = _fresh_pipe(tiny_dir)
    pipe.load_lora_weights(str(path))
    got = _unet_out(pipe)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_a_broken_key_breaks_the_round_trip(tiny_dir, tmp_path):
    cfg = TrainConfig(network_dim=4, network_alpha=1.0)
    path, expected, _ = _trained_file(tiny_dir, tmp_path, cfg)
    tensors = load_file(path)
    old = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v"
    new = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
    for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
        tensors[new + suffix], tensors[old + suffix] = tensors.pop(old + suffix), tensors[new + suffix]
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken))
    pipe = _fresh_pipe(tiny_dir)
    pipe.load_lora_weights(str(broken))
    assert (_unet_out(pipe) - expected).abs().max() > 1e-4


def test_alpha_scales_like_kohya(tiny_dir, tmp_path):
    """alpha 1 at rank 4 loads at 1/4 the strength of alpha 4 (diffusers' converter gets alpha = rank)."""
    cfg = TrainConfig(network_dim=4, network_alpha=1.0)
    path, _, base_out = _trained_file(tiny_dir, tmp_path, cfg)
    tensors = load_file(path)
    strong = {k: (torch.tensor(4.0) if k.endswith(".alpha") else v) for k, v in tensors.items()}
    save_file(strong, str(tmp_path / "strong.safetensors"))
    weak_pipe, strong_pipe = _fresh_pipe(tiny_dir), _fresh_pipe(tiny_dir)
    weak_pipe.load_lora_weights(str(path))
    strong_pipe.load_lora_weights(str(tmp_path / "strong.safetensors"))
    d_weak = _unet_out(weak_pipe) - base_out
    d_strong = _unet_out(strong_pipe) - base_out
    ratio = (d_strong.norm() / d_weak.norm()).item()
    assert 3.0 < ratio < 5.0


def test_files_get_the_users_usual_permissions(tmp_path):
    """kohya writes LoRA files 0644 under the usual umask 022: a UI running as another user
    reads them. Temp files (0600) are opened up to the umask's mode before the rename."""
    import os
    import stat

    from lora_lab.files import FILE_MODE, atomic_write_text

    mask = os.umask(0)
    os.umask(mask)
    assert FILE_MODE == 0o666 & ~mask
    path = tmp_path / "lora.safetensors"
    kohya_io.save_kohya(path, {"lora_unet_x.alpha": torch.tensor(1.0)}, {"ss_network_dim": "4"})
    atomic_write_text(tmp_path / "trial.json", "{}")
    for p in (path, tmp_path / "trial.json"):
        assert stat.S_IMODE(p.stat().st_mode) == FILE_MODE
    if mask == 0o022:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
