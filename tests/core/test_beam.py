"""Beam search under soft prompts, against independent references: Hugging Face's own beam search
on the plain model (the prompt given as input embeddings), and a from-scratch beam search over
PEFT's prefix-tuning forward for deep prompts."""

from __future__ import annotations

import warnings

import pytest
import torch

from helpers.tiny import left_padded_batch as batch
from helpers.tiny import make_tokenizer, tiny_gpt2, tiny_llama
from softprompt.decoding import Generator, evaluate_generation, generate
from softprompt.deep import DeepPrompt, KVShape
from softprompt.errors import UsageError
from softprompt.meta import PromptMeta
from softprompt.model import PromptedLM
from softprompt.prompt import save_prompt

EOS = 1
# Llama with larger weights has peaked outputs: beams leave greedy's path and some rows pick EOS.
MODELS = {"llama": lambda: tiny_llama(initializer_range=0.3), "gpt2": tiny_gpt2}


def hf_beam(model, embeds: torch.Tensor, K: int, n: int, length_penalty: float) -> list[int]:
    """Hugging Face's beam search on the plain model over one row's input embeddings (L, D)."""
    with torch.no_grad():
        out = model.generate(
            inputs_embeds=embeds[None], attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long),
            num_beams=K, max_new_tokens=n, length_penalty=length_penalty, early_stopping=False,
            do_sample=False, eos_token_id=EOS, pad_token_id=0,
        )[0].tolist()  # fmt: skip
    return out[: out.index(EOS)] if EOS in out else out


def scratch_beam(next_logp, K: int, n: int, length_penalty: float) -> tuple[list[int], str]:
    """Beam search written plainly: every candidate's log-probability recomputed from the whole
    sequence, the best 2K continuations per step, the best K of them may finish (EOS or the last step),
    stop when the best open beam cannot beat the K finished."""
    open_beams: list[tuple[float, list[int]]] = [(0.0, [])]
    finished: list[tuple[float, list[int], str]] = []
    for step in range(n):
        cands = [(s + float(lp), seq, t) for s, seq in open_beams for t, lp in enumerate(next_logp(seq))]
        cands = sorted(cands, key=lambda c: -c[0])[: 2 * K]
        length, last = (step + 1) ** length_penalty, step == n - 1
        for s, seq, t in cands[:K]:
            if t == EOS or last:
                finished.append(
                    (s / length, seq if t == EOS else [*seq, t], "stop" if t == EOS else "length")
                )
        finished = sorted(finished, key=lambda f: -f[0])[:K]
        if last:
            break
        open_beams = [(s, [*seq, t]) for s, seq, t in cands if t != EOS][:K]
        if len(finished) == K and open_beams[0][0] / length <= finished[-1][0]:
            break
    return finished[0][1], finished[0][2]


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_beam_search_equals_hf_beam_search_mixed_prompts(arch, cached, length_penalty):
    model = MODELS[arch]()
    lm = PromptedLM(model)
    bank = torch.randn(3, 6, 32, generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([6, 4, 5])
    index = torch.tensor([0, 1, 2, 1])
    ids, mask = batch()
    run = {"max_new_tokens": 8, "eos_token_id": EOS}
    if cached:
        prefix = lm.prefix_cache(bank, lengths)
        ours = generate(lm, ids, mask, prefix=prefix, prompt_index=index, num_beams=4,
                        length_penalty=length_penalty, **run)  # fmt: skip
        greedy = generate(lm, ids, mask, prefix=prefix, prompt_index=index, **run)
    else:
        prompt = {"prompt": bank, "prompt_index": index, "prompt_lengths": lengths[index]}
        ours = generate(lm, ids, mask, num_beams=4, length_penalty=length_penalty, **prompt, **run)
        greedy = generate(lm, ids, mask, **prompt, **run)
    emb = model.get_input_embeddings()
    with torch.no_grad():
        for b in range(4):
            embeds = torch.cat([bank[index[b], : lengths[index[b]]], emb(ids[b][mask[b].bool()])])
            want = hf_beam(model, embeds, 4, 8, length_penalty)
            assert ours.tokens[b] == want, f"row {b}"
            assert ours.finish_reasons[b] == ("length" if len(want) == 8 else "stop")
    assert ours.tokens != greedy.tokens  # the search found other outputs than greedy decoding


def test_rows_that_end_early_leave_the_batch_without_changing_the_others():
    """Rows finish at different steps (some at EOS): each equals its own run alone."""
    lm = PromptedLM(tiny_llama(initializer_range=0.3))
    prompt = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    ids, mask = batch(seed=0, B=4)
    together = generate(lm, ids, mask, prompt=prompt, max_new_tokens=8, eos_token_id=EOS, num_beams=3)
    assert "stop" in together.finish_reasons and "length" in together.finish_reasons
    for b in range(4):
        row = ids[b][mask[b].bool()].unsqueeze(0)
        alone = generate(lm, row, None, prompt=prompt, max_new_tokens=8, eos_token_id=EOS, num_beams=3)
        assert alone.tokens[0] == together.tokens[b], f"row {b}"


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_beam_search_with_a_deep_prompt_equals_scratch_search_over_peft(arch, tmp_path):
    from peft import PeftModel

    model = MODELS[arch]()
    shape = KVShape.of_model(model)
    weight = torch.randn(4, shape.width, generator=torch.Generator().manual_seed(2)) * 0.5
    deep = DeepPrompt(weight, shape, PromptMeta(init="random"))
    save_prompt(deep, tmp_path / "deep", model)
    ids, mask = batch(seed=3, B=3)
    lm = PromptedLM(model)
    ours = generate(lm, ids, mask, prompt=deep, max_new_tokens=6, eos_token_id=EOS, num_beams=3)
    cached = generate(lm, ids, mask, prefix=lm.prefix_cache(deep), max_new_tokens=6, eos_token_id=EOS,
                      num_beams=3)  # fmt: skip
    assert cached.tokens == ours.tokens
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(MODELS[arch](), str(tmp_path / "deep")).eval()
    for b in range(3):
        row = ids[b][mask[b].bool()].tolist()

        def next_logp(seq, row=row):
            with torch.no_grad():
                logits = peft_model(input_ids=torch.tensor([row + seq])).logits[0, -1]
            return torch.log_softmax(logits.float(), dim=-1).tolist()

        tokens, reason = scratch_beam(next_logp, 3, 6, 1.0)
        assert ours.tokens[b] == tokens and ours.finish_reasons[b] == reason, f"row {b}"


def test_one_beam_is_greedy_decoding(llama):
    lm = PromptedLM(llama)
    prompt = torch.randn(4, 32, generator=torch.Generator().manual_seed(5))
    ids, mask = batch()
    one = generate(lm, ids, mask, prompt=prompt, max_new_tokens=6, num_beams=1)
    greedy = generate(lm, ids, mask, prompt=prompt, max_new_tokens=6)
    assert one.tokens == greedy.tokens and one.finish_reasons == greedy.finish_reasons


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_beams": 0}, "num_beams must be >= 1"),
        ({"num_beams": 2, "length_penalty": 50.0}, "length_penalty must be in"),
        ({"num_beams": 2, "do_sample": True, "temperature": 0.7}, "does not combine with sampling"),
        ({"num_beams": 2, "stop_strings": ["the"]}, "does not combine with stop_strings"),
        ({"num_beams": 2, "logit_bias": {5: 1.0}, "presence_penalty": 0.5}, "logit_bias, presence_penalty"),
    ],
)
def test_settings_beam_search_cannot_use_are_refused(llama, kwargs, message):
    ids, mask = batch()
    with pytest.raises(UsageError, match=message):
        generate(PromptedLM(llama), ids, mask, max_new_tokens=4, tokenizer=make_tokenizer(), **kwargs)


def test_generator_and_report_with_beams(llama):
    """The Generator's batches (length-sorted, with the cached prefix) give what ``generate`` gives
    row by row, and the report says how it decoded."""
    tok = make_tokenizer()
    prompt = torch.randn(4, 32, generator=torch.Generator().manual_seed(6))
    texts = ["the food was", "a very boring film and", "it is"]
    gen = Generator(llama, tok, prompt, template="{text}", batch_size=2)
    out = gen.generate(texts, max_new_tokens=5, num_beams=3)
    for text, tokens in zip(texts, out.tokens, strict=True):
        ids = torch.tensor([tok(text)["input_ids"]])
        alone = generate(
            PromptedLM(llama), ids, None, prompt=prompt, max_new_tokens=5, num_beams=3, tokenizer=tok
        )
        assert alone.tokens[0] == tokens
    report = evaluate_generation(gen, texts, [[t] for t in out.texts], 5, num_beams=3)
    assert report["num_beams"] == 3 and report["exact_match"] == 1.0


def test_beam_settings_outside_generation_are_not_ignored_silently(llama, caplog):
    from softprompt.errors import ConfigError
    from softprompt.training import TrainConfig

    with pytest.raises(ConfigError, match="task=classification scores label words"):
        TrainConfig(task="classification", num_beams=3)
    TrainConfig(task="generation", num_beams=3, length_penalty=0.5)  # accepted
    ids, mask = batch()
    with caplog.at_level("WARNING", logger="softprompt.beam"):
        generate(PromptedLM(llama), ids, mask, max_new_tokens=2, length_penalty=2.0)
    assert "length_penalty=2.0 has no effect with num_beams=1" in caplog.text
