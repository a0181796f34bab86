"""Atomic writes: a failed write leaves the old file and no temp file behind."""

import json

import pytest
import torch
from safetensors.torch import load_file

from text4vpr.utils.atomic import atomic_open, atomic_save_file, atomic_write_json


def test_failed_write_keeps_old_content(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_json(path, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_open(path, "w") as f:
            f.write('{"v": 2, "half')
            raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_safetensors_round_trip(tmp_path):
    t = {"x": torch.randn(3, 4), "i": torch.arange(5)}
    atomic_save_file(t, tmp_path / "sub" / "t.safetensors", metadata={"k": "v"})
    back = load_file(tmp_path / "sub" / "t.safetensors")
    assert torch.equal(back["x"], t["x"]) and torch.equal(back["i"], t["i"])


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_users_umask(tmp_path, umask, mode):
    """Like `open(path, "w")`: 0666 less the umask, not the temp file's private 0600."""
    import os
    import stat

    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "a.json", {"v": 1})
        atomic_save_file({"x": torch.zeros(2)}, tmp_path / "m.safetensors")
        with open(tmp_path / "plain.txt", "w") as f:  # the reference: what the OS gives a plain file
            f.write("x")
    finally:
        os.umask(old)
    for name in ("a.json", "m.safetensors", "plain.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_saved_model_files_follow_the_umask(tmp_path, tokenizer_dir):
    """A whole save_pretrained folder (weights, config, tokenizer) is readable by the group under umask 022."""
    import os
    import stat

    from text4vpr.data.tokenizer import load_tokenizer
    from text4vpr.models import Text4VPR, tiny_config

    old = os.umask(0o022)
    try:
        Text4VPR(tiny_config(vocab_size=300)).save_pretrained(tmp_path / "m", tokenizer=load_tokenizer(tokenizer_dir))
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "m").rglob("*") if p.is_file()]
    assert len(files) >= 3
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o644 for p in files}


def test_saved_safetensors_bytes_do_not_depend_on_the_metadata_order(tmp_path):
    """safetensors orders the metadata map at random; the saved file is the same bytes every time
    and reads back to the same tensors and metadata."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from text4vpr.utils.atomic import atomic_save_file

    tensors = {"b": torch.arange(5.0), "a": torch.ones(3, 2, dtype=torch.bfloat16), "c": torch.zeros(1, dtype=torch.int64)}
    metadata = {"format": "pt", "aliases": "{}", "z": "1", "config": "x" * 7}
    saved = set()
    for i in range(12):
        atomic_save_file(tensors, tmp_path / f"{i}.safetensors", metadata)
        saved.add((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(saved) == 1
    back = load_file(tmp_path / "0.safetensors")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    with safe_open(str(tmp_path / "0.safetensors"), framework="pt") as f:
        assert f.metadata() == metadata


def test_an_os_error_names_the_file_as_the_user_named_it(tmp_path, monkeypatch):
    """A full disk (no path in the error) or a folder where the file goes (the temp file's
    rename): the error names the target, and no temp file is left."""
    import errno

    import pytest

    from text4vpr.utils import atomic

    (tmp_path / "report.html").mkdir()
    with pytest.raises(IsADirectoryError) as e:
        atomic.atomic_write_text(tmp_path / "report.html", "<html>")
    assert e.value.filename == str(tmp_path / "report.html") and e.value.filename2 is None

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(OSError) as e:
        atomic.atomic_write_text(tmp_path / "metrics.json", "{}")
    assert e.value.filename == str(tmp_path / "metrics.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
