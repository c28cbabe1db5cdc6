"""Model files that ship with lora_lab or are built offline: the CLIP tokenizer, the config
folders of the presets (sd15, sd21 ...) and the tiny SD-shaped model.

Everything here is written once into the cache folder and then loaded through the same code
as a user's own diffusers folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lora_lab.files import publish_dir

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
TINY_SEED = 0


def write_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> None:
    """Write SD's CLIP BPE tokenizer (vocab.json, merges.txt) from open_clip's shipped vocabulary.

    open_clip names the special tokens ``<start_of_text>`` / ``<end_of_text>``; SD's tokenizer
    calls them ``<|startoftext|>`` / ``<|endoftext|>``. With that rename the 49408 ids match
    SD's own tokenizer (bos 49406, eos 49407).

    Args:
        folder: Where to write the files (created if missing).
        pad_token: ``<|endoftext|>`` for SD 1.x, ``!`` for SD 2.x (as their tokenizers do).
    """
    from open_clip.tokenizer import SimpleTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    bpe = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    encoder = {rename.get(token, token): i for token, i in bpe.encoder.items()}
    merges = [" ".join(pair) for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
    (folder / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {
        "model_max_length": 77,
        "do_lower_case": True,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(
        json.dumps({k: special[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}),
        encoding="utf-8",
    )


def _publish(build, target: Path) -> Path:
    return publish_dir(target, build, "model_index.json")


def preset_folder(name: str, cache_dir: Path) -> Path:
    """A diffusers-style config folder (no weights) for a single-file checkpoint of ``name``."""

    def build(tmp: Path) -> None:
        shutil.copytree(PRESETS_DIR / name, tmp, dirs_exist_ok=True)
        pad = "!" if name.startswith("sd21") else "<|endoftext|>"
        write_clip_tokenizer(tmp / "tokenizer", pad_token=pad)
        if (tmp / "text_encoder_2").is_dir():  # SDXL: OpenCLIP's tokenizer pads with "!"
            write_clip_tokenizer(tmp / "tokenizer_2", pad_token="!")

    return _publish(build, Path(cache_dir) / "presets" / name)


# Built-in SD-shaped models, seeded. tiny: the fast test and demo model (VAE factor 4).
# bench: a larger one for benchmarks (UNet 64/128/256 channels; VAE with SD's factor 8 and
# layers per block, at a quarter of SD's channels, as the UNet). sd15-random: SD 1.5's own
# architecture and size, random weights (GPU benchmarks; about 4 GB on disk).
_SPECS = {
    "tiny": dict(unet=(32, 64), vae=(32, 32, 64), vae_layers=1, text=32, groups=16),
    "bench": dict(unet=(64, 128, 256), vae=(32, 64, 128, 128), vae_layers=2, text=64, groups=32),
}


def tiny_folder(cache_dir: Path, name: str = "tiny") -> Path:
    """A built-in SD-shaped model as a diffusers folder under ``cache_dir/models``; built once."""
    return _publish(lambda folder: _build(folder, name), Path(cache_dir) / "models" / f"{name}-v1")


def sd15_modules():
    """SD 1.5's UNet, VAE and text encoder with random weights, from the shipped sd15 preset
    configs (the real architecture at its real size: for GPU benchmarks without a download)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    preset = PRESETS_DIR / "sd15"
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(preset / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(preset / "vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(preset / "text_encoder"))
    return unet, vae, text_encoder


def _build(folder: Path, name: str) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(TINY_SEED)
    if name == "sd15-random":
        _save(folder, *sd15_modules())
        return
    if name == "tiny-sdxl":
        _build_sdxl(folder)
        return
    spec = _SPECS[name]
    n = len(spec["unet"])
    unet = UNet2DConditionModel(
        block_out_channels=spec["unet"],
        layers_per_block=2,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=spec["text"],
        attention_head_dim=4,
        norm_num_groups=spec["groups"],
    )
    m = len(spec["vae"])
    vae = AutoencoderKL(
        block_out_channels=spec["vae"],
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * m,
        up_block_types=("UpDecoderBlock2D",) * m,
        latent_channels=4,
        layers_per_block=spec["vae_layers"],
        norm_num_groups=16,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=spec["text"],
            intermediate_size=2 * spec["text"],
            num_attention_heads=4,
            num_hidden_layers=3,
            max_position_embeddings=77,
            vocab_size=49408,
            projection_dim=32,
            hidden_act="quick_gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=1,
        )
    )
    _save(folder, unet, vae, text_encoder)


def _tiny_text_config(hidden: int = 32, projection: int = 32, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4, num_hidden_layers=3,
                          max_position_embeddings=77, vocab_size=49408, projection_dim=projection,
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=1, **extra)


def _build_sdxl(folder: Path) -> None:
    """A tiny model of SDXL's shape: its three-block UNet layout (so its layers have SDXL's
    names), ``text_time`` conditioning on the pooled embedding and the six size ids, two text
    encoders of different widths, as SDXL's (the second with a projection), whose hidden states
    are concatenated."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    time_dim, pooled = 8, 32
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4, use_linear_projection=True, transformer_layers_per_block=(1, 1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + pooled, cross_attention_dim=32 + 64, norm_num_groups=16,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 64), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=16, sample_size=64, scaling_factor=0.13025, force_upcast=True,
    )
    text_encoder = CLIPTextModel(_tiny_text_config(hidden_act="quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(hidden=64, projection=pooled, hidden_act="gelu"))
    scheduler = EulerDiscreteScheduler.from_config(
        EulerDiscreteScheduler.load_config(PRESETS_DIR / "sdxl" / "scheduler"))
    tok_dirs = (folder / "_tokenizer_src", folder / "_tokenizer_2_src")
    write_clip_tokenizer(tok_dirs[0])
    write_clip_tokenizer(tok_dirs[1], pad_token="!")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(tok_dirs[0]), tokenizer_2=CLIPTokenizer.from_pretrained(tok_dirs[1]),
        unet=unet, scheduler=scheduler,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    for tok_dir in tok_dirs:
        shutil.rmtree(tok_dir)


def _save(folder: Path, unet, vae, text_encoder) -> None:
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    tok_dir = folder / "_tokenizer_src"
    write_clip_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(tok_dir)
