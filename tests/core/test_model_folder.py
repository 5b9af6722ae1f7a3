"""Model folders other engines read: a tied embedding is saved under the input embedding's name, as
vLLM needs (it reads weights by name and ties the head to the embedding, never the other way)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.tiny import make_tokenizer, tiny_gpt2, tiny_llama
from softprompt.cli import main as cli_main
from softprompt.model_folder import WEIGHTS, repair_tied_names, save_model_folder, tied_names, weight_names


def tied_llama():
    from transformers import LlamaForCausalLM

    model = tiny_llama()
    model.config.tie_word_embeddings = True
    tied = LlamaForCausalLM(model.config).eval()
    tied.load_state_dict(model.state_dict(), strict=False)
    tied.tie_weights()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    return tied


def load_like_vllm(folder) -> torch.nn.Module:
    """A model from ``folder``'s config with every weight taken by its name, as vLLM's loaders do: a
    tied head is skipped in the file and made to share the input embedding; anything the file lacks
    stays unset (NaN here, so it shows)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config).eval()
    tensors = load_file(str(folder / WEIGHTS))
    tied = config.tie_word_embeddings
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        for name, p in model.named_parameters(remove_duplicate=False):
            if tied and p is head and name.startswith("lm_head"):
                continue  # vLLM: "lm_head is tied: skip its weight", filled from the embedding below
            p.copy_(tensors[name]) if name in tensors else p.fill_(float("nan"))
        if tied:
            model.lm_head.weight = model.get_input_embeddings().weight
    return model


@pytest.mark.parametrize("factory", [tiny_gpt2, tied_llama], ids=["gpt2", "llama-tied"])
def test_a_tied_embedding_is_saved_under_the_input_embeddings_name_and_vllm_style_loading_is_exact(
    factory, tmp_path
):
    model = factory()
    embed, head = tied_names(model)
    save_model_folder(model, tmp_path / "m", make_tokenizer())
    names = weight_names(tmp_path / "m")
    assert embed in names and head not in names
    model.config.architectures = None  # as a GGUF-converted config has it: engines pick their class by it
    save_model_folder(model, tmp_path / "again")
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "again").architectures == [type(model).__name__]
    import json

    from softprompt.model_folder import repair_architectures

    config = json.loads((tmp_path / "again" / "config.json").read_text())
    (tmp_path / "again" / "config.json").write_text(json.dumps({**config, "architectures": None}))
    assert repair_architectures(tmp_path / "again", model) and not repair_architectures(
        tmp_path / "again", model
    )
    assert AutoConfig.from_pretrained(tmp_path / "again").architectures == [type(model).__name__]
    ids = torch.tensor([[5, 9, 3, 17]])
    with torch.no_grad():
        want = model(ids).logits
        got = load_like_vllm(tmp_path / "m")(ids).logits
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m")(ids).logits
    assert torch.equal(got, want) and torch.equal(hf, want)


def test_a_folder_with_the_head_name_only_is_repaired_in_place(tmp_path):
    model = tied_llama()
    folder = save_model_folder(model, tmp_path / "m")
    tensors = load_file(str(folder / WEIGHTS))  # what safetensors' save_model may write for a tied model
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    save_file(tensors, str(folder / WEIGHTS))
    ids = torch.tensor([[5, 9, 3]])
    assert torch.isnan(load_like_vllm(folder)(ids).logits).all()  # vLLM's garbage, made visible
    assert repair_tied_names(folder, model)
    assert weight_names(folder) == set(
        load_file(str(folder / WEIGHTS))
    ) and "lm_head.weight" not in weight_names(folder)
    with torch.no_grad():
        assert torch.equal(load_like_vllm(folder)(ids).logits, model(ids).logits)
    assert not repair_tied_names(folder, model)  # already standard: left alone
    assert not repair_tied_names(folder, tiny_llama())  # untied models need no repair


def test_export_model_writes_a_prompts_base_model_and_refuses_a_used_folder(tiny_model_dir, tmp_path, capsys):
    from softprompt import SoftPrompt, load_model, save_prompt

    base, _ = load_model(tiny_model_dir)
    save_prompt(SoftPrompt(torch.randn(3, 32) * 0.1), tmp_path / "p", base)
    cli_main(
        ["export-model", str(tmp_path / "out"), "--prompt", str(tmp_path / "p"), "--model", tiny_model_dir]
    )
    assert "serve it: python -m vllm.entrypoints.openai.api_server" in capsys.readouterr().out
    again, _ = load_model(str(tmp_path / "out"))
    ids = torch.tensor([[4, 8, 15]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, base(ids).logits)
    with pytest.raises(SystemExit):
        cli_main(["export-model", str(tmp_path / "out"), "--model", tiny_model_dir])
    assert "not an empty folder" in capsys.readouterr().err
