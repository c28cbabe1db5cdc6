"""A judge YAML file (what ``python -m lora_lab.calibrate`` writes) as threshold values, so
``eval.judge=path/to/judge.yaml`` on any command line sets the judge from it."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Dict, List

from lora_lab.config.evaluation import JudgeConfig
from lora_lab.errors import ConfigError

JUDGE_KEY = "eval.judge"


def judge_values(path: Path, key: str = JUDGE_KEY) -> Dict[str, float]:
    """The thresholds in ``path`` (a mapping of JudgeConfig's keys; a top-level ``judge:`` or
    ``eval: {judge: ...}`` is looked through). One sentence naming the file when it cannot be used."""
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}: no judge file {path}; give a YAML file python -m lora_lab.calibrate wrote")
    try:
        node = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as exc:  # YAML syntax: one line
        raise ConfigError(f"{key}: cannot read {path} as YAML ({str(exc).splitlines()[0]})") from None
    for outer in ("eval", "judge"):
        if isinstance(node, dict) and set(node) == {outer}:
            node = node[outer]
    allowed = [f.name for f in fields(JudgeConfig)]
    if not isinstance(node, dict) or not node:
        raise ConfigError(f"{key}: {path} holds no thresholds; expected keys among {', '.join(allowed)}")
    unknown = [k for k in node if k not in allowed]
    if unknown:
        raise ConfigError(f"{key}: {path} has {', '.join(map(repr, unknown))}, not a judge setting; "
                          f"allowed: {', '.join(allowed)}")
    JudgeConfig(**node)  # the ranges checked here, with the key's own message
    return node


def expand(overrides: List[str]) -> List[str]:
    """``eval.judge=FILE.yaml`` replaced by one ``eval.judge.<key>=<value>`` override per
    threshold in the file (so each counts as given explicitly, over a model preset's)."""
    out = []
    for item in overrides:
        key, _, value = item.partition("=")
        if key.lstrip("+") == JUDGE_KEY and value.strip("'\"").lower().endswith((".yaml", ".yml")):
            out += [f"{JUDGE_KEY}.{k}={v}" for k, v in judge_values(Path(value.strip("'\""))).items()]
        else:
            out.append(item)
    return out
