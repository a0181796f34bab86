"""Local Hugging Face folders (tokenizer, backbone weights): checked before they are loaded,
so a wrong path is one line naming the key and the path, never the hub's "Repo id" error."""

from __future__ import annotations

import os
from pathlib import Path

from text4vpr.utils.errors import InputError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.txt")
MODEL_FILES = ("config.json",)


class LocalFolderError(InputError, ValueError):
    """A path that should be a local Hugging Face folder is missing, a file, or holds no such files."""


def require_local_folder(key: str, path: str | os.PathLike, files: tuple[str, ...]) -> Path:
    """`path` as a Path when it is a folder holding one of `files`; else LocalFolderError
    naming `key` (nothing is ever downloaded: the folder must be local)."""
    p = Path(path)
    fix = "give a local folder in Hugging Face layout (what save_pretrained writes); nothing is downloaded"
    if not p.exists():
        raise LocalFolderError(f"{key}={path}: no such folder; {fix}")
    if not p.is_dir():
        raise LocalFolderError(f"{key}={path}: a file, not a folder; {fix}")
    if not any((p / f).is_file() for f in files):
        raise LocalFolderError(f"{key}={path}: holds none of {', '.join(files)}; {fix}")
    return p
