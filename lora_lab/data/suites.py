"""Prompt suites: the data files in the top-level ``eval/`` folder (person, object, style)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import yaml

from lora_lab.errors import ConfigError

SUITES_DIR = Path(__file__).resolve().parents[2] / "eval"
KINDS = ("person", "object", "style")


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt, ``{token}`` already filled in.

    Attributes:
        kind: ``likeness`` (should show the subject) or ``adaptability`` (asks for a change).
        text: The prompt given to the pipeline.
        judge: What CLIP scores an adaptability image against (None for likeness prompts).
        index: Position in the suite, stable across runs (used in file names).
        versus: What the subject has instead of the ask (``a photo of a person with long
            hair`` for ``... with short hair``): adherence is then the scorer's probability
            that an image shows the ask rather than this. None: CLIP similarity to ``judge``.
    """

    kind: str
    text: str
    judge: Optional[str]
    index: int
    versus: Optional[str] = None


@dataclass
class Suite:
    name: str
    kind: str
    prompts: List[Prompt]
    negative_prompt: str

    def limited(self, max_prompts: Optional[int]) -> "Suite":
        """The first ``max_prompts`` prompts of each kind (a cheap evaluation)."""
        if not max_prompts:
            return self
        keep = []
        for kind in ("likeness", "adaptability"):
            keep += [p for p in self.prompts if p.kind == kind][:max_prompts]
        return Suite(self.name, self.kind, keep, self.negative_prompt)


DATA = "data"  # eval.suite=data: the suite.yaml that came with the data set


def load_suite(name_or_path: str, token: str, data_suite: Optional[Path] = None) -> Suite:
    """Read a suite by name (``eval/<name>.yaml``), by path, or ``data`` (the data folder's own
    ``suite.yaml``, given as ``data_suite``) and fill in the token.

    Raises:
        ConfigError: naming the file and the problem (unknown suite, missing ``{token}`` ...).
    """
    path = Path(name_or_path)
    if name_or_path == DATA:
        if data_suite is None:
            raise ConfigError("eval.suite: 'data' uses the suite.yaml inside the data folder, and this data "
                              "set has none; name a suite (person, object, style) or a suite file")
        path = Path(data_suite)
    elif path.suffix not in (".yaml", ".yml"):
        path = SUITES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SUITES_DIR.glob("*.yaml")))
        raise ConfigError(f"eval.suite: {name_or_path!r} is not a suite file; built-in suites: {known}, "
                          f"or '{DATA}' for the data folder's own suite.yaml")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"eval suite {path}: not valid YAML ({exc})") from None
    kind = doc.get("kind")
    token = token or doc.get("token")
    if kind not in KINDS:
        raise ConfigError(f"eval suite {path}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not token:
        raise ConfigError("data.token: the evaluation prompts need the trigger word; set data.token=...")
    prompts: List[Prompt] = []
    for i, text in enumerate(doc.get("likeness") or []):
        prompts.append(Prompt("likeness", _fill(path, str(text), token), None, len(prompts)))
    for item in doc.get("adaptability") or []:
        if not isinstance(item, dict) or "prompt" not in item or "judge" not in item:
            raise ConfigError(f"eval suite {path}: each adaptability entry needs 'prompt' and 'judge', got {item!r}")
        versus = item.get("versus")
        if versus is not None and (not isinstance(versus, str) or not versus.strip()
                                   or versus.strip() == str(item["judge"]).strip()):
            raise ConfigError(f"eval suite {path}: 'versus' of {item['prompt']!r} must be a text that differs "
                              f"from its judge text (what the subject has instead of the ask), got {versus!r}")
        prompts.append(Prompt("adaptability", _fill(path, str(item["prompt"]), token), str(item["judge"]),
                              len(prompts), versus))
    if not any(p.kind == "likeness" for p in prompts):
        raise ConfigError(f"eval suite {path}: needs at least one 'likeness' prompt")
    return Suite(path.stem, kind, prompts, str(doc.get("negative_prompt") or ""))


def _fill(path: Path, text: str, token: str) -> str:
    if "{token}" not in text:
        raise ConfigError(f"eval suite {path}: prompt {text!r} has no {{token}} placeholder")
    return text.replace("{token}", token)
