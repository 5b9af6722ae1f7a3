"""Generation: decoding against references (explicit embeddings, PEFT), the cached prefix, stop strings,
loss masking for generation training, metrics and the CLI."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch.nn import functional as F

from helpers.tiny import MODEL_FACTORIES, WORDS, make_tokenizer, tiny_llama
from helpers.tiny import left_padded_batch as batch
from softprompt import SoftPrompt, save_prompt
from softprompt.decoding import Generator, generate, pick_tokens
from softprompt.errors import DataError
from softprompt.metrics import generation_report
from softprompt.model import PromptedLM
from softprompt.prefix import PromptPrefix
from softprompt.text import pad_rows
from softprompt.training import TrainConfig, train
from softprompt.training.tasks import GenerationTask

EOS = 1


def reference_greedy(model, prompt_rows: torch.Tensor, row_ids: list[int], n: int) -> list[int]:
    """The plain HF model given [prompt; tokens] as explicit embeddings, recomputed from scratch each step."""
    out, cur = [], list(row_ids)
    emb = model.get_input_embeddings()
    for _ in range(n):
        embeds = torch.cat([prompt_rows, emb(torch.tensor(cur))])[None]
        token = int(model(inputs_embeds=embeds).logits[0, -1].argmax())
        if token == EOS:
            break
        out.append(token)
        cur.append(token)
    return out


@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
@pytest.mark.parametrize("cached", [False, True])
def test_greedy_equals_explicit_embedding_reference_mixed_prompts(arch, cached):
    model = MODEL_FACTORIES[arch]()
    lm = PromptedLM(model)
    bank = torch.randn(3, 6, 32, generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([6, 4, 5])  # prompt n fills slots 0..L_n-1 of bank row n
    ids, mask = batch()
    index = torch.tensor([0, 1, 2, 1])
    if cached:
        prefix = lm.prefix_cache(bank, lengths)
        out = generate(lm, ids, mask, prefix=prefix, prompt_index=index, max_new_tokens=8, eos_token_id=EOS)
    else:
        out = generate(lm, ids, mask, prompt=bank, prompt_index=index, prompt_lengths=lengths[index],
                          max_new_tokens=8, eos_token_id=EOS)  # fmt: skip
    with torch.no_grad():
        for b in range(4):
            p = bank[index[b], : lengths[index[b]]]  # that row's prompt: the first L slots of its bank row
            want = reference_greedy(model, p, ids[b][mask[b].bool()].tolist(), 8)
            assert out.tokens[b] == want, f"row {b}"
            assert out.finish_reasons[b] == ("length" if len(want) == 8 else "stop")


def test_right_padded_input_generates_the_same_as_left_padded():
    lm = PromptedLM(tiny_llama())
    prompt = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    ids, mask = batch()
    right_ids, right_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for b in range(ids.shape[0]):
        real = ids[b][mask[b].bool()]
        right_ids[b, : len(real)], right_mask[b, : len(real)] = real, 1
    a = generate(lm, ids, mask, prompt=prompt, max_new_tokens=6)
    b = generate(lm, right_ids, right_mask, prompt=prompt, max_new_tokens=6)
    assert a.tokens == b.tokens


@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_greedy_equals_peft_generate(arch, tmp_path):
    peft = pytest.importorskip("peft")
    prompt = SoftPrompt(torch.randn(5, 32, generator=torch.Generator().manual_seed(3)))
    save_prompt(prompt, tmp_path / "p", MODEL_FACTORIES[arch]())
    ids, mask = batch(seed=4, B=3)
    ours = generate(
        PromptedLM(MODEL_FACTORIES[arch]()),
        ids,
        mask,
        prefix=None,
        prompt=prompt,
        max_new_tokens=6,
        eos_token_id=EOS,
    )
    theirs_model = peft.PeftModel.from_pretrained(MODEL_FACTORIES[arch](), str(tmp_path / "p"))
    # One row at a time: with left padding, HF's generate gives padded rows other positions than the
    # same row unpadded, while ours gives the same tokens padded or not (tested above).
    for b in range(3):
        row = ids[b][mask[b].bool()].tolist()
        with torch.no_grad():
            loop = []  # greedy through PEFT's forward, recomputed from scratch each step
            for _ in range(6):
                token = int(theirs_model(input_ids=torch.tensor([row + loop])).logits[0, -1].argmax())
                if token == EOS:
                    break
                loop.append(token)
            gen = theirs_model.generate(input_ids=torch.tensor([row]), max_new_tokens=6, do_sample=False,
                                        eos_token_id=EOS, pad_token_id=0)[0, len(row) :].tolist()  # fmt: skip
        gen = gen[: gen.index(EOS)] if EOS in gen else gen
        assert ours.tokens[b] == loop, f"row {b}"
        if arch == "gpt2":
            assert ours.tokens[b] == gen, f"row {b}"
        else:  # PEFT 0.21 + transformers 5.x: Llama's generate leaves its own forward after 2 tokens
            assert ours.tokens[b][:2] == gen[:2], f"row {b}"


def test_cached_and_uncached_logits_agree_for_mixed_prompts_and_left_padding():
    lm = PromptedLM(tiny_llama())
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randn(n, 32, generator=g) for n in (3, 7, 5)]
    prefix = PromptPrefix.cat([lm.prefix_cache(p) for p in prompts])  # separately cached, then combined
    bank = torch.stack([F.pad(p, (0, 0, 0, 7 - len(p))) for p in prompts])  # (3, 7, D), padded at the end
    lengths = torch.tensor([3, 7, 5])
    ids, mask = batch(seed=6, B=5)
    index = torch.tensor([2, 0, 1, 0, 2])
    with torch.no_grad():
        plain = lm(ids, mask, prompt=bank, prompt_index=index, prompt_lengths=lengths[index], positions="all")
        cached = lm(ids, mask, prefix=prefix, prompt_index=index, positions="all")
    real = mask.bool()
    torch.testing.assert_close(cached[real], plain[real], atol=1e-5, rtol=1e-5)  # fp32: summation order only


def test_prefix_guards():
    lm = PromptedLM(tiny_llama())
    prompt = torch.randn(4, 32)
    prefix = lm.prefix_cache(prompt)
    ids, mask = batch()
    with pytest.raises(ValueError, match="either prompt or prefix"):
        lm(ids, mask, prompt=prompt, prefix=prefix)
    with pytest.raises(ValueError, match="prompt_index values"):
        lm(ids, mask, prefix=prefix, prompt_index=torch.tensor([0, 1, 0, 0]))
    lm.model.to(torch.bfloat16)
    with pytest.raises(ValueError, match="make the prefix with the model as it is now"):
        lm(ids, mask, prefix=prefix)


def test_stop_strings_cut_the_text_and_the_tokens():
    tok = make_tokenizer()
    lm = PromptedLM(tiny_llama())
    prompt = torch.randn(4, 32, generator=torch.Generator().manual_seed(7))
    ids = torch.tensor([tok("the film was")["input_ids"]])
    free = generate(lm, ids, prompt=prompt, max_new_tokens=6, tokenizer=tok, eos_token_id=EOS)
    assert len(free.tokens[0]) >= 3, "the tiny model should produce a few tokens here"
    words = free.texts[0].split()
    stop = words[2]  # the third generated word
    cut = generate(
        lm, ids, prompt=prompt, max_new_tokens=6, tokenizer=tok, eos_token_id=EOS, stop_strings=[stop]
    )
    first = free.texts[0].find(stop)
    assert cut.texts[0] == free.texts[0][:first]
    assert cut.finish_reasons == ["stop"]
    assert tok.decode(cut.tokens[0]).strip() == cut.texts[0].strip()
    with pytest.raises(ValueError, match="need the tokenizer"):
        generate(lm, ids, prompt=prompt, stop_strings=["x"])


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(pick_tokens(logits, True, 1.0, 0.5, g)) for _ in range(50)}
    assert draws == {0}  # token 0 alone holds > 0.5 of the mass
    draws = {int(pick_tokens(logits, True, 1.0, 0.99, g)) for _ in range(300)}
    assert {0, 1} <= draws
    lm = PromptedLM(tiny_llama())
    ids, mask = batch()
    run = [generate(lm, ids, mask, do_sample=True, temperature=1.5, max_new_tokens=5,
                       generator=torch.Generator().manual_seed(9)).tokens for _ in range(2)]  # fmt: skip
    assert run[0] == run[1]
    with pytest.raises(ValueError, match="top_p"):
        generate(lm, ids, mask, top_p=0.0)


# ----------------------------------------------------------------------------- training
def gen_config(tmp_path, path, **kw) -> TrainConfig:
    base = {
        "train_file": str(path), "task": "generation", "template": "{text} answer", "model": "unused",
        "num_virtual_tokens": 4, "init": "random", "batch_size": 4, "max_steps": 2, "eval_every": 2,
        "output_dir": str(tmp_path / "run"), "max_new_tokens": 4, "max_target_length": 6,
    }  # fmt: skip
    return TrainConfig(**{**base, **kw})


def write_pairs(path, n: int = 24) -> str:
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(WORDS[(i * 3 + k) % 20] for k in range(3))
            f.write(json.dumps({"input": text, "target": "good movie" if i % 2 else "bad film"}) + "\n")
    return str(path)


def test_generation_loss_counts_only_target_tokens(tmp_path):
    tok = make_tokenizer()
    model = tiny_llama()
    task = GenerationTask(gen_config(tmp_path, write_pairs(tmp_path / "d.jsonl")))
    task.prepare(tok)
    prompt = SoftPrompt(torch.randn(4, 32, generator=torch.Generator().manual_seed(0)))
    idx = [0, 1, 2]
    loss, _ = task.batch_loss(PromptedLM(model), prompt, idx)
    # Reference: the plain model on [prompt; input; target; EOS], cross-entropy on target + EOS only.
    losses = []
    with torch.no_grad():
        for i in idx:
            row, start = task.train_set.rows[i], task.train_set.starts[i]
            assert row[-1] == tok.eos_token_id
            emb = torch.cat([prompt.weight, model.get_input_embeddings()(torch.tensor(row))])[None]
            logits = model(inputs_embeds=emb).logits[0, 4:]  # aligned to the row
            losses.append(
                F.cross_entropy(logits[start - 1 : len(row) - 1], torch.tensor(row[start:]), reduction="none")
            )
    torch.testing.assert_close(loss.detach(), torch.cat(losses).mean(), atol=1e-5, rtol=1e-5)


def test_generation_data_errors_and_truncation(tmp_path, caplog):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"input": "the film", "target": ""})
        + "\n"
        + json.dumps({"input": "a", "target": "b"})
        + "\n"
    )
    with pytest.raises(DataError, match="bad.jsonl:1"):
        GenerationTask(gen_config(tmp_path, bad))
    none = tmp_path / "none.jsonl"
    none.write_text(json.dumps({"input": "the film", "answer": "good"}) + "\n")
    with pytest.raises(DataError, match="--target_column"):
        GenerationTask(gen_config(tmp_path, none))
    task = GenerationTask(gen_config(tmp_path, write_pairs(tmp_path / "d.jsonl"), max_target_length=1))
    with caplog.at_level(logging.WARNING):
        task.prepare(make_tokenizer())
    assert "targets (max_target_length=1)" in caplog.text
    assert all(r[-1] != 1 for r in task.train_set.rows), "a cut target must not end in EOS"
    val_inputs = set(task.val_set.inputs)
    assert val_inputs and not val_inputs & {
        task.tokenizer.decode(r[:s]) for r, s in zip(task.train_set.rows, task.train_set.starts, strict=True)
    }


def test_eos_is_learned_and_honoured(tmp_path):
    """A prompt trained on 'input -> good movie <eos>' makes the model say it and stop."""
    tiny_model_dir = str(tmp_path / "model")
    tiny_llama(initializer_range=0.3).save_pretrained(tiny_model_dir)  # steerable by a prompt
    make_tokenizer().save_pretrained(tiny_model_dir)
    data = write_pairs(tmp_path / "d.jsonl", 40)
    with open(data, "w") as f:  # one target for every input: easy to learn for a random tiny model
        for i in range(40):
            f.write(
                json.dumps({"input": " ".join(WORDS[(i + k) % 20] for k in range(3)), "target": "good movie"})
                + "\n"
            )
    cfg = gen_config(tmp_path, data, model=tiny_model_dir, max_steps=60, eval_every=60, lr=0.3, warmup_steps=0,
                     num_virtual_tokens=6, test_file=data, baselines=False)  # fmt: skip
    results = train(cfg)
    assert results["test_trained"]["exact_match"] == 1.0
    assert results["test_trained"]["rougeL"] == 1.0
    from softprompt.loading import load_model
    from softprompt.prompt import load_prompt

    model, tok = load_model(tiny_model_dir)
    gen = Generator(model, tok, load_prompt(tmp_path / "run/prompt", model))
    out = gen.generate(["the a an"], max_new_tokens=10)
    assert out.texts == ["good movie"] and out.finish_reasons == ["stop"]


def test_generation_report_uses_every_reference():
    refs = [["the cat sat", "a cat sat down"], ["hello there"]]
    report = generation_report(["a cat sat down", "hello there"], refs)
    assert report["exact_match"] == 1.0 and report["rougeL"] == 1.0
    assert report["bleu"] == pytest.approx(1.0)
    worse = generation_report(["a dog ran", "goodbye"], refs)
    assert worse["exact_match"] == 0.0 and worse["bleu"] < 0.2 and 0 < worse["rougeL"] < 0.5
    with pytest.raises(ValueError, match="at least one reference"):
        generation_report(["x"], [[]])


def test_cli_train_and_generate(tmp_path, tiny_model_dir, capsys):
    from softprompt.cli import main

    data = write_pairs(tmp_path / "d.jsonl")
    out = tmp_path / "cli"
    main(["train", "--task", "generation", "--train_file", data, "--test_file", data, "--model", tiny_model_dir,
          "--template", "{text} answer", "--max_steps", "2", "--eval_every", "2", "--num_virtual_tokens", "3",
          "--init", "random", "--max_new_tokens", "3", "--output_dir", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert "test rougeL:" in printed and "softprompt generate" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "generation" and {"bleu", "rougeL", "exact_match"} <= set(
        metrics["test_trained"]
    )
    main(["generate", str(out / "prompt"), "the film", "good food", "--stop", '["zzz"]'])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["input"] for r in lines] == ["the film", "good food"]
    assert all(r["finish_reason"] in ("stop", "length") and isinstance(r["output"], str) for r in lines)
    # cached and uncached give the same text
    main(["generate", str(out / "prompt"), "the film", "good food", "--prefix_cache", "false"])
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == lines


def test_cli_beam_search_in_training_eval_and_generate(tmp_path, tiny_model_dir, capsys):
    from softprompt.cli import main
    from softprompt.loading import load_model
    from softprompt.prompt import load_prompt

    data = write_pairs(tmp_path / "d.jsonl")
    out = tmp_path / "beams"
    main(["train", "--task", "generation", "--train_file", data, "--test_file", data, "--model", tiny_model_dir,
          "--template", "{text} answer", "--max_steps", "2", "--eval_every", "2", "--num_virtual_tokens", "3",
          "--init", "random", "--max_new_tokens", "4", "--num_beams", "3", "--output_dir", str(out)])  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_trained"]["num_beams"] == 3 and metrics["test_zero_shot"]["num_beams"] == 3
    capsys.readouterr()
    main(["generate", str(out / "prompt"), "the film", "good food", "--num_beams", "3"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    model, tok = load_model(tiny_model_dir)
    want = Generator(model, tok, load_prompt(out / "prompt")).generate(["the film", "good food"], max_new_tokens=4,
                                                                       num_beams=3)  # fmt: skip
    assert [r["output"] for r in lines] == want.texts
    main(["eval", str(out / "prompt"), data, "--num_beams", "2"])
    assert "best of 2 beams" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stopped:
        main(["generate", str(out / "prompt"), "the film", "--num_beams", "2", "--temperature", "0.7"])
    assert stopped.value.code == 2 and "does not combine with sampling" in capsys.readouterr().err


@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_prefix_with_fixed_tokens_equals_running_them_as_input(arch):
    """prefix_cache(tokens=head): inputs without the head give the logits of head + input run in full."""
    model = MODEL_FACTORIES[arch]()
    lm = PromptedLM(model)
    bank = torch.randn(3, 6, 32, generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([6, 2, 5])
    head = [7, 11, 4]
    g = torch.Generator().manual_seed(4)
    rest = [torch.randint(3, 60, (n,), generator=g).tolist() for n in (5, 1, 3, 4)]
    index = torch.tensor([2, 0, 1, 1])
    ids, mask = pad_rows(rest, 0)
    full_ids, full_mask = pad_rows([head + r for r in rest], 0)
    with torch.no_grad():
        ours = lm(ids, mask, prefix=lm.prefix_cache(bank, lengths, tokens=head), prompt_index=index,
                  positions="all")  # fmt: skip
        ref = lm(full_ids, full_mask, prompt=bank, prompt_index=index, prompt_lengths=lengths[index],
                 positions="all")[:, len(head):]  # fmt: skip
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- step by step
@pytest.mark.parametrize("stops", [None, ["neutral world", "classify"]])
def test_generate_steps_add_up_to_generate_and_report_logprobs(stops):
    """generate_steps yields each row's tokens as they come; together they are generate's output, every
    row ends exactly once, and logprobs are the model's log-softmax at each step."""
    from softprompt.decoding import generate_steps

    tok = make_tokenizer()
    lm = PromptedLM(tiny_llama())
    prompt = torch.randn(4, 32, generator=torch.Generator().manual_seed(7))
    ids, mask = pad_rows([tok(t)["input_ids"] for t in ("the film was", "a", "news of the world")], 0, "left")
    kw = {"max_new_tokens": 7, "tokenizer": tok, "eos_token_id": EOS, "stop_strings": stops}
    want = generate(lm, ids, mask, prompt=prompt, **kw)
    steps = list(generate_steps(lm, ids, mask, prompt=prompt, logprobs=3, **kw))
    assert [s.index for s in steps] == list(range(len(steps))) and len(steps) <= 7
    ended = [b for s in steps for b in s.ended]
    assert sorted(ended) == [0, 1, 2]  # each row ends once
    for b in range(3):
        streamed = [s.tokens[b] for s in steps if s.tokens[b] is not None]
        end = next(s.ended[b] for s in steps if b in s.ended)
        assert (end.tokens, end.text, end.reason) == (want.tokens[b], want.texts[b], want.finish_reasons[b])
        assert streamed[: len(end.tokens)] == end.tokens  # a stop string only cuts the end
    # logprobs: the log-softmax of the model's next-token logits for the picked token, with the top 3
    row = ids[0][mask[0].bool()].tolist()
    with torch.no_grad():
        for k, step in enumerate(steps[:3]):
            if step.tokens[0] is None:
                break
            logits = lm(torch.tensor([row + want.tokens[0][:k]]), prompt=prompt)[0]
            ref = torch.log_softmax(logits, -1)
            lp = step.logprobs[0]
            assert lp.logprob == pytest.approx(float(ref[step.tokens[0]]), abs=1e-4)
            assert [i for i, _ in lp.top] == ref.topk(3).indices.tolist()
            assert lp.top[0][0] == step.tokens[0]  # greedy picks the most likely token


def test_generate_steps_check_at_the_first_step_and_can_stop_early():
    from softprompt.decoding import generate_steps

    lm = PromptedLM(tiny_llama())
    ids, mask = batch()
    steps = generate_steps(lm, ids, mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        next(steps)
    steps = generate_steps(lm, ids, mask, max_new_tokens=50, eos_token_id=EOS)
    first = next(steps)
    assert len(first.tokens) == ids.shape[0]
    steps.close()  # a caller may stop decoding at any step
