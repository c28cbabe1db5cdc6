"""Subjects of the toy world as data: one YAML file each in ``subjects/``.

A subject file says who the subject is (``identity``: the attributes that make it itself, read
back by the read-out as the true likeness), what else every drawing shares (``fixed``), what
changes between drawings (``vary``), which parts the captions name besides the token
(``caption``), and the evaluation prompts: ``likeness`` prompts and ``asks``, adaptability
prompts with the attribute value each asks for (the truth of "with red hair" is the hair
colour the read-out sees). ``data=toyworld data.subject=NAME`` trains on it; adding a subject
is adding a file.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import yaml

from lora_lab.errors import ConfigError
from lora_lab.files import publish_dir
from lora_lab.toyworld import world

SUBJECTS_DIR = Path(__file__).resolve().parent / "subjects"
DEFAULT = "sks"
SIZE = world.SIZE
VALUES = {"hair_colour": tuple(world.HAIR_COLOURS), "hair_style": world.HAIR_STYLES,
           "eye_colour": tuple(world.EYE_COLOURS), "skin": tuple(world.SKIN_TONES), "face": world.FACE_SHAPES,
           "mark": world.MARKS, "background": tuple(world.BACKGROUNDS), "pattern": world.PATTERNS,
           "glasses": (True, False), "hat": (True, False), "earrings": (True, False)}
_ACCESSORIES = ("glasses", "hat", "earrings")
_CAPTION_PARTS = ("wearing", "background")


@dataclass(frozen=True)
class Subject:
    """One subject file, checked."""

    name: str
    token: str
    images: int
    repeats: int
    seed: int
    identity: Dict[str, object]
    fixed: Dict[str, object]
    vary: Dict[str, object]
    caption: Tuple[str, ...]
    likeness: Tuple[str, ...]
    asks: Tuple[dict, ...]
    digest: str

    def drawings(self) -> List[world.Attributes]:
        """The training drawings: identity and fixed attributes kept, the rest varied."""
        rng = random.Random(self.seed)
        base = world.Attributes(**{**_DEFAULTS, **self.fixed, **self.identity})
        backgrounds = _as_list(self.vary.get("background", base.background))
        patterns = _as_list(self.vary.get("pattern", base.pattern))
        out = []
        for i in range(self.images):
            # The draw order (pattern, glasses, hat, earrings, pose) is fixed: a subject's drawings
            # depend only on its file.
            changes = {"background": backgrounds[i % len(backgrounds)], "pattern": rng.choice(patterns)}
            for name in _ACCESSORIES:
                p = self.vary.get(name)
                drawn = rng.random()
                if isinstance(p, (int, float)) and not isinstance(p, bool):
                    changes[name] = drawn < p
            dx, dy = rng.randint(-3, 3), rng.randint(-2, 2)
            if self.vary.get("pose", True):
                changes.update(dx=dx, dy=dy)
            changes = {k: v for k, v in changes.items() if k not in self.identity and k not in self.fixed
                       or k in ("dx", "dy")}
            out.append(replace(base, **changes))
        return out

    def caption_of(self, a: world.Attributes) -> str:
        """kohya-style: the token, then only the parts this subject's captions name."""
        parts = [f"photo of {self.token}"]
        wearing = [w for w, on in (("glasses", a.glasses), ("a hat", a.hat), ("earrings", a.earrings)) if on]
        if "wearing" in self.caption and wearing:
            parts.append("wearing " + " and ".join(wearing))
        if "background" in self.caption:
            parts.append(f"on a {a.background} background" + ("" if a.pattern == "plain" else f" with {a.pattern}"))
        return ", ".join(parts)

    def suite(self) -> dict:
        """The prompt suite (lora_lab's suite format) that evaluates this subject; each ask's
        ``versus`` is what the subject has instead (its own :meth:`versus`)."""
        adaptability = []
        for a in self.asks:
            item = {"prompt": a["prompt"], "judge": a["judge"]}
            versus = a.get("versus") or self.versus(a)
            if versus:
                item["versus"] = versus
            adaptability.append(item)
        return {"kind": "object", "token": self.token, "likeness": list(self.likeness),
                "adaptability": adaptability, "negative_prompt": ""}

    def own(self, attribute: str):
        """The subject's own value of ``attribute`` in every drawing, or None when it varies."""
        if attribute in self.identity:
            return self.identity[attribute]
        if attribute in self.fixed:
            return self.fixed[attribute]
        varied = self.vary.get(attribute)
        if isinstance(varied, (list, tuple)) and len(set(varied)) == 1:
            return varied[0]
        if varied is None and attribute in _DEFAULTS and attribute not in _ACCESSORIES:
            return _DEFAULTS[attribute]
        return None

    def versus(self, ask: dict) -> Optional[str]:
        """The ask's judge text with the asked value replaced by the subject's own ("photo of a
        person with brown eyes" -> "... with blue eyes" for blue-eyed dax); None when the
        subject's value varies between drawings, equals the ask, or is not a word of the text."""
        own, value = self.own(ask["attribute"]), ask["value"]
        if own is None or own == value or isinstance(value, bool):
            return None
        judge = ask["judge"]
        pattern = re.compile(rf"\b{re.escape(str(value))}\b")
        if len(pattern.findall(judge)) != 1:
            return None
        return pattern.sub(str(own), judge)

    def asked(self, prompt: str) -> Optional[Tuple[str, object]]:
        """What an adaptability prompt (token filled in) asks for, as (attribute, value)."""
        for a in self.asks:
            if a["prompt"].replace("{token}", self.token) == prompt:
                return a["attribute"], a["value"]
        return None

    @property
    def folder_name(self) -> str:
        return f"{self.repeats}_{self.token}"


_DEFAULTS = dict(hair_colour="brown", hair_style="short", eye_colour="brown", skin="light", face="oval",
                 mark="none", glasses=False, hat=False, earrings=False, background="white", pattern="plain")


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def names() -> List[str]:
    return sorted(p.stem for p in SUBJECTS_DIR.glob("*.yaml"))


def subject_path(name: str) -> Path:
    path = Path(name)
    return path if path.suffix in (".yaml", ".yml") else SUBJECTS_DIR / f"{name}.yaml"


def load(name: Optional[str] = None) -> Subject:
    """Read and check a subject file by name (``subjects/<name>.yaml``) or path.

    Raises:
        ConfigError: naming the file, the key and what is allowed.
    """
    path = subject_path(name or DEFAULT)
    if not path.is_file():
        raise ConfigError(f"data.subject: no toy-world subject {name!r} (available: {', '.join(names())}; "
                          f"or a path to a subject .yaml file)")
    text = path.read_text(encoding="utf-8")
    doc = yaml.safe_load(text) or {}
    where = f"subject file {path}"
    known = {"token", "images", "repeats", "seed", "identity", "fixed", "vary", "caption", "likeness", "asks"}
    extra = set(doc) - known
    if extra:
        raise ConfigError(f"{where}: unknown key {sorted(extra)[0]!r} (allowed: {', '.join(sorted(known))})")
    for key in ("token", "identity", "asks"):
        if not doc.get(key):
            raise ConfigError(f"{where}: {key!r} is missing")
    identity, fixed = dict(doc["identity"]), dict(doc.get("fixed") or {})
    for section, table in (("identity", identity), ("fixed", fixed)):
        for k, v in table.items():
            _check_value(where, f"{section}.{k}", k, v)
    vary = dict(doc.get("vary") or {})
    for k, v in vary.items():
        if k == "pose":
            continue
        if k in _ACCESSORIES:
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1:
                raise ConfigError(f"{where}: vary.{k} must be a probability in [0, 1], got {v!r}")
            continue
        if k not in ("background", "pattern"):
            raise ConfigError(f"{where}: vary.{k}: only background, pattern, glasses, hat, earrings and pose vary")
        for item in _as_list(v):
            _check_value(where, f"vary.{k}", k, item)
    caption = tuple(doc.get("caption", _CAPTION_PARTS))
    for part in caption:
        if part not in _CAPTION_PARTS:
            raise ConfigError(f"{where}: caption part {part!r} unknown (allowed: {', '.join(_CAPTION_PARTS)})")
    asks = []
    for i, a in enumerate(doc["asks"]):
        missing = {"prompt", "judge", "attribute", "value"} - set(a)
        if set(a) - {"prompt", "judge", "attribute", "value", "versus"}:
            raise ConfigError(f"{where}: asks[{i}]: unknown key {sorted(set(a) - {'prompt', 'judge', 'attribute', 'value', 'versus'})[0]!r}")
        if missing:
            raise ConfigError(f"{where}: asks[{i}] needs {', '.join(sorted(missing))}")
        if "{token}" not in a["prompt"]:
            raise ConfigError(f"{where}: asks[{i}].prompt must contain {{token}}: {a['prompt']!r}")
        _check_value(where, f"asks[{i}].value", a["attribute"], a["value"])
        asks.append(dict(a))
    likeness = tuple(doc.get("likeness") or ["photo of {token}"])
    return Subject(name=path.stem, token=str(doc["token"]), images=int(doc.get("images", 16)),
                   repeats=int(doc.get("repeats", 10)), seed=int(doc.get("seed", 0)), identity=identity,
                   fixed=fixed, vary=vary, caption=caption, likeness=likeness, asks=tuple(asks),
                   digest=hashlib.sha256(text.encode()).hexdigest()[:10])


def _check_value(where: str, key: str, attribute: str, value) -> None:
    if attribute not in VALUES:
        raise ConfigError(f"{where}: {key}: unknown attribute {attribute!r} (allowed: {', '.join(VALUES)})")
    if value not in VALUES[attribute]:
        allowed = ", ".join(str(v) for v in VALUES[attribute])
        raise ConfigError(f"{where}: {key}: {value!r} is not a {attribute} of the toy world (allowed: {allowed})")


def data_folder(cache_dir: Path, name: Optional[str] = None) -> Path:
    """A kohya parent folder for one subject, written once under ``cache_dir``:
    ``<repeats>_<token>/`` with its drawings and captions, ``suite.yaml`` (its evaluation
    prompts) and ``subject.yaml`` (a copy of the file it was drawn from)."""
    subject = load(name)
    source = subject_path(name or DEFAULT)

    def build(tmp: Path) -> None:
        folder = tmp / subject.folder_name
        folder.mkdir()
        for i, a in enumerate(subject.drawings()):
            world.draw(a, SIZE).save(folder / f"{i:02d}.png")
            (folder / f"{i:02d}.txt").write_text(subject.caption_of(a) + "\n", encoding="utf-8")
        (tmp / "suite.yaml").write_text(yaml.safe_dump(subject.suite(), sort_keys=False), encoding="utf-8")
        (tmp / "subject.yaml").write_text(source.read_text(encoding="utf-8"), encoding="utf-8")

    target = Path(cache_dir) / "toyworld-v7" / f"{subject.name}-{subject.digest}"
    return publish_dir(target, build, "subject.yaml")
