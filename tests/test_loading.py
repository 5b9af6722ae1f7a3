"""Loading: the converted-GGUF cache is shared by every copy of the same file."""

from __future__ import annotations

import os

from softprompt.loading import gguf_key, gguf_source


def fake_gguf(folder, content: bytes, mtime: int):
    folder.mkdir(parents=True)
    path = folder / "Model.Q4.gguf"
    path.write_bytes(content)
    os.utime(path, (mtime, mtime))
    return path


def test_copies_of_one_gguf_share_a_converted_folder(tmp_path, monkeypatch):
    content = os.urandom(9 << 20)  # longer than the two 4 MiB samples, so the middle is not read
    a = fake_gguf(tmp_path / "venv1", content, 1_000_000)
    b = fake_gguf(tmp_path / "venv2", content, 2_000_000)  # another install: other path, other mtime
    assert gguf_key(a) == gguf_key(b)
    for changed in (content[:-1] + b"x", content[:100] + b"x" + content[101:], content + b"\0"):
        assert gguf_key(fake_gguf(tmp_path / f"other{len(changed)}{changed[100]}", changed, 1)) != gguf_key(a)
    cache = tmp_path / "cache"
    monkeypatch.setenv("SOFTPROMPT_CACHE_DIR", str(cache))
    done = cache / f"Model.Q4-{gguf_key(a)}"  # as if venv1's load had converted it already
    done.mkdir(parents=True)
    (done / "config.json").write_text("{}")
    (done / "model.safetensors").write_bytes(b"")
    assert gguf_source(b) == (str(done), {})  # venv2 reuses it, no second conversion
