"""Per-step caption processing with kohya sd-scripts' meaning (train_util.process_caption).

In order: the whole caption is dropped (trained as "") with ``caption_dropout_rate``; else the
tags (split on commas) are shuffled with ``shuffle_caption``, keeping the first
``keep_tokens`` tags in place (or, with ``keep_tokens_separator``, everything before the
separator, and everything after a second one at the end); then each movable tag is dropped
with ``caption_tag_dropout_rate``. ``caption_prefix`` / ``caption_suffix`` are part of the
caption as read (joined with a space), so they are kept, shuffled and dropped as kohya does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class CaptionRule:
    """A subset's per-step caption options, by kohya's names."""

    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0

    @property
    def varies(self) -> bool:
        """Whether the caption can differ between steps (then it is encoded every step)."""
        return self.shuffle_caption or self.caption_dropout_rate > 0 or self.caption_tag_dropout_rate > 0


def _tags(text: str) -> list:
    return [t.strip() for t in text.split(",") if t.strip()]


def process(caption: str, rule: CaptionRule, rng: random.Random) -> str:
    """The caption one training step sees."""
    if rule.caption_dropout_rate > 0 and rng.random() < rule.caption_dropout_rate:
        return ""
    if not (rule.shuffle_caption or rule.caption_tag_dropout_rate > 0):
        return caption
    suffix: list = []
    if rule.keep_tokens_separator and rule.keep_tokens_separator in caption:
        fixed_part, flex_part = caption.split(rule.keep_tokens_separator, 1)
        if rule.keep_tokens_separator in flex_part:
            flex_part, suffix_part = flex_part.split(rule.keep_tokens_separator, 1)
            suffix = _tags(suffix_part)
        fixed, flex = _tags(fixed_part), _tags(flex_part)
    else:
        tags = _tags(caption)
        fixed, flex = tags[: rule.keep_tokens], tags[rule.keep_tokens :]
    if rule.shuffle_caption:
        rng.shuffle(flex)
    if rule.caption_tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= rule.caption_tag_dropout_rate]
    return ", ".join(fixed + flex + suffix)


def shuffle_caption(caption: str, keep_tokens: int, rng: random.Random) -> str:
    """kohya's shuffle_caption: shuffle comma-separated tags, the first ``keep_tokens`` fixed."""
    return process(caption, CaptionRule(shuffle_caption=True, keep_tokens=keep_tokens), rng)
