"""Caption a folder of training images with an image-to-text model, as the kohya GUI guide and
most LoRA write-ups do before training (BLIP first, then edit by hand).

``python -m lora_lab.caption PATH model=Salesforce/blip-image-captioning-large token=sks``
writes ``<image>.txt`` (kohya's caption file; ``extension=.caption`` for another) beside each
image, the token in front: ``sks, a woman with red hair smiling``. An existing caption is never
overwritten unless ``overwrite=true``. ``model`` is a hub id (from the local Hugging Face cache
when offline) or a local folder; any transformers image-text-to-text model works (BLIP, BLIP-2,
GIT, Florence-2 with ``prompt="<MORE_DETAILED_CAPTION>"``). Weights load from safetensors only.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List, Optional

from lora_lab.data.dataset import IMAGE_EXTENSIONS
from lora_lab.errors import LoraLabError
from lora_lab.images import open_rgb

OPTIONS = {"model": None, "token": "", "extension": ".txt", "overwrite": "false", "prompt": "", "max_new_tokens": "40",
           "batch_size": "8"}
_DEFAULT_PROMPTS = {"florence2": "<MORE_DETAILED_CAPTION>"}


USAGE = ("usage: python -m lora_lab.caption PATH model=HUB_ID_OR_FOLDER [token=sks] "
         "[extension=.txt] [overwrite=false] [prompt=...] [max_new_tokens=40]")


def parse(args: List[str]) -> tuple[Path, Dict[str, str]]:
    """PATH and key=value options; an unknown key or a missing model is one sentence."""
    if not args or "=" in args[0]:
        raise LoraLabError(USAGE)
    opts = dict(OPTIONS)
    for item in args[1:]:
        key, sep, value = item.partition("=")
        if not sep or key not in OPTIONS:
            raise LoraLabError(f"caption: {item!r} is not an option; allowed: {', '.join(f'{k}=...' for k in OPTIONS)}")
        opts[key] = value
    if not opts["model"]:
        raise LoraLabError("caption: model=... is needed: a hub id (e.g. Salesforce/blip-image-captioning-large) "
                           "or a local folder of an image-to-text model")
    if not opts["extension"].startswith("."):
        raise LoraLabError(f"caption: extension must start with a dot, like .txt; got {opts['extension']!r}")
    if opts["overwrite"].lower() not in ("true", "false"):
        raise LoraLabError(f"caption: overwrite must be true or false, got {opts['overwrite']!r}")
    for key in ("max_new_tokens", "batch_size"):
        if not opts[key].isdigit() or int(opts[key]) < 1:
            raise LoraLabError(f"caption: {key} must be a whole number >= 1, got {opts[key]!r}")
    return Path(args[0]).expanduser(), opts


def images_in(path: Path) -> List[Path]:
    """Every image under ``path`` (a kohya parent folder or one image folder), sorted."""
    if not path.is_dir():
        raise LoraLabError(f"caption: {path} is not a folder")
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not found:
        raise LoraLabError(f"caption: {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return found


class Captioner:
    """A transformers image-text-to-text model and its processor, loaded once."""

    def __init__(self, source: str, prompt: str = "", max_new_tokens: int = 40):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(source)
            self.model = AutoModelForImageTextToText.from_pretrained(source, use_safetensors=True).eval()
        except (OSError, ValueError) as exc:
            hint = " (this machine may be offline: download it once, or give a local folder)" \
                if not Path(source).exists() else ""
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise LoraLabError(f"caption: could not load model {source}{hint}: {first}") from None
        self.prompt = prompt or _DEFAULT_PROMPTS.get(self.model.config.model_type, "")
        self.max_new_tokens = max_new_tokens

    def __call__(self, images) -> List[str]:
        import torch

        kwargs = {"images": list(images), "return_tensors": "pt"}
        if self.prompt:
            kwargs["text"] = [self.prompt] * len(images)
        inputs = self.processor(**kwargs)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [_clean(t, self.prompt) for t in texts]


def _clean(text: str, prompt: str) -> str:
    text = " ".join(text.split())
    if prompt and text.lower().startswith(prompt.lower()):
        text = text[len(prompt):].strip()
    return text


def caption_folder(path: Path, opts: Dict[str, str], captioner: Optional[Captioner] = None,
                   echo=print) -> Dict[str, int]:
    """Write the caption files; returns counts of written and kept (already captioned) images."""
    files = images_in(path)
    overwrite = opts["overwrite"].lower() == "true"
    todo = [p for p in files if overwrite or not p.with_suffix(opts["extension"]).exists()]
    kept = len(files) - len(todo)
    if kept:
        echo(f"keeping {kept} existing caption{'s' if kept > 1 else ''} (overwrite=true replaces them)")
    if not todo:
        return {"written": 0, "kept": kept}
    captioner = captioner or Captioner(opts["model"], opts["prompt"], int(opts["max_new_tokens"]))
    from tqdm.auto import tqdm

    size = int(opts["batch_size"])
    written = 0
    with tqdm(total=len(todo), desc="captioning", unit="img") as bar:
        for i in range(0, len(todo), size):
            chunk = todo[i : i + size]
            texts = captioner([open_rgb(p) for p in chunk])
            for image, text in zip(chunk, texts):
                line = ", ".join(t for t in (opts["token"].strip(), text) if t)
                target = image.with_suffix(opts["extension"])
                tmp = target.with_name(f".{target.name}.tmp")
                tmp.write_text(line + "\n", encoding="utf-8")
                tmp.replace(target)
                written += 1
            bar.update(len(chunk))
    return {"written": written, "kept": kept}


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] in (["-h"], ["--help"]):
        print(USAGE + "\n\n" + __doc__.strip())
        return 0
    try:
        path, opts = parse(args)
        counts = caption_folder(path, opts)
    except LoraLabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"captions: {counts['written']} written, {counts['kept']} kept, in {path}")
    if counts["written"]:
        print("read them and fix what the model got wrong before training: a caption names what should "
              "NOT become part of the trigger token (clothes, background, expression)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
