"""Shared entry-point plumbing: Hydra composition, logging, and one-line errors."""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Callable

from lora_lab.config import Config, conf_dir, register, to_config
from lora_lab.errors import ConfigError, LoraLabError


def setup_logging() -> None:
    # Our own lines at INFO; libraries (open_clip logs to the root logger) only when they warn.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
    for ours in ("lora_lab", "__main__"):  # entry modules run as __main__ under python -m
        logging.getLogger(ours).setLevel(logging.INFO)
    for noisy in ("diffusers", "transformers", "httpx", "huggingface_hub", "PIL"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def hydra_entry(task: Callable[[Config], object]) -> Callable[[], None]:
    """Wrap ``task(config)`` as a Hydra main that prints ``error: ...`` and exits 2 on bad input."""
    import hydra
    from omegaconf import DictConfig

    register()

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    def _main(cfg: DictConfig) -> None:
        setup_logging()
        try:
            task(to_config(cfg))
        except LoraLabError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    @functools.wraps(task)
    def run() -> None:
        _main()

    return run


def compose(overrides: list[str] | None = None) -> Config:
    """Compose ``conf/config.yaml`` with overrides, as the command line would (tests use this)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from hydra.errors import ConfigCompositionException

    register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        try:
            cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
        except ConfigCompositionException as exc:
            cause = f": {exc.__cause__}".splitlines()[0] if exc.__cause__ else ""
            raise ConfigError(f"{exc}{cause}") from None
    return to_config(cfg)
