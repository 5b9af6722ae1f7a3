"""Saving and loading prompts: PEFT's format both ways, atomic writes, and every broken-file case."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from helpers.tiny import MODEL_FACTORIES, tiny_llama
from softprompt import ModelMismatchError, PromptedLM, PromptFormatError, SoftPrompt, load_prompt, save_prompt
from softprompt.meta import PromptMeta
from softprompt.peft_format import CONFIG_NAME, META_NAME, WEIGHTS_NAME

peft = pytest.importorskip("peft", reason="peft is a test dependency (pip install -e .[test])")


def make_prompt(P: int = 5, D: int = 32, seed: int = 0) -> SoftPrompt:
    g = torch.Generator().manual_seed(seed)
    meta = PromptMeta(init="labels", label_words=["bad", "good"], template="Review: {text}\nSentiment:")
    return SoftPrompt(torch.randn(P, D, generator=g) * 0.1, meta)


def test_round_trip_is_bit_identical_with_metadata(llama, tmp_path):
    p = make_prompt()
    save_prompt(p, tmp_path / "p", llama)
    q = load_prompt(tmp_path / "p", llama)
    assert torch.equal(p.weight, q.weight) and q.weight.dtype == torch.float32
    assert q.meta.label_words == ["bad", "good"] and q.meta.template.startswith("Review:")
    assert q.meta.base_model == "tiny-llama" and q.meta.embedding_fingerprint["hidden_size"] == 32
    config = json.loads((tmp_path / "p" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["task_type"] == "CAUSAL_LM"
    assert (config["num_virtual_tokens"], config["token_dim"], config["num_layers"]) == (5, 32, 2)
    assert config["inference_mode"] is True


@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_our_prompt_loads_in_peft_with_same_logits(arch, tmp_path):
    from peft import PeftModel

    model = MODEL_FACTORIES[arch]()
    p = make_prompt(P=4)
    save_prompt(p, tmp_path / "p", model)
    ids = torch.tensor([[7, 8, 11, 20, 3], [9, 10, 12, 13, 14]])
    with torch.no_grad():
        ours = PromptedLM(model)(ids, prompt=p, positions="all")
        peft_model = PeftModel.from_pretrained(MODEL_FACTORIES[arch](), str(tmp_path / "p"))
        theirs = peft_model(input_ids=ids).logits[:, 4:]  # PEFT returns P extra positions; drop them
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_peft_trained_prompt_loads_here_with_same_logits(arch, tmp_path):
    from peft import PromptTuningConfig, get_peft_model

    model = MODEL_FACTORIES[arch]()
    cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, prompt_tuning_init="RANDOM")
    peft_model = get_peft_model(model, cfg)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.tensor([[7, 8, 11, 20, 3]])
    for _ in range(2):
        opt.zero_grad()
        peft_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    peft_model.save_pretrained(str(tmp_path / "peft"))
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits[:, 6:]
        loaded = load_prompt(tmp_path / "peft", MODEL_FACTORIES[arch]())
        ours = PromptedLM(MODEL_FACTORIES[arch]())(ids, prompt=loaded, positions="all")
    assert loaded.num_virtual_tokens == 6 and loaded.meta.init == "random"
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_overwrite_is_atomic_when_the_write_dies(llama, tmp_path, monkeypatch):
    old = make_prompt(seed=1)
    save_prompt(old, tmp_path / "p", llama)

    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr("softprompt.peft_format._write_json", die)
    with pytest.raises(KeyboardInterrupt):
        save_prompt(make_prompt(seed=2), tmp_path / "p", llama)
    monkeypatch.undo()
    assert torch.equal(load_prompt(tmp_path / "p", llama).weight, old.weight)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["p"]  # no temporary folders left behind
    save_prompt(make_prompt(seed=2), tmp_path / "p", llama)
    assert torch.equal(load_prompt(tmp_path / "p").weight, make_prompt(seed=2).weight)


def test_save_refuses_to_replace_a_folder_with_other_files(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="other files"):
        save_prompt(make_prompt(), tmp_path / "p")


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved prompt"):
        load_prompt(tmp_path / "nope")
    save_prompt(make_prompt(), tmp_path / "p")
    (tmp_path / "p" / WEIGHTS_NAME).unlink()
    (tmp_path / "p" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match=r"missing adapter_model.safetensors.*Pickle files"):
        load_prompt(tmp_path / "p")


def test_truncated_and_corrupt_safetensors(tmp_path):
    save_prompt(make_prompt(), tmp_path / "p")
    weights = tmp_path / "p" / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(PromptFormatError, match="corrupt or truncated"):
        load_prompt(tmp_path / "p")
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(PromptFormatError, match="corrupt or truncated"):
        load_prompt(tmp_path / "p")


def test_corrupt_config_wrong_adapter_and_shape_mismatch(tmp_path):
    save_prompt(make_prompt(), tmp_path / "p")
    cfg_path = tmp_path / "p" / CONFIG_NAME
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text("{not json")
    with pytest.raises(PromptFormatError, match="not valid JSON"):
        load_prompt(tmp_path / "p")
    cfg_path.write_text(json.dumps({**cfg, "peft_type": "LORA"}))
    with pytest.raises(PromptFormatError, match="expected 'PROMPT_TUNING'"):
        load_prompt(tmp_path / "p")
    cfg_path.write_text(json.dumps({**cfg, "num_virtual_tokens": 9}))
    with pytest.raises(PromptFormatError, match="do not belong together"):
        load_prompt(tmp_path / "p")


def test_nan_in_saved_prompt_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_prompt(make_prompt(), tmp_path / "p")
    w = make_prompt().weight.detach().clone()
    w[2, 0] = float("inf")
    save_file({"prompt_embeddings": w}, str(tmp_path / "p" / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="NaN/inf"):
        load_prompt(tmp_path / "p")
    with pytest.raises(ValueError, match="NaN/inf"):
        save_prompt(_nan_prompt(), tmp_path / "q")


def _nan_prompt() -> SoftPrompt:
    p = make_prompt()
    with torch.no_grad():
        p.weight[0, 0] = float("nan")  # e.g. after a diverged optimizer step
    return p


def test_wrong_model_is_refused_same_model_other_precision_warns(tmp_path, caplog):
    save_prompt(make_prompt(), tmp_path / "p", tiny_llama(seed=0))
    with pytest.raises(ModelMismatchError, match="different base model"):
        load_prompt(tmp_path / "p", tiny_llama(seed=123))
    assert load_prompt(tmp_path / "p", tiny_llama(seed=123), check_model=False).num_virtual_tokens == 5
    with caplog.at_level(logging.WARNING, logger="softprompt.peft_format"):
        load_prompt(tmp_path / "p", tiny_llama(seed=0, dtype=torch.bfloat16))
    assert "another precision" in caplog.text
    with pytest.raises(ModelMismatchError, match="hidden size is 32"):
        save_prompt(SoftPrompt(torch.randn(3, 16)), tmp_path / "small")
        load_prompt(tmp_path / "small", tiny_llama())


def test_peft_prompt_without_our_metadata_has_no_fingerprint(tmp_path, llama):
    save_prompt(make_prompt(), tmp_path / "p", llama)
    (tmp_path / "p" / META_NAME).unlink()
    q = load_prompt(tmp_path / "p", tiny_llama(seed=5))  # cannot verify: loads
    assert q.meta.embedding_fingerprint is None and q.meta.base_model == "tiny-llama"


def test_saved_folder_has_normal_permissions(tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        save_prompt(make_prompt(), tmp_path / "p")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "p").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "p" / WEIGHTS_NAME).stat().st_mode) == 0o644
