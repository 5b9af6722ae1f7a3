"""softprompt.vllm: the prompt_embeds requests for vLLM, checked without vLLM (the tensor they carry,
run through the Hugging Face model as inputs_embeds, gives PromptedLM's first-token logits), the
`softprompt export-embeds` command, and one real-vLLM test where vLLM and a GPU are present."""

from __future__ import annotations

import base64
import importlib.util
import json

import pytest
import torch

from helpers.architectures import ARCHITECTURES
from helpers.tiny import MODEL_FACTORIES, make_tokenizer, tiny_llama
from helpers.vllm import first_layer_input
from softprompt import SoftPrompt, save_prompt
from softprompt.errors import UsageError
from softprompt.meta import PromptMeta
from softprompt.model import PromptedLM
from softprompt.vllm import decode_embeds, encode_embeds, input_ids, openai_arguments, prompt_embeds_request

CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}question {% else %}answer {% endif %}"
    "{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}answer{% endif %}"
)


def trained(P: int = 5, template: str | None = "review {text} sentiment", seed: int = 0) -> SoftPrompt:
    g = torch.Generator().manual_seed(seed)
    return SoftPrompt(torch.randn(P, 32, generator=g) * 0.5, PromptMeta(template=template, base_model="tiny"))


def first_token_logits_of(request: dict, model) -> torch.Tensor:
    """What vLLM computes first: the base model on the sent tensor as inputs_embeds, last position."""
    embeds = decode_embeds(request["prompt_embeds"])
    with torch.no_grad():
        return model(inputs_embeds=embeds[None]).logits[0, -1]


@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
@pytest.mark.parametrize("text", ["the film was good", "a"])
def test_the_sent_tensor_gives_prompted_lm_first_token_logits(arch, text):
    model, tok = MODEL_FACTORIES[arch](), make_tokenizer()
    prompt = trained()
    request = prompt_embeds_request(prompt, text, tok, model, max_tokens=4)
    assert (
        set(request) == {"model", "prompt_embeds", "max_tokens", "temperature"} and request["model"] == "tiny"
    )
    embeds = decode_embeds(request["prompt_embeds"])
    ids = tok("review " + text + " sentiment", add_special_tokens=False)["input_ids"]  # the prompt's template
    assert embeds.shape == (5 + len(ids), 32) and embeds.dtype == torch.float32
    torch.testing.assert_close(embeds[:5], prompt.weight)  # the prompt first, at positions 0..P-1
    ours = PromptedLM(model)(torch.tensor([ids]), prompt=prompt)[0]
    torch.testing.assert_close(first_token_logits_of(request, model), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_the_sent_tensor_is_what_our_model_feeds_its_first_layer(arch):
    """Llama and Gemma 3: the request's tensor IS the first block's input (Gemma's token vectors
    include its sqrt(hidden) scale, and the prompt lives in that space). GPT-2 adds its position
    embeddings to the tensor first, as it does to inputs_embeds. Prompt in front of the row (the
    concatenated layout), so the block sees [prompt; tokens] in order."""
    model, tok = ARCHITECTURES[arch](), make_tokenizer()
    prompt = SoftPrompt(torch.randn(5, 32, generator=torch.Generator().manual_seed(3)) * 2.0)
    request = prompt_embeds_request(prompt, "the film was good", tok, model, template="{text}")
    sent = decode_embeds(request["prompt_embeds"])
    ids = tok("the film was good", add_special_tokens=False)["input_ids"]
    fed = first_layer_input(PromptedLM(model, shared_prefix=False), ids, prompt)
    if arch == "gpt2":
        fed = fed - model.transformer.wpe(torch.arange(len(sent))).detach()
        torch.testing.assert_close(sent, fed, atol=1e-6, rtol=0)
    else:
        assert torch.equal(sent, fed)
    if arch == "gemma3":  # the scaled vectors, not the embedding matrix's rows
        raw = model.get_input_embeddings().weight.detach()[ids]
        torch.testing.assert_close(sent[5:], raw * 32**0.5, rtol=1e-6, atol=0)


def test_template_override_chat_messages_and_batches():
    model, tok = tiny_llama(), make_tokenizer()
    prompt = trained()
    lm = PromptedLM(model)
    # an explicit template replaces the prompt's own
    req = prompt_embeds_request(prompt, "the film", tok, model, template="text {text} answer")
    ids = tok("text the film answer", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(first_token_logits_of(req, model), lm(torch.tensor([ids]), prompt=prompt)[0],
                               atol=1e-5, rtol=0)  # fmt: skip
    # a conversation in the chat template, after the prompt
    tok.chat_template = CHAT_TEMPLATE
    messages = [{"role": "user", "content": "the film"}, {"role": "assistant", "content": "good"},
                {"role": "user", "content": "the food"}]  # fmt: skip
    chat = prompt_embeds_request(prompt, None, tok, model, messages=messages)
    chat_ids = input_ids(tok, messages=messages)
    assert tok.decode(chat_ids) == "question the film answer good question the food answer"
    torch.testing.assert_close(first_token_logits_of(chat, model), lm(torch.tensor([chat_ids]), prompt=prompt)[0],
                               atol=1e-5, rtol=0)  # fmt: skip
    # several texts: one tensor each, in order
    many = prompt_embeds_request(
        prompt, ["the film", "a boring plot"], tok, model, stop=["\n"], served_model="m"
    )
    assert isinstance(many["prompt_embeds"], list) and len(many["prompt_embeds"]) == 2
    assert many["model"] == "m" and many["stop"] == ["\n"]
    assert decode_embeds(many["prompt_embeds"][1]).shape[0] == 5 + len(
        tok("review a boring plot sentiment")["input_ids"]
    )
    # the openai client's form: an empty prompt and the tensor in extra_body
    args = openai_arguments(req)
    assert args["prompt"] == "" and args["extra_body"] == {"prompt_embeds": req["prompt_embeds"]}
    assert "prompt_embeds" not in {k for k in args if k != "extra_body"}


def test_bfloat16_model_and_tensor():
    model, tok = tiny_llama(dtype=torch.bfloat16), make_tokenizer()
    prompt = trained()
    req = prompt_embeds_request(prompt, "the film", tok, model, dtype=torch.bfloat16)
    embeds = decode_embeds(req["prompt_embeds"])
    assert embeds.dtype == torch.bfloat16  # half the bytes of float32
    ids = tok("review the film sentiment", add_special_tokens=False)["input_ids"]
    ours = PromptedLM(model)(torch.tensor([ids]), prompt=prompt)[0]
    with torch.no_grad():
        theirs = model(inputs_embeds=embeds[None]).logits[0, -1]
    torch.testing.assert_close(
        theirs.float(), ours.float(), atol=1e-5, rtol=0
    )  # same bf16 inputs, same result


def test_bad_inputs_are_refused():
    model, tok = tiny_llama(), make_tokenizer()
    with pytest.raises(UsageError, match="hidden size"):
        prompt_embeds_request(torch.randn(4, 16), "the film", tok, model)
    with pytest.raises(UsageError, match="no chat template"):
        prompt_embeds_request(trained(), None, tok, model, messages=[{"role": "user", "content": "a"}])
    with pytest.raises(UsageError, match="either"):
        input_ids(tok)
    with pytest.raises(UsageError, match="2-D float"):
        decode_embeds(encode_embeds(torch.zeros(2, 3, 4)))
    with pytest.raises(Exception):  # noqa: B017  pickled code is refused, as vLLM's weights_only load does
        decode_embeds(base64.b64encode(b"cos\nsystem\n(S'true'\ntR.").decode())


def test_cli_export_embeds_writes_one_request_per_text(tmp_path, tiny_model_dir, capsys):
    from softprompt.cli import main
    from softprompt.loading import load_model

    model, tok = load_model(tiny_model_dir)
    prompt = trained(template="news {text} label")
    save_prompt(prompt, tmp_path / "p", model)
    main(["export-embeds", str(tmp_path / "p"), "the film", "a boring plot", "--model", tiny_model_dir,
          "--max_tokens", "3", "--served_model", "tiny-llama"])  # fmt: skip
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and all(r["model"] == "tiny-llama" and r["max_tokens"] == 3 for r in lines)
    ids = tok("news the film label", add_special_tokens=False)["input_ids"]
    ours = PromptedLM(model)(torch.tensor([ids]), prompt=prompt)[0]
    torch.testing.assert_close(first_token_logits_of(lines[0], model), ours, atol=1e-5, rtol=0)
    out = tmp_path / "requests.jsonl"
    main(["export-embeds", str(tmp_path / "p"), "the film", "--model", tiny_model_dir, "--template", "{text}",
          "--output", str(out)])  # fmt: skip
    (req,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert decode_embeds(req["prompt_embeds"]).shape == (5 + len(tok("the film")["input_ids"]), 32)


# ---------------------------------------------------------------------------- real vLLM
HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.slow
@pytest.mark.skipif(not (HAS_VLLM and torch.cuda.is_available()), reason="needs vLLM and a CUDA GPU")
def test_real_vllm_generates_what_prompted_lm_generates(tmp_path):
    """vLLM (offline LLM with enable_prompt_embeds) on our tensor: the greedy tokens of PromptedLM."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from vllm import LLM, SamplingParams

    from softprompt.decoding import generate

    torch.manual_seed(0)  # head_dim 64: attention kernels on GPUs want it
    cfg = LlamaConfig(vocab_size=200, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=1, bos_token_id=None, pad_token_id=0)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    tok = make_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    prompt = SoftPrompt(torch.randn(6, 256, generator=torch.Generator().manual_seed(1)) * 0.05)
    req = prompt_embeds_request(prompt, "the film was", tok, model, template="{text}")
    llm = LLM(model=str(tmp_path / "m"), enable_prompt_embeds=True, dtype="float32", enforce_eager=True,
              gpu_memory_utilization=0.3, max_model_len=256)  # fmt: skip
    out = llm.generate([{"prompt_embeds": decode_embeds(req["prompt_embeds"])}],
                       SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))  # fmt: skip
    ids = tok("the film was", add_special_tokens=False)["input_ids"]
    ours = generate(PromptedLM(model), torch.tensor([ids]), prompt=prompt, max_new_tokens=8, eos_token_id=-1)
    assert list(out[0].outputs[0].token_ids) == ours.tokens[0]
