"""Question-answering adherence (``eval.adherence=vqa``): a transformers image-text-to-text
model is asked, for each image, whether it shows the ask ("Does this image show a photo of a
person with short hair? Answer yes or no."), and adherence is its probability of answering
yes: the next-token probability of "Yes" after the question (VQAScore, Lin et al., ECCV 2024).
Unlike a CLIP similarity it has an answer, so a small lost change (the subject's long hair
kept where short hair was asked) shows as a low probability.

Any model ``AutoModelForImageTextToText`` and ``AutoProcessor`` load (LLaVA, Idefics3,
SmolVLM, PaliGemma, Qwen2-VL ...), from a local folder or the hub, with safetensors weights
only (``use_safetensors=True``: a pickled checkpoint is refused, not loaded).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import torch
from PIL import Image

from lora_lab.config import VqaScorerConfig
from lora_lab.errors import ConfigError

YES = ("Yes", "yes", " Yes", " yes")  # spellings whose first token counts as "yes"


class YesNoScorer:
    """P(yes) of a question-answering model, batched, left-padded so every row's last
    position is where its answer begins."""

    def __init__(self, cfg: VqaScorerConfig, device: torch.device):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.cfg = cfg
        self.device = device
        source = str(Path(cfg.model).expanduser()) if Path(cfg.model).expanduser().exists() else cfg.model
        try:
            self.processor = AutoProcessor.from_pretrained(source)
            self.model = AutoModelForImageTextToText.from_pretrained(source, use_safetensors=True).eval().to(device)
        except (OSError, ValueError, EnvironmentError) as exc:
            raise ConfigError(f"eval.vqa.model: cannot load {cfg.model!r} as a transformers image-text-to-text "
                              f"model with safetensors weights: {str(exc).splitlines()[0]}") from None
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"
        ids = {self.tokenizer(word, add_special_tokens=False).input_ids[:1][0] for word in YES
               if self.tokenizer(word, add_special_tokens=False).input_ids}
        unk = getattr(self.tokenizer, "unk_token_id", None)
        self.yes_ids = sorted(i for i in ids if i != unk)
        if not self.yes_ids:
            raise ConfigError(f"eval.vqa.model: {cfg.model!r}'s tokenizer has no token for 'yes'")
        self.source = f"{cfg.model} (VQA: P(yes))"

    def prompt(self, judge: str) -> str:
        question = self.cfg.question.replace("{judge}", judge)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return question

    @torch.no_grad()
    def yes(self, images: Sequence[Image.Image], judges: Sequence[str]) -> List[float]:
        """P(yes) for each (image, judge text), in batches of ``batch_size``."""
        out: List[float] = []
        step = self.cfg.batch_size
        for i in range(0, len(images), step):
            texts = [self.prompt(j) for j in judges[i : i + step]]
            batch = self.processor(images=[im.convert("RGB") for im in images[i : i + step]], text=texts,
                                   return_tensors="pt", padding=True).to(self.device)
            logits = self.model(**batch).logits[:, -1, :].float()
            probs = torch.softmax(logits, dim=-1)[:, self.yes_ids].sum(dim=-1)
            out += [float(p) for p in probs.cpu()]
        return out
