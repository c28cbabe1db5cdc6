"""Question-answering adherence (eval.adherence=vqa): the plumbing, on a tiny random LLaVA saved
locally (its answers mean nothing; the path from images and asks to P(yes) to verdicts does)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from PIL import Image

from lora_lab.config import EvalConfig, VqaScorerConfig
from lora_lab.errors import ConfigError
from lora_lab.models.vqa import YesNoScorer

WORDS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:", "Yes", "No", "yes", "no", "Does",
         "this", "image", "show", "a", "photo", "of", "person", "with", "red", "short", "long", "hair", "woman",
         "Answer", "or"]
TEMPLATE = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
            "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}ASSISTANT:")


@pytest.fixture(scope="module")
def tiny_vqa(tmp_path_factory):
    """A LLaVA of a few thousand random weights, its processor, tokenizer and chat template,
    saved as a transformers folder with safetensors weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", additional_special_tokens=["<image>"])
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=16, projection_dim=16)
    text = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                       bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=4,
                                                      vision_feature_select_strategy="default"))
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                  crop_size={"height": 32, "width": 32}),
                               tokenizer=fast, patch_size=16, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=TEMPLATE)
    out = tmp_path_factory.mktemp("tiny-vqa")
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


def test_p_yes_is_the_next_token_probability_of_yes_batched_as_alone(tiny_vqa):
    scorer = YesNoScorer(VqaScorerConfig(model=str(tiny_vqa), batch_size=3), torch.device("cpu"))
    assert scorer.prompt("a photo of a person with red hair") == (
        "USER: <image> Does this image show a photo of a person with red hair? Answer yes or no. ASSISTANT:")
    images = [Image.new("RGB", (48, 40), c) for c in ("red", "navy", "white")]
    asks = ["a photo of a person with red hair", "a photo of a person with short hair", "a photo"]
    batched = scorer.yes(images, asks)  # different lengths: left padding in one batch
    alone = [scorer.yes([im], [a])[0] for im, a in zip(images, asks)]
    assert batched == pytest.approx(alone, abs=1e-5)
    # by hand: the model's next-token distribution after the question, at "Yes" and "yes"
    inputs = scorer.processor(images=[images[0]], text=[scorer.prompt(asks[0])], return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(scorer.model(**inputs).logits[0, -1].float(), dim=-1)
    assert scorer.yes_ids == [WORDS.index("Yes"), WORDS.index("yes")]
    assert batched[0] == pytest.approx(float(probs[WORDS.index("Yes")] + probs[WORDS.index("yes")]), abs=1e-6)
    assert all(0 < p < 1 for p in batched)


def test_only_safetensors_weights_are_loaded(tiny_vqa, tmp_path):
    import shutil

    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_vqa, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"eval.vqa.model: cannot load .* safetensors"):
        YesNoScorer(VqaScorerConfig(model=str(pickled)), torch.device("cpu"))


def test_vqa_needs_a_model_and_a_judge_placeholder():
    with pytest.raises(ConfigError, match="eval.vqa.model: eval.adherence=vqa needs a question-answering model"):
        EvalConfig(adherence="vqa")
    with pytest.raises(ConfigError, match=r"eval.vqa.question: must contain \{judge\}"):
        VqaScorerConfig(question="Is it good?")
    with pytest.raises(ConfigError, match="eval.adherence"):
        EvalConfig(adherence="vibes")


def test_an_evaluation_with_vqa_adherence_scores_judges_and_says_so(base, cache_dir, demo_dir, tiny_vqa, tmp_path):
    """The whole evaluate path with eval.adherence=vqa: every adaptability image gets P(yes),
    the verdicts use it, and the notes say which adherence ran."""
    from conftest import make_config
    from lora_lab.config import ClipScorerConfig, FaceScorerConfig
    from lora_lab.data.dataset import load_dataset
    from lora_lab.evaluate.run import evaluate
    from lora_lab.train.loop import train

    cfg = make_config(cache_dir, tmp_path, epochs=1)
    cfg.data.token = "sks woman"
    cfg.eval = EvalConfig(strengths=[1.0, 0.0], steps=2, seeds=[11, 22], max_prompts=1, size=32,
                          face=FaceScorerConfig(pretrained=None),
                          clip=ClipScorerConfig(model="lora-lab-tiny-clip", pretrained=None),
                          adherence="vqa", vqa=VqaScorerConfig(model=str(tiny_vqa), batch_size=4))
    ds = load_dataset(cfg.data, cache_dir)
    train(cfg, base, ds, tmp_path)
    result = evaluate(cfg, base, ds, tmp_path / "lora", tmp_path / "ev", progress=False)
    scores = pd.read_csv(tmp_path / "ev" / "scores.csv")
    asked = scores[scores.prompt_kind == "adaptability"]
    assert len(asked) == 4 and (asked.ask_method == "vqa").all() and asked.ask_prob.between(0, 1).all()
    assert scores[scores.prompt_kind == "likeness"].ask_prob.isna().all()
    assert any(n.startswith("adherence: question answering, P(yes)") for n in result.verdict["notes"])
    cell = result.judged[result.judged.strength == 1.0].iloc[0]
    assert cell["ask::photo of sks woman with red hair"] == pytest.approx(asked[asked.strength == 1.0].ask_prob.mean())


def test_a_lost_ask_by_question_answering_is_said_as_an_answer():
    from lora_lab.config import JudgeConfig
    from lora_lab.evaluate.judge import aggregate, judge

    rows = []
    for strength, probs in ((0.0, (0.9, 0.8)), (1.0, (0.2, 0.6))):
        for seed, p in enumerate(probs):
            common = {"epoch": 1, "label": "a", "strength": strength, "seed": seed, "face_detected": True,
                      "face_likeness": 0.5, "clip_i": 0.5, "clip_i_max": 0.6, "closest_reference": "r.png",
                      "diversity": 0.2}
            rows += [{**common, "prompt_kind": "likeness", "prompt": "photo of sks", "clip_adherence": float("nan"),
                      "ask_prob": float("nan"), "ask_method": None, "judge": None, "versus": None},
                     {**common, "prompt_kind": "adaptability", "prompt": "photo of sks with short hair",
                      "clip_adherence": 25.0, "ask_prob": p, "ask_method": "vqa",
                      "judge": "a photo of a person with short hair", "versus": None}]
    cell = judge(aggregate(pd.DataFrame(rows), "person"), 0.8, JudgeConfig()).set_index("strength").loc[1.0]
    assert cell.reasons == ["asked short hair; the answer is no in 1 of 2 seeds (P(yes) 0.40); base model: "
                            "yes in 2 of 2 (P 0.85)"]
