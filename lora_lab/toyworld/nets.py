"""The toy world's networks: the same classes as Stable Diffusion and CLIP, at a tiny size.

- CLIP: an open_clip ``CLIP`` named ``lora-lab-toyworld-clip`` (config in
  ``lora_lab/models/clip_configs``; a ModifiedResNet image tower, as OpenAI's RN50 CLIP, on the
  drawings upscaled to 64 px, and a text transformer), so the CLIP scorer loads it with its
  ordinary code from a local checkpoint.
- The text encoder of the diffusion model is that CLIP's text tower, converted to a
  transformers ``CLIPTextModel`` (:func:`text_encoder_from_clip`), as SD 1.x conditions on the
  text tower of OpenAI's CLIP.
- ``AutoencoderKL`` 32 px -> 8 x 8 x 4 latents, ``UNet2DConditionModel`` on those latents.
- :class:`ReadOut`: a small CNN with one head per attribute of the world.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Tuple

import torch
from torch import nn

from lora_lab.toyworld import world

RESOLUTION = world.SIZE
CLIP_NAME = "lora-lab-toyworld-clip"  # the scorer; its text tower conditions the UNet
CLIP_CONFIG = Path(__file__).resolve().parents[1] / "models" / "clip_configs" / f"{CLIP_NAME}.json"


def clip_config() -> dict:
    return json.loads(CLIP_CONFIG.read_text(encoding="utf-8"))


def make_clip():
    import open_clip

    open_clip.add_model_config(CLIP_CONFIG.parent)
    return open_clip.create_model(CLIP_NAME)


def clip_tokenizer():
    import open_clip

    open_clip.add_model_config(CLIP_CONFIG.parent)
    return open_clip.get_tokenizer(CLIP_NAME)


def text_encoder_config():
    from transformers import CLIPTextConfig

    text = clip_config()["text_cfg"]
    return CLIPTextConfig(
        hidden_size=text["width"], intermediate_size=4 * text["width"], num_attention_heads=text["heads"],
        num_hidden_layers=text["layers"], max_position_embeddings=text["context_length"],
        vocab_size=text["vocab_size"], projection_dim=clip_config()["embed_dim"], hidden_act="gelu",
        layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    )


def text_encoder_state(clip_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """open_clip text tower keys -> transformers ``CLIPTextModel`` keys (same numbers).

    open_clip keeps q, k and v in one ``in_proj`` matrix; transformers has three."""
    out = {
        "embeddings.token_embedding.weight": clip_state["token_embedding.weight"],
        "embeddings.position_embedding.weight": clip_state["positional_embedding"],
        "final_layer_norm.weight": clip_state["ln_final.weight"],
        "final_layer_norm.bias": clip_state["ln_final.bias"],
    }
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in clip_state:
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        q, k, v = clip_state[src + "attn.in_proj_weight"].chunk(3, dim=0)
        qb, kb, vb = clip_state[src + "attn.in_proj_bias"].chunk(3, dim=0)
        for name, w, b in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
            out[dst + f"self_attn.{name}.weight"] = w
            out[dst + f"self_attn.{name}.bias"] = b
        pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
        for a, b_ in pairs.items():
            out[dst + b_ + ".weight"] = clip_state[src + a + ".weight"]
            out[dst + b_ + ".bias"] = clip_state[src + a + ".bias"]
        i += 1
    return {k: v.contiguous().clone() for k, v in out.items()}


def text_encoder_from_clip(clip_state: Dict[str, torch.Tensor]):
    state = text_encoder_state(clip_state)
    return text_encoder_from_state(state, state.pop("embeddings.token_embedding.weight"))


def text_encoder_from_state(state: Dict[str, torch.Tensor], token_embedding: torch.Tensor):
    """A ``CLIPTextModel`` from converted weights (:func:`text_encoder_state`) and the token
    embedding (shared with the CLIP checkpoint)."""
    from transformers import CLIPTextModel

    model = CLIPTextModel(text_encoder_config())
    state = dict(state, **{"embeddings.token_embedding.weight": token_embedding})
    own = model.state_dict()
    prefix = "text_model." if any(k.startswith("text_model.") for k in own) else ""
    missing = model.load_state_dict({prefix + k: v.float() for k, v in state.items()}, strict=False)
    unexpected = [k for k in missing.missing_keys if "position_ids" not in k]
    if unexpected or missing.unexpected_keys:
        raise RuntimeError(f"text encoder conversion: missing {unexpected}, unexpected {missing.unexpected_keys}")
    return model.eval()


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), latent_channels=4,
        layers_per_block=1, norm_num_groups=8, sample_size=RESOLUTION,
    )


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=RESOLUTION // 4, in_channels=4, out_channels=4, block_out_channels=(64, 128),
        layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=clip_config()["text_cfg"]["width"], attention_head_dim=8, norm_num_groups=16,
    )


def make_scheduler():
    """SD 1.x's training schedule (1000 steps, scaled linear betas, epsilon)."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)


# Read-out heads: attribute -> its values (booleans are two-class heads).
HEADS: Dict[str, Tuple] = {
    "hair_colour": tuple(world.HAIR_COLOURS), "hair_style": world.HAIR_STYLES,
    "eye_colour": tuple(world.EYE_COLOURS), "skin": tuple(world.SKIN_TONES), "face": world.FACE_SHAPES,
    "mark": world.MARKS, "glasses": (False, True), "hat": (False, True), "earrings": (False, True),
    "background": tuple(world.BACKGROUNDS), "pattern": world.PATTERNS,
}


class ReadOut(nn.Module):
    """Reads every attribute of the world off a 32 px image (pixels in [-1, 1])."""

    def __init__(self):
        super().__init__()

        def block(i, o, stride):
            return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1), nn.GroupNorm(8, o), nn.SiLU())

        self.features = nn.Sequential(block(3, 32, 1), block(32, 32, 1), block(32, 64, 2), block(64, 64, 2),
                                      block(64, 64, 2), nn.Flatten(), nn.Linear(64 * 16, 192), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(192, len(values)) for name, values in HEADS.items()})

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if x.shape[-1] != RESOLUTION:
            x = nn.functional.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True,
                                          align_corners=False)
        h = self.features(x)
        return {name: head(h) for name, head in self.heads.items()}


def targets(records) -> Dict[str, torch.Tensor]:
    """Class indices per head for a list of :class:`world.Attributes`."""
    return {name: torch.tensor([values.index(getattr(a, name)) for a in records]) for name, values in HEADS.items()}


def to_tensor(images) -> torch.Tensor:
    """PIL images -> (n, 3, h, w) in [-1, 1]."""
    import numpy as np

    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def to_images(x: torch.Tensor) -> list:
    """(n, 3, h, w) in [-1, 1] -> 8-bit PIL images, by diffusers' own post-processing (as the
    pipelines that render lora_lab's images do)."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor().postprocess(x.detach(), output_type="pil")


class ReadOutB(nn.Module):
    """A second read-out of the same attributes, built differently from :class:`ReadOut` (wider
    first kernels, pooling instead of strided convolutions, a pooled head, dropout) and trained
    apart (another seed, harder inputs: :mod:`lora_lab.toyworld.pretrain_readout2`), so that
    where the two agree on a render the truth does not rest on one network's habits."""

    def __init__(self):
        super().__init__()

        def block(i, o, k):
            return nn.Sequential(nn.Conv2d(i, o, k, 1, k // 2), nn.GroupNorm(8, o), nn.GELU())

        self.features = nn.Sequential(block(3, 48, 5), nn.MaxPool2d(2), block(48, 96, 3), nn.MaxPool2d(2),
                                      block(96, 96, 3), block(96, 96, 3), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                      nn.Linear(96 * 4, 256), nn.GELU(), nn.Dropout(0.1))
        self.heads = nn.ModuleDict({name: nn.Linear(256, len(values)) for name, values in HEADS.items()})

    forward = ReadOut.forward
