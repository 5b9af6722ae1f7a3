"""PromptStore: loading a folder of prompts, hot add/replace/remove, name safety, fingerprints, prefixes."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from helpers.registry import make_store, task_prompt
from helpers.tiny import make_tokenizer, tiny_llama
from softprompt import ModelMismatchError, SoftPrompt, save_prompt
from softprompt.errors import InvalidPromptNameError, UnknownPromptError
from softprompt.serving.registry import PromptStore


def test_store_loads_every_prompt_folder_with_its_task(llama, tmp_path):
    store = make_store(tmp_path / "store", llama)
    assert store.names() == ["quality", "sentiment", "topic"]
    info = {n: store.get(n).describe() for n in store.names()}
    assert [info[n]["num_virtual_tokens"] for n in ("sentiment", "topic", "quality")] == [3, 5, 8]
    assert sorted(info["topic"]["labels"]) == ["b", "s", "t"] and info["topic"]["scoring"] == "first_token"
    assert info["quality"]["scoring"] == "sequence"  # "very good"/"very bad" share a first token
    assert store.get("sentiment").prompt.weight.dtype == torch.float32


def test_add_replace_remove_and_snapshots_are_isolated(llama, tmp_path):
    store = make_store(tmp_path / "store", llama)
    before = store.snapshot()
    old = store.get("sentiment")
    new = store.replace("sentiment", task_prompt("sentiment", P=6, seed=9))
    assert new.version > old.version and new.num_virtual_tokens == 6
    # The snapshot taken before still holds the old prompt, bit for bit.
    assert before["sentiment"] is old and before["sentiment"].num_virtual_tokens == 3
    assert store.load("sentiment").num_virtual_tokens == 6  # replace saved it to disk too
    store.add("extra", task_prompt("topic", P=2, seed=3), save=False)
    assert "extra" in store and "extra" not in before and not (tmp_path / "store" / "extra").exists()
    with pytest.raises(FileExistsError, match="replace"):
        store.add("topic", task_prompt("topic"))
    store.remove("topic")
    assert "topic" not in store and "topic" in before
    assert (tmp_path / "store" / "topic").is_dir()  # unloading keeps the files
    store.remove("quality", delete_files=True)
    assert not (tmp_path / "store" / "quality").exists()
    with pytest.raises(UnknownPromptError, match="no prompt named 'topic'"):
        store.get("topic")
    with pytest.raises(UnknownPromptError):
        store.replace("nothing", task_prompt("topic"))
    with pytest.raises(FileNotFoundError, match="no prompt folder 'missing'"):
        store.load("missing")


@pytest.mark.parametrize("name", ["..", ".", "../x", "a/b", "/etc", "a\\b", ".hidden", "", "x" * 200, "a b"])
def test_names_cannot_escape_the_store(llama, tmp_path, name):
    store = PromptStore(tmp_path / "store", llama, make_tokenizer())
    with pytest.raises(InvalidPromptNameError):
        store.load(name)
    with pytest.raises(InvalidPromptNameError):
        store.add(name, task_prompt("sentiment"))


def test_symlink_out_of_the_store_is_refused(llama, tmp_path):
    save_prompt(task_prompt("sentiment"), tmp_path / "outside", llama)
    (tmp_path / "store").mkdir()
    os.symlink(tmp_path / "outside", tmp_path / "store" / "link")
    store = PromptStore(tmp_path / "store", llama, make_tokenizer(), load_all=False)
    with pytest.raises(InvalidPromptNameError, match="outside the store"):
        store.load("link")


def test_prompt_of_another_model_is_refused(tmp_path):
    other = tiny_llama(seed=1)
    save_prompt(task_prompt("sentiment"), tmp_path / "store" / "alien", other)
    # At start-up it is skipped and listed (the other prompts are still served); loading it raises.
    store = PromptStore(tmp_path / "store", tiny_llama(seed=0), make_tokenizer())
    assert store.names() == [] and [f["name"] for f in store.failures()] == ["alien"]
    assert "different base model" in store.failures()[0]["error"]
    with pytest.raises(ModelMismatchError, match="different base model"):
        store.load("alien")
    wrong_dim = SoftPrompt(torch.randn(3, 16))
    store = PromptStore(tmp_path / "empty", tiny_llama(), make_tokenizer())
    with pytest.raises(ValueError, match="hidden size"):
        store.add("small", wrong_dim, save=False)


def test_prefix_is_cached_per_version_and_dropped_on_replace(llama, tmp_path):
    store = make_store(tmp_path / "store", llama)
    entry = store.get("topic")
    first = store.prefix(entry)
    assert store.prefix(entry) is first and store.cached_prefixes() == 1
    ref = store.prompted.prefix_cache(entry.prompt.weight)
    for (k, v), (rk, rv) in zip(first.layers, ref.layers, strict=True):
        torch.testing.assert_close(k, rk, atol=0, rtol=0)
        torch.testing.assert_close(v, rv, atol=0, rtol=0)
    store.replace("topic", task_prompt("topic", P=2, seed=5), save=False)
    assert store.cached_prefixes() == 0  # the old version's prefix is gone
    # A request that still holds the old entry gets its (old) prefix, which is not cached again.
    assert store.prefix(entry).num_prompts == 1 and store.cached_prefixes() == 0
    store.prefix(store.get("topic"))
    store.remove("topic")
    assert store.cached_prefixes() == 0


def test_concurrent_readers_see_old_or_new_never_a_mix(llama, tmp_path):
    store = make_store(tmp_path / "store", llama)
    a, b = task_prompt("sentiment", P=3, seed=1), task_prompt("sentiment", P=7, seed=2)
    store.replace("sentiment", a, save=False)
    seen, stop, errors = set(), threading.Event(), []

    def reader():
        while not stop.is_set():
            entry = store.snapshot()["sentiment"]
            P, w = entry.num_virtual_tokens, entry.prompt.weight.cpu()
            if not (torch.equal(w, a.weight) or torch.equal(w, b.weight)):
                errors.append(P)
            seen.add(P)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(40):
        store.replace("sentiment", a if i % 2 else b, save=False)
    stop.set()
    for t in threads:
        t.join()
    assert not errors and seen <= {3, 7}


def test_failed_folders_are_listed_until_they_load(llama, tmp_path):
    store = make_store(tmp_path / "store", llama)
    (tmp_path / "store" / "topic" / "softprompt.json").write_text('{"template": 3}')
    with pytest.raises(ValueError, match="template: expected a string"):
        store.load("topic")
    assert [f["name"] for f in store.failures()] == ["topic"]
    assert "topic" in store  # the version loaded before is still served
    store.replace("topic", task_prompt("topic"))  # saves a good folder over the bad one
    assert store.failures() == []
    assert store.redact(f"{store.root}/topic/x.json in {store.root}") == "topic/x.json in <store>"
