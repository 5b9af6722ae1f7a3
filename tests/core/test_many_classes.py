"""Many classes: memory estimates and chunk sizes for label scoring, the refusal of a training
configuration that cannot fit, and the automatic verbalizer in a training run."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F

import softprompt.scoring as scoring
import softprompt.training.tasks as tasks_mod
from helpers.tiny import tiny_gpt2, tiny_llama
from softprompt import PromptedLM, SoftPrompt, load_prompt
from softprompt.batching import MEMORY_BUDGET_ENV, memory_budget, parse_bytes
from softprompt.errors import ConfigError
from softprompt.hf_parts import enable_activation_checkpointing, saved_model_shape
from softprompt.scoring import TriePlan, check_training_memory, class_scores, trie_chunk_bytes
from softprompt.training import TrainConfig, train
from softprompt.verbalizer import LabelSpace


def medium_llama():
    """Big enough that activations, not constant overheads, set the memory (still < 1 s to build)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4000, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def many_labels(n: int, length: int, seed: int = 0, vocab: int = 60) -> LabelSpace:
    g = torch.Generator().manual_seed(seed)
    words = {tuple(torch.randint(3, vocab, (length,), generator=g).tolist()) for _ in range(n)}
    return LabelSpace(tuple(sorted(words)), "sequence")


def peak_bytes(fn) -> int:
    """Peak of the bytes held by tensors allocated while ``fn`` runs (CPU allocator events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    held = peak = 0
    for e in events:
        held += e.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_model_shape_matches_the_cache_and_the_saved_config(factory, tmp_path):
    model = factory()
    prompted = PromptedLM(model)
    shape = prompted.shape()
    _, context = prompted(torch.tensor([[5, 6, 7]]), return_context=True)
    k, v = context.layers[0]
    assert len(context.layers) == shape.layers == 2 and shape.hidden == 32
    assert k.shape[1] * k.shape[3] == v.shape[1] * v.shape[3] == shape.kv_width
    assert shape.vocab == model.get_output_embeddings().weight.shape[0] and shape.dtype_bytes == 4
    assert shape.intermediate == (64 if factory is tiny_llama else 4 * 32)
    model.save_pretrained(tmp_path)
    assert saved_model_shape(str(tmp_path), 4) == shape
    assert saved_model_shape(str(tmp_path / "missing"), 4) is None


def test_sizes_parse_and_the_budget_can_be_overridden(monkeypatch):
    assert parse_bytes("2GB") == 2 * 10**9 and parse_bytes("512MiB") == 512 * 2**20 and parse_bytes(7) == 7
    with pytest.raises(ValueError, match="cannot read"):
        parse_bytes("lots")
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "3MiB")
    assert memory_budget("cpu") == 3 * 2**20
    assert memory_budget("cpu", "1GB") == 10**9  # an argument beats the environment
    monkeypatch.delenv(MEMORY_BUDGET_ENV)
    monkeypatch.setattr("softprompt.batching.available_memory", lambda device: 8 * 2**30)
    assert memory_budget("cpu") == 2 * 2**30  # a quarter of what is available


def test_chunks_stay_under_the_budget_and_shrink_with_it():
    prompted = PromptedLM(medium_llama())
    space = many_labels(40, 3)
    _, context = prompted(torch.randint(3, 4000, (6, 20)), return_context=True)
    tries = [space.trie] * 6
    shape, L, n = prompted.shape(), context.length, space.trie.num_nodes
    previous = None
    for budget in (
        10**12,
        trie_chunk_bytes(shape, 3, n, L, False),
        trie_chunk_bytes(shape, 1, n, L, False),
        1,
    ):
        plan = TriePlan(prompted, context, tries, budget, train=True)
        for grad, chunks in plan.chunks.items():
            assert sorted(r for c in chunks for r in c) == list(range(len(plan.rows)))  # every row once
            for c in chunks:
                nodes = max(plan.rows[r][2].num_nodes for r in c)
                assert len(c) == 1 or trie_chunk_bytes(shape, len(c), nodes, L, grad) <= budget
                assert len(c) == 1 or len(c) * nodes <= 2048  # the CPU's tokens per pass
        count = len(plan.chunks[False])
        assert previous is None or count >= previous
        previous = count
    # the smallest budget: one subtree (first token) per row, each alone in its chunk
    assert len(plan.rows) == 6 * len(space.trie.subtrees) and len(plan.chunks[True]) == len(plan.rows)


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "backward"])
def test_the_chunk_estimate_bounds_the_measured_memory(grad):
    """The estimate is computed from the model's sizes; it must cover what a chunk really holds
    (so chunks sized by it fit) without being far above it (so chunks are not needlessly small)."""
    prompted = PromptedLM(medium_llama())
    space = many_labels(40, 3, vocab=3000)
    _, context = prompted(torch.randint(3, 4000, (8, 30)), return_context=True)
    context = context.with_tensors([t.detach().requires_grad_(grad) for t in context.tensors()])
    plan = TriePlan(prompted, context, [space.trie] * 8, 10**12, train=grad)
    (chunk,) = plan.chunks[grad]

    def run():
        with torch.set_grad_enabled(grad):
            where, values = plan.run_chunk(chunk, context.tensors())
            if grad:
                values.sum().backward()

    measured = peak_bytes(run)
    estimate = trie_chunk_bytes(prompted.shape(), len(chunk), space.trie.num_nodes, context.length, grad)
    assert measured <= estimate <= 4 * measured, (measured, estimate)


@pytest.mark.slow  # the profiler's memory events cost ~10 s here
@pytest.mark.parametrize("checkpointing", [False, True], ids=["stored", "checkpointed"])
def test_the_training_estimate_bounds_a_measured_step(checkpointing):
    model = medium_llama()
    if checkpointing:
        enable_activation_checkpointing(model)
    prompted = PromptedLM(model)
    g = torch.Generator().manual_seed(1)
    # six labels under two first tokens: two subtrees of 5 nodes each
    space = LabelSpace(tuple((f, *torch.randint(3, 3000, (2,), generator=g).tolist()) for f in [10] * 3 + [20] * 3),
                       "sequence")  # fmt: skip
    rows = [torch.randint(3, 4000, (30,), generator=g).tolist() for _ in range(4)]
    prompt = SoftPrompt(torch.randn(10, 128) * 0.1)

    def step():  # the smallest chunks (one subtree of one input each), as the refusal assumes
        F.cross_entropy(class_scores(prompted, rows, space, 0, prompt, memory=1), torch.arange(4)).backward()

    measured = peak_bytes(step)
    need = check_training_memory(prompted.shape(), "cpu", space, 4, 30, 10, checkpointing, available=10**15)
    assert measured <= need <= 4 * measured, (measured, need)


def test_a_batch_that_cannot_fit_is_refused_with_what_to_change():
    shape = PromptedLM(medium_llama()).shape()
    space = many_labels(50, 4)
    need = check_training_memory(shape, "cpu", space, 16, 40, 20, available=10**15)
    assert need < check_training_memory(
        shape, "cpu", space, 32, 40, 20, available=10**15
    )  # grows with the batch
    assert (
        check_training_memory(shape, "cpu", space, 16, 40, 20, True, available=10**15) < need
    )  # checkpointing
    with pytest.raises(ConfigError) as err:
        check_training_memory(shape, "cpu", space, 16, 40, 20, available=need // 2)
    message = str(err.value)
    assert f"{need:,} bytes" in message and f"{need // 2:,} bytes" in message
    for fix in ("batch_size", "grad_accum", "gradient_checkpointing", "label words"):
        assert fix in message


# ---------------------------------------------------------------------------- in a training run
def write_topics(path, n: int, seed: int = 0):
    """Rows whose labels are multi-word names that share their first word ("film_good", "film_bad")."""
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            label = ["film_good", "film_bad", "food_good", "food_bad"][i % 4]
            words = [
                label.split("_")[0],
                label.split("_")[1],
                *rng.sample(["the", "very", "really", "it"], 2),
            ]
            rng.shuffle(words)
            f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return str(path)


def topic_config(tiny_model_dir, tmp_path, **kw) -> TrainConfig:
    base = dict(
        train_file=write_topics(tmp_path / "train.jsonl", 40), test_file=write_topics(tmp_path / "test.jsonl", 8, 1),
        model=tiny_model_dir, template="review {text} answer", num_virtual_tokens=4, max_steps=2, eval_every=2,
        batch_size=4, output_dir=str(tmp_path / "run"), baselines=False,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_training_refuses_a_batch_that_cannot_fit_before_writing_anything(
    tiny_model_dir, tmp_path, monkeypatch
):
    cfg = topic_config(tiny_model_dir, tmp_path, verbalizer="film_good=film good,film_bad=film bad,"
                       "food_good=food good,food_bad=food bad", batch_size=16)  # fmt: skip
    monkeypatch.setattr(scoring, "available_memory", lambda device: 50_000)
    with pytest.raises(ConfigError, match="50,000 bytes.*Lower batch_size"):
        train(cfg)
    assert not (tmp_path / "run" / "hyperparameters.json").exists()  # refused in prepare: nothing written


def test_without_a_readable_config_the_refusal_comes_before_the_first_step(
    tiny_model_dir, tmp_path, monkeypatch
):
    cfg = topic_config(tiny_model_dir, tmp_path, verbalizer="film_good=film good,film_bad=film bad,"
                       "food_good=food good,food_bad=food bad", batch_size=16)  # fmt: skip
    monkeypatch.setattr(tasks_mod, "saved_model_shape", lambda *a: None)  # e.g. a bare .gguf file
    monkeypatch.setattr(scoring, "available_memory", lambda device: 50_000)
    forward = PromptedLM.forward
    calls = []
    monkeypatch.setattr(
        PromptedLM, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k)
    )
    with pytest.raises(ConfigError, match="Lower batch_size"):
        train(cfg)
    assert calls == []  # no forward pass ran


def test_verbalizer_auto_trains_with_distinct_first_tokens_and_saves_its_words(
    tiny_model_dir, tmp_path, caplog
):
    caplog.set_level("INFO", logger="softprompt.verbalizer")
    results = train(topic_config(tiny_model_dir, tmp_path, verbalizer="auto"))
    # "film good" and "film bad" share a first token; auto keeps the labels apart by their own words
    words = load_prompt(tmp_path / "run" / "prompt").meta.verbalizer
    assert sorted(words) == ["film_bad", "film_good", "food_bad", "food_good"]
    assert len({w.split()[0] for w in words.values()}) == 4
    assert results["scoring"] == "first_token"
    assert "verbalizer auto" in caplog.text and "first_token" in caplog.text


def test_a_sharded_model_runs_the_same_passes_on_every_process_and_none_inside_backward(monkeypatch):
    """Under FSDP every process must run the same passes (one chunk, whatever its memory) and the
    label tokens stay on the graph: a sharded decoder cannot run inside the backward pass."""
    from helpers.scoring import SHARED, rows_of

    model = tiny_llama()
    rows, gold = rows_of(5, seed=7), torch.tensor([0, 2, 4, 6, 7])
    grads, called = {}, []
    apply = scoring._TrieScores.apply  # the chunked backward, counted
    monkeypatch.setattr(scoring._TrieScores, "apply", lambda *a: called.append(1) or apply(*a))
    for sharded in (False, True):
        monkeypatch.setattr(PromptedLM, "sharded", property(lambda self, s=sharded: s))
        prompted = PromptedLM(model)
        _, context = prompted(torch.tensor(rows[1:2]), return_context=True)
        plan = TriePlan(prompted, context, [SHARED.trie] * 3, budget=1, train=True)
        assert (len(plan.chunks[True]) == 1) == sharded
        called.clear()
        prompt = SoftPrompt(torch.randn(4, 32, generator=torch.Generator().manual_seed(1)) * 0.5)
        F.cross_entropy(class_scores(prompted, rows, SHARED, 0, prompt, memory=1), gold).backward()
        assert bool(called) != sharded
        grads[sharded] = prompt.weight.grad
    torch.testing.assert_close(grads[True], grads[False], atol=1e-6, rtol=1e-4)
