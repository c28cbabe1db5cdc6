"""The one exception type users see: a sentence that names the file or key and what is allowed."""


class LoraLabError(Exception):
    """Bad input or an impossible request, reported before any work starts."""


class ConfigError(LoraLabError):
    """A config value is out of range or unknown."""


class DataError(LoraLabError):
    """A dataset file or folder cannot be used."""


class ModelError(LoraLabError):
    """A base model cannot be found or loaded."""


class TrainingError(LoraLabError):
    """Training had to stop (NaN loss, missing optional package, no CUDA)."""


def first_line(exc: BaseException) -> str:
    """An error's first line (its class name when it has no message): for one-sentence reports."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else exc.__class__.__name__
