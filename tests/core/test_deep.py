"""Deep prompts (keys and values at every layer) against independent references: PEFT's own
prefix-tuning forward, and the input prompt whose keys and values a deep prompt was made from."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from helpers.registry import TASKS, make_store
from helpers.tiny import MODEL_FACTORIES, make_tokenizer, tiny_llama
from softprompt.config import PromptConfig
from softprompt.deep import DeepPrompt, KVShape, layers_of, weight_of
from softprompt.errors import ModelMismatchError, PromptFormatError, UsageError
from softprompt.initialize import initialize_prompt
from softprompt.meta import PromptMeta
from softprompt.model import PromptedLM
from softprompt.prompt import SoftPrompt, load_prompt, save_prompt
from softprompt.scoring import class_scores
from softprompt.serving.mixed import score_mixed
from softprompt.verbalizer import LabelSpace
from softprompt.vllm import prompt_embeds

ARCHS = sorted(MODEL_FACTORIES)
LEFT = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12], [0, 0, 0, 13, 14]])
RIGHT = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12], [13, 14, 0, 0, 0]])


def random_deep(model, P: int = 4, seed: int = 0, scale: float = 0.5) -> DeepPrompt:
    shape = KVShape.of_model(model)
    g = torch.Generator().manual_seed(seed)
    return DeepPrompt(torch.randn(P, shape.width, generator=g) * scale, shape, PromptMeta(init="random"))


def peft_logits(model, folder, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(folder)).eval()
        with torch.no_grad():
            return peft_model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_deep_prompt_gives_peft_prefix_tuning_logits_both_paddings(arch, tmp_path):
    model = MODEL_FACTORIES[arch]()
    deep = random_deep(model)
    save_prompt(deep, tmp_path / "deep", model)
    config = json.loads((tmp_path / "deep" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and not config["prefix_projection"]
    prompted = PromptedLM(model)
    # right padding: PEFT's positions follow the slots, which for right padding are the tokens' own
    mask = (RIGHT != 0).long()
    ours = prompted(RIGHT, mask, prompt=deep, positions="all")
    ref = peft_logits(model, tmp_path / "deep", RIGHT, mask)
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=0)
    # left padding: each row as PEFT computes it alone (PEFT shifts positions by the padding; we do not)
    mask = (LEFT != 0).long()
    ours = prompted(LEFT, mask, prompt=deep, positions="all")
    for b in range(LEFT.shape[0]):
        row = LEFT[b][mask[b].bool()].unsqueeze(0)
        ref = peft_logits(model, tmp_path / "deep", row)
        torch.testing.assert_close(ours[b][mask[b].bool()], ref[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_trained_prefix_tuning_adapter_loads_and_matches(arch, tmp_path):
    from peft import PrefixTuningConfig, get_peft_model

    model = MODEL_FACTORIES[arch]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(
            copy.deepcopy(model), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)
        )
        with torch.no_grad():  # as if trained: PEFT starts every prefix at N(0, 1)
            for p in peft_model.parameters():
                if p.requires_grad:
                    p.mul_(0.3)
        peft_model.save_pretrained(str(tmp_path / "peft"))
    loaded = load_prompt(tmp_path / "peft", model)
    assert isinstance(loaded, DeepPrompt) and loaded.num_virtual_tokens == 5
    mask = (RIGHT != 0).long()
    ours = PromptedLM(model)(RIGHT, mask, prompt=loaded, positions="all")
    ref = peft_logits(model, tmp_path / "peft", RIGHT, mask)
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("init", ["text", "random", "vocab"])
def test_deep_init_gives_what_the_input_prompt_it_was_made_from_gives(arch, init):
    model, tok = MODEL_FACTORIES[arch](), make_tokenizer()
    settings = {
        "num_virtual_tokens": 4,
        "init": init,
        "init_text": "classify the review" if init == "text" else None,
    }
    deep = initialize_prompt(PromptConfig(**settings, prompt_kind="deep"), model, tok)
    plain = SoftPrompt.initialize(PromptConfig(**settings), model, tok)
    assert isinstance(deep, DeepPrompt) and deep.shape == KVShape.of_model(model)
    prompted = PromptedLM(model)
    mask = (LEFT != 0).long()
    a = prompted(LEFT, mask, prompt=deep, positions="all")
    b = prompted(LEFT, mask, prompt=plain, positions="all")
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=1e-5, rtol=0)


def test_weight_layout_round_trips_and_follows_peft_order():
    shape = KVShape(layers=3, kv_heads=2, head_dim=4)
    w = torch.randn(5, shape.width)
    layers = layers_of(w, shape)
    assert len(layers) == 3 and layers[0][0].shape == (1, 2, 5, 4)
    assert torch.equal(weight_of(layers), w)
    # PEFT: view(P, 2L, H, d); entry 2l is layer l's key, 2l + 1 its value
    peft_view = w.view(5, 6, 2, 4)
    assert torch.equal(layers[1][1][0], peft_view[:, 3].permute(1, 0, 2))


@pytest.mark.parametrize("labels", ["first_token", "sequence"])
@pytest.mark.parametrize("pass_of_its_own", [False, True])
def test_head_tokens_after_a_deep_prompt_and_gradient(llama, labels, pass_of_its_own, monkeypatch):
    """The head run once after the deep prompt (in the rows' pass, or where the attention takes no
    custom mask in a pass of its own) gives the scores and the gradient of the head in every row;
    multi-token labels continue the rows from that pass's keys and values."""
    tok = make_tokenizer()
    deep = random_deep(llama, scale=0.3)
    prompted = PromptedLM(llama)
    if pass_of_its_own:
        monkeypatch.setattr(type(prompted), "takes_custom_masks", property(lambda self: False))
    words = ("positive", "negative") if labels == "first_token" else ("very good", "not good at all")
    space = LabelSpace(tuple(tuple(tok(w, add_special_tokens=False)["input_ids"]) for w in words), labels)
    head = tok("review", add_special_tokens=False)["input_ids"]
    rows = [
        head + tok(t, add_special_tokens=False)["input_ids"]
        for t in ("the food was good", "bad", "a very boring film")
    ]
    grads = []
    for share in (True, False):  # True: the head runs once after the prefix
        deep.weight.grad = None
        scores = class_scores(prompted, rows, space, tok.pad_token_id, deep, share_head=share)
        (scores[:, 0] * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
        grads.append((scores.detach(), deep.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=0)
    assert grads[0][1].abs().sum() > 0
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-5, rtol=1e-4)


def test_mixed_batch_of_deep_and_input_prompts_equals_separate_runs(tmp_path):
    model = tiny_llama()
    store = make_store(tmp_path / "store", model)
    template, verbalizer = TASKS["sentiment"]
    meta = PromptMeta(init="random", template=template, label_words=list(verbalizer.values()),
                      verbalizer=verbalizer, scoring="auto")  # fmt: skip
    deep = random_deep(model, P=6, seed=3)
    deep.meta = meta
    deep.meta.deep = deep.shape.as_dict()
    store.add("deep", deep)
    texts = ["the food was good", "a boring film", "bad service", "really fun"]
    names = ["deep", "sentiment", "topic", "deep", "sentiment", "deep", "quality", "deep"]
    pairs = [(n, texts[i % len(texts)]) for i, n in enumerate(names)]
    mixed = score_mixed(store, [store.get(n) for n, _ in pairs], [t for _, t in pairs], batch_size=8)
    for (name, text), scores in zip(pairs, mixed, strict=True):
        alone = score_mixed(store, [store.get(name)], [text], batch_size=1)[0]
        torch.testing.assert_close(scores, alone, atol=1e-5, rtol=0)
    with pytest.raises(Exception, match="cached prefixes"):
        score_mixed(store, [store.get("deep")], ["bad"], use_prefix=False)


def test_wrong_model_projection_and_export_are_refused(tmp_path):
    model = tiny_llama()
    deep = random_deep(model)
    save_prompt(deep, tmp_path / "deep", model)
    other = copy.deepcopy(model.config)
    other.num_hidden_layers = 3
    from transformers import LlamaForCausalLM

    with pytest.raises(ModelMismatchError, match="layers"):
        load_prompt(tmp_path / "deep", LlamaForCausalLM(other), check_model=False)
    config = json.loads((tmp_path / "deep" / "adapter_config.json").read_text())
    (tmp_path / "deep" / "adapter_config.json").write_text(json.dumps({**config, "prefix_projection": True}))
    with pytest.raises(PromptFormatError, match="prefix_projection"):
        load_prompt(tmp_path / "deep")
    with pytest.raises(UsageError, match="vLLM takes input embeddings"):
        prompt_embeds(deep, [5, 6], model)


def test_decoding_with_a_deep_prompt_cached_or_not(llama):
    from softprompt.decoding import Generator

    tok = make_tokenizer()
    deep = random_deep(llama, scale=0.3)
    texts = ["the food was", "a very boring film and"]
    cached = Generator(llama, tok, deep, template="{text}", use_prefix_cache=True).generate(
        texts, max_new_tokens=5
    )
    fresh = Generator(llama, tok, deep, template="{text}", use_prefix_cache=False).generate(
        texts, max_new_tokens=5
    )
    assert cached.texts == fresh.texts and all(cached.texts)


def test_mixed_generation_with_deep_and_input_prompts_equals_separate_runs(tmp_path):
    from softprompt.decoding import Generator
    from softprompt.serving.mixed import generate_mixed

    model = tiny_llama(initializer_range=0.3)
    store = make_store(tmp_path / "store", model)
    deep = random_deep(model, P=5, seed=4, scale=0.3)
    deep.meta.template = "review {text} answer"
    store.add("deep", deep)
    names = ["deep", "sentiment", "deep", "topic"]
    texts = ["the food was good", "a boring film", "bad", "news of the world"]
    entries = [store.get(n) for n in names]
    mixed = generate_mixed(store, entries, texts, max_new_tokens=5)
    for e, t, got in zip(entries, texts, mixed, strict=True):
        alone = Generator(store.prompted, store.tokenizer, e.prompt).generate([t], max_new_tokens=5)
        assert got.tokens == alone.tokens[0]


def test_prompt_lengths_with_a_deep_prompt_are_refused(llama):
    with pytest.raises(ValueError, match="used whole"):
        PromptedLM(llama)(
            LEFT, (LEFT != 0).long(), prompt=random_deep(llama), prompt_lengths=torch.tensor([2, 2, 2])
        )
