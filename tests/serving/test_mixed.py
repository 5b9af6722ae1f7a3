"""Mixed-task batches and ensembles equal separate runs of each task."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from helpers.registry import make_store, task_prompt
from helpers.scoring import reference
from helpers.tiny import MODEL_FACTORIES, make_tokenizer
from softprompt.classifier import Classifier
from softprompt.decoding import Generator
from softprompt.errors import UnknownPromptError
from softprompt.serving.mixed import classify_mixed, ensemble_classify, generate_mixed, score_mixed
from softprompt.text import encode_text

TEXTS = [
    "the food was good",
    "a boring film",
    "the price of the product",
    "news of the world and sports",
    "really fun",
    "bad service and slow staff",
]
ATOL = 1e-5  # fp32; rows are padded and batched differently from the separate runs


def separate_probs(store, name: str, texts: list[str]) -> torch.Tensor:
    """The reference: the plain HF model on [the task's prompt + each full input + label word], one
    row at a time (no PromptedLM, no cached prefix, no head cut)."""
    entry = store.get(name)
    clf = Classifier(store.prompted.model, store.tokenizer, entry.prompt)
    rows = [encode_text(clf.tokenizer, clf.template, t, 256)[0] for t in texts]
    weight = entry.prompt.weight.detach()
    logp = torch.stack([reference(store.prompted.model, weight, r, clf.space) for r in rows])
    return logp.softmax(dim=1)


@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
@pytest.mark.parametrize("use_prefix", [False, True], ids=["bank", "prefix"])
@pytest.mark.parametrize("overhead", [0, 10**6], ids=["length-batches", "full-batches"])
def test_mixed_classification_equals_separate_runs(arch, use_prefix, overhead, tmp_path):
    store = make_store(tmp_path / "store", MODEL_FACTORIES[arch]())
    names = ["sentiment", "topic", "quality"]
    # Every text under every task, interleaved so each batch mixes tasks and prompt lengths.
    pairs = [(n, t) for t in TEXTS for n in names]
    entries = [store.get(n) for n, _ in pairs]
    logps = score_mixed(store, entries, [t for _, t in pairs], batch_size=7, use_prefix=use_prefix,
                        overhead=overhead)  # fmt: skip
    for name in names:
        ref = separate_probs(store, name, TEXTS)
        ours = torch.stack([lp.softmax(0) for (n, _), lp in zip(pairs, logps, strict=True) if n == name])
        torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_inputs_run_without_their_template_head_and_fall_back_when_it_is_missing(
    llama, tmp_path, monkeypatch
):
    store = make_store(tmp_path / "store", llama)
    names = ["sentiment", "topic", "quality"]
    assert all(len(store.get(n).usage.head_ids) == 1 for n in names)  # "review", "news", "text"
    widths: list[int] = []
    forward = store.prompted.forward
    monkeypatch.setattr(
        store.prompted, "forward", lambda ids, *a, **k: widths.append(ids.shape[1]) or forward(ids, *a, **k)
    )
    texts = ["the food was good", "a boring film"]
    pairs = [(n, t) for t in texts for n in names]
    logps = score_mixed(store, [store.get(n) for n, _ in pairs], [t for _, t in pairs], overhead=10**6)
    # labels continue each input's cache (softprompt.scoring), so a pass is as wide as the inputs
    full = max(len(encode_text(store.tokenizer, store.get(n).usage.template, t, 256)[0]) for n, t in pairs)
    assert widths == [full - 1]  # one batch, every row one token (its head) shorter
    # A head that the inputs do not start with: those rows run in full, with the same scores.
    entry = store.get("topic")
    wrong = dataclasses.replace(entry, usage=dataclasses.replace(entry.usage, head_ids=(5, 6)))
    entries = [wrong if n == "topic" else store.get(n) for n, _ in pairs]
    widths.clear()
    again = score_mixed(store, entries, [t for _, t in pairs], overhead=10**6)
    assert widths == [full]  # the "topic" rows now run with their head
    for a, b in zip(logps, again, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    for name in names:
        ref = separate_probs(store, name, texts)
        ours = torch.stack([lp.softmax(0) for (n, _), lp in zip(pairs, again, strict=True) if n == name])
        torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_single_task_classifier_equals_full_runs(tiny_model, tmp_path):
    """Classifier (eval, predict) caches the rows' shared head; its scores equal full runs."""
    store = make_store(tmp_path / "store", tiny_model)
    for name in ["sentiment", "quality"]:  # first-token and sequence scoring
        clf = Classifier(store.prompted.model, store.tokenizer, store.get(name).prompt, batch_size=4)
        torch.testing.assert_close(clf.scores(TEXTS), separate_probs(store, name, TEXTS), atol=ATOL, rtol=0)


def test_classify_mixed_results_carry_each_tasks_labels(llama, tmp_path):
    store = make_store(tmp_path / "store", llama)
    out = classify_mixed(store, ["topic", "sentiment", "quality"], TEXTS[:3])
    assert [r["model"] for r in out] == ["topic", "sentiment", "quality"]
    assert sorted(out[0]["scores"]) == ["b", "s", "t"] and sorted(out[1]["scores"]) == ["neg", "pos"]
    assert sorted(out[2]["scores"]) == ["bad", "good"]
    for r in out:
        assert r["label"] == max(r["scores"], key=r["scores"].get)
        assert abs(sum(r["scores"].values()) - 1) < 1e-4
    with pytest.raises(UnknownPromptError, match="no prompt named 'nope'"):
        classify_mixed(store, ["nope"], ["x"])


def test_ensemble_mean_and_vote_match_separate_members(llama, tmp_path):
    store = make_store(tmp_path / "store", llama)
    for seed, P in [(11, 2), (12, 6)]:
        store.add(f"sentiment-{seed}", task_prompt("sentiment", P=P, seed=seed), save=False)
    names = ["sentiment", "sentiment-11", "sentiment-12"]
    member_probs = torch.stack([separate_probs(store, n, TEXTS) for n in names])  # (k, N, C)
    labels = store.get("sentiment").labels
    mean = ensemble_classify(store, names, TEXTS, method="mean")
    vote = ensemble_classify(store, names, TEXTS, method="vote")
    for i, text in enumerate(TEXTS):
        expect_mean = member_probs[:, i].mean(0)
        got = torch.tensor([mean[i]["scores"][lab] for lab in labels])
        torch.testing.assert_close(got, expect_mean, atol=1e-5, rtol=0)
        assert mean[i]["label"] == labels[int(expect_mean.argmax())]
        picks = [labels[int(p.argmax())] for p in member_probs[:, i]]
        assert vote[i]["members"] == dict(zip(names, picks, strict=True))
        majority = max(labels, key=lambda lab: (picks.count(lab), expect_mean[labels.index(lab)]))
        assert vote[i]["label"] == majority and vote[i]["text"] == text
        assert sum(vote[i]["votes"].values()) == 3
    with pytest.raises(ValueError, match="same labels"):
        ensemble_classify(store, ["sentiment", "topic"], TEXTS)
    with pytest.raises(ValueError, match="choose 'mean'"):
        ensemble_classify(store, names, TEXTS, method="max")


def test_prompt_without_label_words_cannot_classify(llama, tmp_path):
    from softprompt import SoftPrompt

    store = make_store(tmp_path / "store", llama)
    store.add("free", SoftPrompt(torch.randn(3, 32)), save=False)
    with pytest.raises(ValueError, match="no label words"):
        classify_mixed(store, ["free"], ["the film"])


def test_hot_replace_during_mixed_requests(llama, tmp_path):
    """Requests running while a prompt is swapped give the old or the new prompt's answer, never a mix."""
    store = make_store(tmp_path / "store", llama)
    a, b = task_prompt("sentiment", P=3, seed=21), task_prompt("sentiment", P=6, seed=22)
    store.replace("sentiment", a, save=False)
    ref_a = separate_probs(store, "sentiment", TEXTS)
    ref_topic = separate_probs(store, "topic", TEXTS)
    store.replace("sentiment", b, save=False)
    ref_b = separate_probs(store, "sentiment", TEXTS)
    assert (ref_a - ref_b).abs().max() > 1e-3  # the two versions are distinguishable
    failures, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            out = classify_mixed(
                store, ["sentiment", "topic"] * len(TEXTS), [t for t in TEXTS for _ in (0, 1)]
            )
            sent = torch.tensor([[r["scores"]["neg"], r["scores"]["pos"]] for r in out[0::2]])
            topic = torch.tensor([[r["scores"][k] for k in store.get("topic").labels] for r in out[1::2]])
            old_or_new = torch.allclose(sent, ref_a, atol=1e-4) or torch.allclose(sent, ref_b, atol=1e-4)
            if not old_or_new or not torch.allclose(topic, ref_topic, atol=1e-4):
                failures.append(sent)

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(10):
        store.replace("sentiment", a if i % 2 == 0 else b, save=False)
    stop.set()
    for t in threads:
        t.join()
    assert not failures


@pytest.mark.parametrize("use_prefix", [False, True], ids=["bank", "prefix"])
def test_mixed_generation_equals_separate_runs(llama, tmp_path, use_prefix):
    store = make_store(tmp_path / "store", llama)
    names = ["sentiment", "topic", "quality", "topic"]
    texts = ["the food was", "news of the", "a boring", "sports and business"]
    entries = [store.get(n) for n in names]
    mixed = generate_mixed(store, entries, texts, max_new_tokens=6, use_prefix=use_prefix)
    for e, t, got in zip(entries, texts, mixed, strict=True):
        # The reference: the single-prompt Generator, running this prompt alone.
        alone = Generator(store.prompted, store.tokenizer, e.prompt).generate([t], max_new_tokens=6)
        assert got.tokens == alone.tokens[0] and got.finish_reason == alone.finish_reasons[0]
        assert got.prompt_tokens == len(make_tokenizer()(e.usage.template.render(t))["input_ids"])


def test_a_learned_verbalizer_serves_in_mixed_batches_as_the_plain_model_scores_it(llama, tmp_path):
    """A prompt with class vectors (scoring=learned) beside word-scored tasks: each of its rows equals
    the plain HF model with its LM head replaced by the class vectors and biases."""
    import copy

    from softprompt import save_prompt
    from softprompt.learned import ClassHead

    prompt = task_prompt("topic", P=6, seed=7)
    prompt.meta.scoring = "learned"
    g = torch.Generator().manual_seed(3)
    prompt.classes = ClassHead(torch.randn(3, 32, generator=g), torch.randn(3, generator=g))
    save_prompt(prompt, tmp_path / "store" / "learned", llama)
    store = make_store(tmp_path / "store", llama)
    names = ["learned", "sentiment", "quality", "learned"]
    pairs = [(n, t) for t in TEXTS for n in names]
    logps = score_mixed(store, [store.get(n) for n, _ in pairs], [t for _, t in pairs], batch_size=5)
    plain = copy.deepcopy(llama)
    plain.lm_head = torch.nn.Linear(32, 3)
    plain.lm_head.weight.data, plain.lm_head.bias.data = (
        prompt.classes.vectors.clone(),
        prompt.classes.bias.clone(),
    )
    clf = Classifier(store.prompted.model, store.tokenizer, store.get("learned").prompt)
    # the topic labels are not in sorted order (s, b, t): the served scores follow the loaded prompt's
    # label order, each class scored by its own vector (the plain head's rows are in training order)
    served, trained = clf.usage.label_names, list(prompt.meta.verbalizer)
    assert served != trained
    by_label = [trained.index(label) for label in served]
    emb = llama.get_input_embeddings()
    for (name, text), logp in zip(pairs, logps, strict=True):
        if name != "learned":
            continue
        row = encode_text(store.tokenizer, clf.template, text, 256)[0]
        x = torch.cat([prompt.weight, emb(torch.tensor(row))])
        with torch.no_grad():
            want = plain(inputs_embeds=x[None]).logits[0, -1].log_softmax(-1)[by_label]
        torch.testing.assert_close(logp, want, atol=ATOL, rtol=0)
    for name in ["sentiment", "quality"]:
        ours = torch.stack([lp.softmax(0) for (n, _), lp in zip(pairs, logps, strict=True) if n == name])
        torch.testing.assert_close(ours, separate_probs(store, name, TEXTS), atol=ATOL, rtol=0)
    out = classify_mixed(store, ["learned"], TEXTS[:1])
    assert sorted(out[0]["scores"]) == ["b", "s", "t"]
