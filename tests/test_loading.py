"""Loading: the converted-GGUF cache is shared by every copy of the same file."""

from __future__ import annotations

import os
import random

from softprompt.loading import gguf_key, gguf_source


def fake_gguf(folder, content: bytes, mtime: int):
    folder.mkdir(parents=True)
    path = folder / "Model.Q4.gguf"
    path.write_bytes(content)
    os.utime(path, (mtime, mtime))
    return path


def flip(content: bytes, i: int) -> bytes:
    return content[:i] + bytes([content[i] ^ 0xFF]) + content[i + 1 :]


def test_copies_of_one_gguf_share_a_converted_folder(tmp_path, monkeypatch):
    content = random.Random(0).randbytes(3 << 20)
    a = fake_gguf(tmp_path / "venv1", content, 1_000_000)
    b = fake_gguf(tmp_path / "venv2", content, 2_000_000)  # another install: other path, other mtime
    assert gguf_key(a) == gguf_key(b)
    changed = [
        flip(content, 0),
        flip(content, len(content) // 2),
        flip(content, len(content) - 1),
        content + b"\0",
    ]
    keys = {gguf_key(fake_gguf(tmp_path / f"changed{i}", c, 1_000_000)) for i, c in enumerate(changed)}
    assert gguf_key(a) not in keys and len(keys) == len(changed)  # any byte, anywhere, changes the key
    cache = tmp_path / "cache"
    monkeypatch.setenv("SOFTPROMPT_CACHE_DIR", str(cache))
    done = cache / f"Model.Q4-{gguf_key(a)}"  # as if venv1's load had converted it already
    done.mkdir(parents=True)
    (done / "config.json").write_text("{}")
    (done / "model.safetensors").write_bytes(b"")
    assert gguf_source(b) == (str(done), {})  # venv2 reuses it, no second conversion
