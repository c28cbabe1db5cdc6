"""Shared entry-point plumbing: Hydra composition, logging, and one-line errors."""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Callable, Dict, List, Tuple

from lora_lab.config import Config, conf_dir, explicit_keys, register, to_config
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


# A sweep's tables, given whole on the command line (`sweep.grid={train.text_encoder_lr:[1e-3,3e-3]}`),
# replace the sweep file's table, keys the file never named included. Hydra itself would merge
# into the file's table and refuse a new key ("not in struct"); `++sweep.grid={...}` still merges.
TABLES = ("sweep.grid", "sweep.fixed", "sweep.space", "sweep.variants")


def split_tables(overrides: List[str]) -> Tuple[List[str], Dict[str, dict]]:
    """Take ``sweep.grid=...``-style overrides out of a Hydra override list.

    Returns:
        (the other overrides, {"sweep.grid": parsed table, ...}).

    Raises:
        ConfigError: when the value is not a table (``{key: value, ...}``).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from lora_lab.config.judge_file import expand

    rest, tables = [], {}
    for item in expand(overrides):  # eval.judge=FILE.yaml -> one override per threshold
        key = item.split("=", 1)[0]
        if key not in TABLES:
            rest.append(item)
            continue
        try:
            value = OverridesParser.create().parse_override(item).value()
        except HydraException as exc:
            raise ConfigError(f"{key}: cannot read {item.split('=', 1)[1]!r}: {str(exc).splitlines()[0]}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: give a table like {{train.network_dim:[8,32]}}, got {item.split('=', 1)[1]!r}")
        tables[key] = value
    return rest, tables


def apply_tables(cfg, tables: Dict[str, dict]):
    """Put whole tables from :func:`split_tables` into a composed config."""
    from omegaconf import open_dict

    if tables and cfg.get("sweep") is None:
        raise ConfigError(f"{next(iter(tables))}: no sweep chosen; add +sweep=NAME")
    with open_dict(cfg):
        for key, value in tables.items():
            cfg.sweep[key.split(".", 1)[1]] = value
    return cfg


def hydra_entry(task: Callable[[Config], object], command: str) -> Callable[[], None]:
    """Wrap ``task(config)`` as a Hydra main that prints ``error: ...`` and exits 2 on bad input.

    Args:
        task: What the command does with the validated config.
        command: The module users type after ``python -m`` (``lora_lab.sweep``), named in errors.
    """
    import hydra
    from omegaconf import DictConfig

    register()
    tables: Dict[str, dict] = {}
    explicit: List[str] = []

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    def _main(cfg: DictConfig) -> None:
        setup_logging()
        try:
            task(to_config(apply_tables(cfg, tables), explicit))
        except LoraLabError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except Exception as exc:  # a library's error: one sentence here, the trace in a file
            print(f"error: {unexpected(exc, command, cfg)}", file=sys.stderr)
            sys.exit(1)

    @functools.wraps(task)
    def run() -> None:
        try:
            rest, found = split_tables(sys.argv[1:])
        except LoraLabError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        tables.update(found)
        explicit.extend(explicit_keys(rest + list(found)))
        sys.argv[1:] = rest
        _main()

    return run


def unexpected(exc: BaseException, command: str, cfg) -> str:
    """The sentence for an error no check foresaw (a library's, mid-run): what stopped, the
    cause's first line, and the log file the full trace was written to."""
    import time
    import traceback
    from pathlib import Path

    name = command.rsplit(".", 1)[-1]
    folder = Path(str(cfg.get("cache_dir") or "sweeps/.cache")).expanduser().parent / "logs"
    log_file = folder / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    trace = "".join(traceback.format_exception(exc))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        log_file.write_text(f"python -m {command} {' '.join(sys.argv[1:])}\n\n{trace}", encoding="utf-8")
        where = f"the full trace is in {log_file}"
    except OSError:
        where = "the trace could not be written to a file:\n" + trace
    first = (str(exc).strip().splitlines() or [""])[0]
    cause = f"{exc.__class__.__name__}: {first}" if first else exc.__class__.__name__
    context = "".join(f" ({note})" for note in getattr(exc, "__notes__", []))
    return f"{name} stopped on an unexpected error from a library{context}: {cause}; {where}"


def exit_now(code: int = 0) -> None:
    """End a finished command at once: flush the logs and streams, then skip the interpreter's
    teardown of torch and the other libraries (about 2 s on 2 cores). Only after every file has
    been written and closed, and only from a command's ``main``."""
    import logging
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def compose(overrides: list[str] | None = None) -> Config:
    """Compose ``conf/config.yaml`` with overrides, as the command line would (tests use this)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import ConfigCompositionException

    register()
    rest, tables = split_tables(list(overrides or []))
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        try:
            cfg = hydra_compose(config_name="config", overrides=rest)
        except ConfigCompositionException as exc:
            cause = f": {exc.__cause__}".splitlines()[0] if exc.__cause__ else ""
            raise ConfigError(f"{exc}{cause}") from None
    return to_config(apply_tables(cfg, tables), explicit_keys(rest + list(tables)))
