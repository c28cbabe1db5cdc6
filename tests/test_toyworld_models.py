"""The toy world's models: conversion, pretraining machinery (smoke-sized, never the real run),
the shipped weights, and the ground-truth rules of the truth benchmark."""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest
import torch
from PIL import Image

from lora_lab.bench import truth_rules as truth
from lora_lab.config import ClipScorerConfig, JudgeConfig, ModelConfig
from lora_lab.toyworld import assets, nets, pretrain, pretrain_clip, pretrain_steps, quality, subjects, world


def test_text_encoder_conversion_gives_the_same_hidden_states():
    torch.manual_seed(0)
    clip = nets.make_clip().eval()
    for p in clip.parameters():  # random but not tiny: a wrong key or a swapped q/k/v would show
        p.data.normal_(0, 0.2)
    te = nets.text_encoder_from_clip(clip.state_dict())
    ids = nets.clip_tokenizer()(["photo of a person with red hair", "photo of sks, wearing a hat"])
    with torch.no_grad():
        x = clip.token_embedding(ids) + clip.positional_embedding
        want = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
        got = te(ids).last_hidden_state
    assert torch.allclose(got, want, atol=1e-5)
    with torch.no_grad():
        short = pretrain_clip.encode_text_short(clip, ids)
        full = torch.nn.functional.normalize(clip.encode_text(ids), dim=-1)
    assert torch.allclose(short, full, atol=1e-5)


def test_shipped_text_encoder_is_the_clip_text_tower():
    # One CLIP: the scorer's model, and its text tower conditions the UNet (as SD 1.x's text
    # encoder is OpenAI CLIP's), so the words the CLIP tells apart are the words the UNet hears.
    assert isinstance(nets.clip_config()["vision_cfg"]["layers"], list)  # convolutional (ModifiedResNet)
    want = nets.text_encoder_state(assets.load_state("clip"))
    del want["embeddings.token_embedding.weight"]  # stored once, in clip.safetensors
    got = assets.load_state("text_encoder")
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_hard_negatives_change_one_named_attribute():
    rng = random.Random(0)
    for _ in range(300):
        a = world.sample(rng)
        text, fields, style = world.random_caption(a, rng)
        b = world.change_one(a, rng, fields, style)
        changed = [k for k, v in a.as_dict().items() if getattr(b, k) != v]
        assert len(changed) == 1
        negative = world.caption(b) if fields == world.FIELDS else world.partial_caption(b, fields, style)
        if set(fields) & {"hair", "eyes", "background"}:  # a caption naming none of them ("photo of
            assert negative != text, (text, changed)       # a person") has no visible change to make


def test_partial_captions():
    a = world.replace(world.SUBJECT, hair_colour="red", background="navy", pattern="dots")
    assert world.partial_caption(a, ["hair"], style=False) == "photo of a person with red hair"
    assert world.partial_caption(a, ["eyes", "background"]) == \
        "photo of a person with green eyes, on a navy background with dots"


def test_clip_trains_on_vae_round_trips_for_half_the_batch():
    torch.manual_seed(0)
    vae = nets.make_vae().eval()
    records = [world.sample(random.Random(i)) for i in range(4)]
    clean = pretrain_clip.scorer_pixels(records, 64)
    mixed = pretrain_clip.scorer_pixels(records, 64, vae)
    assert mixed.shape == clean.shape == (4, 3, 64, 64)
    assert torch.equal(mixed[2:], clean[2:])  # the second half: the drawings themselves
    with torch.no_grad():  # the first half: the VAE's decoding, as 8-bit images
        decoded = vae.decode(vae.encode(nets.to_tensor([world.draw(a, 32) for a in records[:2]])).latent_dist.mean)
    want = pretrain_clip.clip_pixels(nets.to_tensor(
        [im.resize((64, 64), Image.BICUBIC) for im in nets.to_images(decoded.sample)]))
    assert torch.allclose(mixed[:2], want) and not torch.allclose(mixed[:2], clean[:2], atol=0.1)


def test_to_images_gives_back_the_drawings():
    images = [world.draw(world.sample(random.Random(i)), 32) for i in range(3)]
    assert [im.tobytes() for im in nets.to_images(nets.to_tensor(images))] == [im.tobytes() for im in images]


def test_stage_resumes_to_the_same_weights(tmp_path):
    def run(work, stop_at=None):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        plan = pretrain_steps.Plan(seed=1)

        def loss_fn(step):
            if step == stop_at:
                raise KeyboardInterrupt
            g = pretrain_steps.stage_gen(plan, "t", step)
            x = torch.randn(8, 3, generator=g)
            return (model(x) - x[:, :2]).pow(2).mean()

        return pretrain_steps.train_stage("t", work, model, steps=6, lr=0.05, loss_fn=loss_fn, every=2, ema_decay=0.9)

    whole = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", stop_at=3)
    assert torch.load(tmp_path / "b" / "t.ckpt.pt", weights_only=True)["step"] == 2  # the last checkpoint
    resumed = run(tmp_path / "b")
    for k in whole:
        assert torch.equal(whole[k], resumed[k])


@pytest.fixture(scope="module")
def smoke_weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    pretrain.main(["--smoke", "--work", str(root / "work"), "--weights", str(root / "weights")])
    return root / "weights"


def test_smoke_pretrain_writes_float16_weights_and_a_manifest(smoke_weights):
    from safetensors.torch import load_file

    info = json.loads((smoke_weights / "manifest.json").read_text())
    assert set(info["files"]) == {"clip.safetensors", "text_encoder.safetensors", "vae.safetensors",
                                  "unet.safetensors", "readout.safetensors"}
    assert info["plan"]["unet_steps"] == pretrain.SMOKE.unet_steps and info["vae_scaling_factor"] > 0
    assert info["command"].startswith("python -m lora_lab.toyworld.pretrain --smoke")
    for name, digest in info["files"].items():
        assert pretrain.sha256(smoke_weights / name) == digest
        assert {t.dtype for t in load_file(str(smoke_weights / name)).values()} <= {torch.float16, torch.int64}


def test_weights_load_as_a_diffusers_folder_and_a_clip_scorer(smoke_weights, tmp_path, monkeypatch):
    from lora_lab.models.base import load_base
    from lora_lab.models.scorers import ClipEmbedder

    monkeypatch.setenv(assets.WEIGHTS_ENV, str(smoke_weights))
    base = load_base(ModelConfig(name="toyworld", builtin="toyworld", resolution=32), tmp_path, torch.device("cpu"))
    assert base.source.startswith(str(tmp_path / "models" / "toyworld-"))
    assert base.vae.config.scaling_factor == pytest.approx(json.loads(
        (smoke_weights / "manifest.json").read_text())["vae_scaling_factor"])
    unet = assets.load_state("unet", smoke_weights)
    assert all(torch.equal(base.unet.state_dict()[k], v) for k, v in unet.items())
    image = base.pipe("photo of sks", num_inference_steps=2, height=32, width=32, output_type="pil").images[0]
    assert image.size == (32, 32)
    clip = ClipEmbedder(ClipScorerConfig(model=nets.CLIP_NAME, pretrained=assets.CLIP_TAG), torch.device("cpu"))
    assert not clip.random
    shipped = assets.load_state("clip", smoke_weights)
    assert torch.equal(clip.model.state_dict()["token_embedding.weight"], shipped["token_embedding.weight"])


def test_missing_weights_say_how_to_make_them(tmp_path, monkeypatch):
    from lora_lab.errors import ModelError

    monkeypatch.setenv(assets.WEIGHTS_ENV, str(tmp_path))
    with pytest.raises(ModelError, match="python -m lora_lab.toyworld.pretrain"):
        assets.model_folder(tmp_path / "cache")


def _scores(cells):
    """Rows like scores.csv, the read-out's view already filled in: cells = {(epoch, strength):
    (identity share on likeness images, shown share per adaptability prompt)}."""
    rows = []
    for (epoch, strength), (identity, shown) in cells.items():
        rows.append({"epoch": epoch, "label": f"e{epoch}", "strength": strength, "prompt_kind": "likeness",
                     "prompt": "photo of sks", "identity": identity, "asked_shown": float("nan")})
        for prompt, value in shown.items():
            rows.append({"epoch": epoch, "label": f"e{epoch}", "strength": strength, "prompt_kind": "adaptability",
                         "prompt": prompt, "identity": float("nan"), "asked_shown": value})
    return pd.DataFrame(rows)


def test_true_verdicts_follow_the_judge_rules():
    red, navy = "photo of sks with red hair", "photo of sks, on a navy background"
    read = _scores({
        (1, 0.0): (0.25, {red: 1.0, navy: 1.0}),   # the base model
        (1, 1.0): (0.40, {red: 1.0, navy: 1.0}),   # gain 0.2 < 0.3: underfit
        (2, 1.0): (0.80, {red: 0.9, navy: 1.0}),   # gain 0.73, adherence held: good
        (3, 1.0): (1.00, {red: 0.5, navy: 1.0}),   # red hair lost: overfit
    })
    table = truth.truth_cells(read, top=1.0, cfg=JudgeConfig())
    got = dict(zip(zip(table.epoch, table.strength), table.true_verdict))
    assert got == {(1, 0.0): "base", (1, 1.0): "underfit", (2, 1.0): "good", (3, 1.0): "overfit"}
    judged = pd.DataFrame({"epoch": [1, 1, 2, 3], "label": ["e1", "e1", "e2", "e3"], "strength": [0.0, 1.0, 1.0, 1.0],
                           "verdict": ["base", "underfit", "good", "good"]})
    result = truth.compare(judged, table, {"epoch": 3, "strength": 1.0})
    assert result["agreement"] == pytest.approx(2 / 3)
    assert result["true_best"] == {"epoch": 2, "strength": 1.0}
    assert result["pick_rank"] == 3  # the overfit cell ranks below every cell that is not

def test_a_cell_exactly_on_the_underfit_bar_is_good_whatever_the_float_error():
    # identity shares of 18 reads: base 5/18, the cell 8/18, references 15/18. The cell is
    # 3/10 of the way, exactly the bar (0.3), which float arithmetic makes 0.29999999999999993.
    assert (8 / 18 - 5 / 18) / (15 / 18 - 5 / 18) < 0.3  # the float error this guards against
    read = _scores({(1, 0.0): (5 / 18, {}), (1, 1.0): (8 / 18, {}), (2, 1.0): (7 / 18, {})})
    table = truth.truth_cells(read, top=15 / 18, cfg=JudgeConfig())
    got = dict(zip(zip(table.epoch, table.strength), table.true_verdict))
    assert got == {(1, 0.0): "base", (1, 1.0): "good", (2, 1.0): "underfit"}
    assert table.true_gain.tolist() == pytest.approx([0.0, 0.3, 0.2])


def test_leakage_flags_the_training_background_where_no_prompt_asks_for_it():
    glasses = "photo of sks wearing glasses"
    read = _scores({(1, 0.0): (0.25, {glasses: 1.0}), (1, 1.0): (0.8, {glasses: 1.0}), (2, 1.0): (0.8, {glasses: 1.0})})
    # the share of images painted with the training drawings' room: base 1 in 3, epoch 1 0.1
    # more (under adherence_drop 0.2 above the base), epoch 2 in every image
    read["leak"] = read.epoch.map({1: 1 / 3, 2: 1.0}) + ((read.epoch == 1) & (read.strength == 1.0)) * 0.1
    read.loc[read.prompt == "photo of sks", "leak"] = float("nan")  # as if this prompt named a background: left out
    table = truth.truth_cells(read, top=1.0, cfg=JudgeConfig())
    got = dict(zip(zip(table.epoch, table.strength), table.leaks))
    assert got == {(1, 0.0): False, (1, 1.0): False, (2, 1.0): True}
    assert table.true_verdict.tolist() == ["base", "good", "good"]  # a flag beside the verdict
    assert table.true_leak.tolist() == pytest.approx([1 / 3, 1 / 3 + 0.1, 1.0])


def test_training_context_is_the_shared_background_no_caption_names(tmp_path):
    readout = assets.load_readout()
    a = world.Attributes(hair_colour="red", hair_style="short", eye_colour="blue", skin="light", face="round",
                         mark="none", glasses=False, hat=False, earrings=False, background="yellow", pattern="plain")
    paths = []
    for i, bg in enumerate(["yellow", "yellow", "yellow", "yellow", "navy"]):
        p = tmp_path / f"{i}.png"
        world.draw(world.replace(a, background=bg), 32).save(p)
        p.with_suffix(".txt").write_text("photo of sks person", encoding="utf-8")
        paths.append(p)
    assert truth.training_context(readout, paths) == {"background": "yellow"}  # 4 of 5 share it
    assert truth.training_context(readout, paths[3:]) is None  # no background shared by 3 in 4
    for p in paths[:3]:  # the captions name the background: not a leak to look for
        p.with_suffix(".txt").write_text("photo of sks person, on a yellow background", encoding="utf-8")
    assert truth.training_context(readout, paths) is None


def test_ranking_captions_change_one_attribute_each_and_say_which():
    rng = random.Random(5)
    for a in quality.heldout(50):
        captions, changed = quality.ranking_captions(a, rng, with_changes=True)
        assert len(captions) == len(set(captions)) == 10 and captions[0] == world.caption(a)
        assert len(changed) == 9 and set(changed) <= set(world.VALUES)
        for text, name in zip(captions[1:], changed):
            assert text != captions[0]
            values = [v for v in world.VALUES[name] if v != getattr(a, name)]
            assert text in {world.caption(world.replace(a, **{name: v})) for v in values}


def test_prompts_map_to_the_attribute_they_ask_for():
    sks = subjects.load("sks")
    assert sks.asked("photo of sks person with red hair") == ("hair_colour", "red")
    assert sks.asked("photo of sks person, on a navy background") == ("background", "navy")
    assert sks.asked("photo of sks person") is None
    assert truth.identity_match({"hair_colour": "purple", "hair_style": "spiky", "eye_colour": "blue",
                                 "mark": "star"}, sks.identity) == 0.75


# The shipped weights (made by `python -m lora_lab.toyworld.pretrain`; tests never retrain them).


def test_shipped_weights_match_their_manifest_and_stay_small():
    info = assets.manifest()
    total = 0
    for name, digest in info["files"].items():
        path = assets.WEIGHTS_DIR / name
        assert pretrain.sha256(path) == digest, f"{name} differs from the manifest"
        total += path.stat().st_size
    assert total < 20 * 2**20
    assert info["command"].startswith("python -m lora_lab.toyworld.pretrain") and info["plan"]["seed"] == 0


def test_shipped_readout_reads_held_out_drawings():
    from lora_lab.toyworld.quality import readout_accuracy

    readout = assets.load_readout()
    accuracy = readout_accuracy(readout, n=300)
    assert min(accuracy.values()) >= 0.95, accuracy


def test_shipped_second_readout_matches_its_record_and_reads_held_out_drawings():
    from lora_lab.toyworld.quality import readout_accuracy

    info = json.loads((assets.WEIGHTS_DIR / "readout2.json").read_text())
    assert pretrain.sha256(assets.WEIGHTS_DIR / "readout2.safetensors") == info["sha256"]
    assert info["command"] == "python -m lora_lab.toyworld.pretrain_readout2" and info["seed"] != 0
    accuracy = readout_accuracy(assets.load_readout2(), n=300)
    assert min(accuracy.values()) >= 0.95, accuracy


def test_second_readout_missing_says_how_to_make_it(tmp_path):
    from lora_lab.errors import ModelError

    with pytest.raises(ModelError, match="python -m lora_lab.toyworld.pretrain_readout2"):
        assets.load_readout2(tmp_path)


@pytest.mark.parametrize("name, template", [("hair_colour", "photo of a person with {} hair"),
                                            ("hair_style", "photo of a person with {} hair"),
                                            ("eye_colour", "photo of a person with {} eyes"),
                                            ("mark", "photo of a person, a {} on the cheek"),
                                            ("background", "photo of a person, on a {} background")])
def test_shipped_clip_scores_the_caption_that_fits_highest(name, template):
    from lora_lab.models.scorers import ClipEmbedder

    clip = ClipEmbedder(ClipScorerConfig(model=nets.CLIP_NAME, pretrained=assets.CLIP_TAG), torch.device("cpu"))
    assert not clip.random and clip.source == f"{nets.CLIP_NAME}/{assets.CLIP_TAG}"
    rng = random.Random(11)
    records = [world.sample(rng) for _ in range(40)]
    images = clip.images([world.draw(a, nets.RESOLUTION) for a in records])
    values = list(world.VALUES[name])
    texts = clip.texts(["photo of a person" if v == "none" else template.format(v) for v in values])
    picked = [values[int(i)] for i in (images @ texts.T).argmax(dim=1)]
    # 40 of 40 measured for each attribute with this seed (seeds 12 and 13: the mark 39 and 38)
    assert sum(p == getattr(a, name) for p, a in zip(picked, records)) >= 38


def test_toyworld_model_draws_what_the_prompt_asks(cache_dir):
    pipe = quality.base_pipe(cache_dir)  # lora_lab's own loading code, A1111's "Euler a"
    readout = assets.load_readout()
    asked = [("red", "blue", "cyan"), ("blue", "green", "yellow"), ("white", "brown", "navy"), ("green", "gray", "pink"),
             ("black", "green", "orange"), ("blonde", "blue", "olive"), ("purple", "brown", "white"),
             ("brown", "gray", "gray")] * 2
    prompts = [f"photo of a person with {h} hair and {e} eyes, on a {b} background" for h, e, b in asked]
    images = pipe(prompts, num_inference_steps=20, guidance_scale=7.0, height=32, width=32,
                       generator=[torch.Generator().manual_seed(i if i < 8 else 92 + i)
                                  for i in range(len(prompts))]).images
    seen = assets.read(readout, images)
    hits = {name: sum(s[name] == a[j] for s, a in zip(seen, asked))
            for j, name in enumerate(["hair_colour", "eye_colour", "background"])}
    # 16 generations: hair colour 16, background 16 and eye colour 14 measured (14 and 15 with
    # two other seed sets; chance is 4)
    assert hits["hair_colour"] + hits["background"] >= 30, hits
    assert hits["eye_colour"] >= 12, hits


def test_toyworld_model_draws_the_hair_style_and_mark_asked_for(cache_dir):
    pipe = quality.base_pipe(cache_dir)  # lora_lab's own loading code, A1111's "Euler a"
    readout = assets.load_readout()
    asked = [(s, m) for s in world.HAIR_STYLES for m in ("star", "mole")] * 4
    prompts = [f"photo of a person with brown {s} hair and blue eyes, a {m} on the cheek, on a white background"
               for s, m in asked]
    images = pipe(prompts, num_inference_steps=20, guidance_scale=7.0, height=32, width=32,
                       generator=[torch.Generator().manual_seed(i if i < 16 else 84 + i)
                                  for i in range(len(prompts))]).images
    seen = assets.read(readout, images)
    style = sum(s["hair_style"] == a[0] for s, a in zip(seen, asked))
    mark = sum(s["mark"] == a[1] for s, a in zip(seen, asked))
    # of 32: style 32 and mark 30 measured (a third set of 16 seeds: 16 and 16); chance 8 and 11
    assert style >= 28 and mark >= 28, (style, mark)


def test_second_readout_training_writes_weights_and_its_record(tmp_path):
    from lora_lab.toyworld import pretrain_readout2

    assert pretrain_readout2.main(["--steps", "2", "--work", str(tmp_path / "work"), "--weights", str(tmp_path)]) == 0
    info = json.loads((tmp_path / "readout2.json").read_text())
    assert info["steps"] == 2 and info["seed"] == 1
    assert info["sha256"] == pretrain.sha256(tmp_path / "readout2.safetensors")
    assert set(assets.load_readout2(tmp_path)(torch.zeros(1, 3, 32, 32))) == set(nets.HEADS)


def test_second_readout_blur_keeps_flat_images_and_softens_edges():
    from lora_lab.toyworld.pretrain_readout2 import blur

    x = torch.zeros(2, 3, 8, 8)
    x[:, :, :, 4:] = 1.0
    out = blur(x, torch.tensor([0.0, 1.0]))
    assert torch.allclose(out[0], x[0], atol=1e-6)  # sigma 0: unchanged
    assert 0.0 < out[1, 0, 0, 3] < 0.5 < out[1, 0, 0, 4] < 1.0  # the edge spreads
    assert torch.allclose(blur(torch.full((1, 3, 8, 8), 0.3), torch.tensor([1.0])), torch.full((1, 3, 8, 8), 0.3))
