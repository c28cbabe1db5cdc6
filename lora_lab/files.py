"""Atomic file writes: every file a later stage reads appears whole or not at all."""

from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Optional


def _modes() -> tuple:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask, 0o777 & ~mask


# What open() and mkdir() would give under the user's umask (0644 / 0755 for the usual 022):
# temp files and folders are made private (0600 / 0700), and are set to these before they are
# renamed into place, so a UI running as another user can read a LoRA file, as kohya's are.
FILE_MODE, DIR_MODE = _modes()


def publish_file(tmp: str, path: Path) -> None:
    """Give a finished temp file the user's usual permissions and rename it to ``path``."""
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, path)


@contextmanager
def atomic_path(path: Path) -> Iterator[str]:
    """A temp name in ``path``'s folder to write to; renamed to ``path`` when the block ends
    normally, removed when it raises, so ``path`` appears whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        publish_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` under a temp name in the same folder, then rename it into place."""
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def atomic_save(tensors: dict, path: Path, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a safetensors file under a temp name in the same folder, then rename it."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def read_json(path: Path) -> Optional[dict]:
    """A JSON file's content; None when it is missing, unreadable or not (yet) whole JSON."""
    import json

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def publish_dir(target: Path, build, marker: str) -> Path:
    """Build a folder under a temp name beside ``target`` and rename it into place, so a reader
    sees all of it or none. ``marker`` (a file or sub-folder) tells that it is complete; when
    two processes build at once, the first rename wins and the other's copy is dropped."""
    import shutil

    target = Path(target)
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        os.chmod(tmp, DIR_MODE)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / marker).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


_FILE_HASHES: Dict[tuple, str] = {}  # cache: (path, size, mtime) -> sha256


def file_sha256(path: Path) -> str:
    """sha256 of a whole file (A1111's model hash; its short form is the first 10 characters),
    computed once per file and version in this process."""
    st = Path(path).stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


def legacy_file_hash(path: Path) -> str:
    """A1111's old short model hash, as kohya writes it: sha256 of 64 KiB at offset 1 MiB, 8 hex."""
    with open(path, "rb") as fh:
        fh.seek(0x100000)
        return hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]
