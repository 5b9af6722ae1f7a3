"""softprompt compare: end to end on a tiny model (all three methods), parameter counts against
the models' own counts, the report files, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.data import write_sentiment_data
from helpers.tiny import tiny_llama
from softprompt.cli import main
from softprompt.compare import CompareConfig, compare
from softprompt.errors import ConfigError


@pytest.fixture
def data(tmp_path):
    return (
        str(write_sentiment_data(tmp_path / "train.jsonl", 48)),
        str(write_sentiment_data(tmp_path / "test.jsonl", 12, seed=1)),
    )


def make_cfg(tiny_model_dir, data, out, **kw) -> CompareConfig:
    train, test = data
    settings = dict(
        train_file=train, test_file=test, model=tiny_model_dir, template="{text} sentiment",
        verbalizer="negative=negative,positive=positive", num_virtual_tokens=4, max_steps=4, batch_size=4,
        warmup_steps=1, sweep_steps=2, prompt_lrs="0.1,0.3", lora_lrs="1e-3,3e-3", full_lrs="1e-4",
        switch_repeats=2, output_dir=str(out),
    )  # fmt: skip
    return CompareConfig(**(settings | kw))


def expected_lora_parameters(r: int, targets: list[str]) -> int:
    """r x (in + out) per adapted Linear, counted from a plain tiny Llama (no peft involved)."""
    model = tiny_llama()
    return sum(
        r * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    )


@pytest.mark.slow
def test_compare_end_to_end(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    figures = compare(make_cfg(tiny_model_dir, data, out, isolate=True), command="test")
    final = figures["final"]
    assert list(final) == ["prompt", "lora", "full"]

    # Parameter counts against the models' own, computed independently.
    n_model = sum(p.numel() for p in tiny_llama().parameters())
    assert final["prompt"]["trainable_parameters"] == 4 * 32
    assert final["lora"]["trainable_parameters"] == expected_lora_parameters(
        8, ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    assert final["full"]["trainable_parameters"] == n_model
    assert all(r["model_parameters"] == n_model for r in final.values())

    # The sweep ran every lr given; each final run used the sweep's best validation accuracy.
    sweep = figures["sweep"]
    assert [(r["method"], r["lr"]) for r in sweep] == [
        ("prompt", 0.1),
        ("prompt", 0.3),
        ("lora", 1e-3),
        ("lora", 3e-3),
    ]  # full had one lr: no sweep
    for method in ("prompt", "lora"):
        tried = [r for r in sweep if r["method"] == method]
        assert final[method]["lr"] in [r["lr"] for r in tried]
        assert final[method]["validation_accuracy"] is not None
    assert final["full"]["lr"] == 1e-4

    for r in final.values():
        assert r["steps"] == 4 and r["status"] == "completed"
        assert 0 <= r["test_accuracy"] <= 1 and r["step_seconds_median"] > 0 and r["switch_seconds"] > 0
        assert r["disk_bytes"] > 0 and r["memory_isolated"]
        assert r["peak_rss_increase_mib"] is not None  # Linux: measured in the fresh process
    # What each task costs on disk is ordered as the methods' sizes are.
    assert final["prompt"]["disk_bytes"] < final["lora"]["disk_bytes"] < final["full"]["disk_bytes"]
    assert (out / "prompt" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert not (out / "full").exists()  # the full model copy is measured, then removed

    for name in ("compare.md", "compare.png", "sweep.png", "compare.json", "compare_config.json"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "compare.md").read_text()
    assert "| LoRA (peft) |" in md and "(chosen)" in md
    saved = json.loads((out / "compare.json").read_text())
    assert saved["lora_trainable_parameters"] == final["lora"]["trainable_parameters"]
    assert saved["command"] == "test" and "date" in saved
    # Every method saw the same rows: the subsample is written once and read by every run.
    assert saved["train_rows"] + saved["validation_rows"] == 48 and saved["test_rows"] == 12


def test_same_data_gives_same_result(tiny_model_dir, data, tmp_path):
    """Seeded end to end: two in-process runs of one method give identical losses and accuracy."""
    kw = {"methods": "lora", "sweep_steps": 0, "isolate": False, "baselines": False}
    a = compare(make_cfg(tiny_model_dir, data, tmp_path / "a", **kw))["final"]["lora"]
    b = compare(make_cfg(tiny_model_dir, data, tmp_path / "b", **kw))["final"]["lora"]
    assert a["final_loss"] == b["final_loss"] and a["test_accuracy"] == b["test_accuracy"]


def test_lora_starts_as_the_base_model(tiny_model_dir, data, tmp_path):
    """LoRA's B matrix starts at zero: before any step its scores equal the plain model's."""
    from softprompt.compare.run import build_method, load_workbench, prepare_data
    from softprompt.scoring import class_scores

    cfg = make_cfg(tiny_model_dir, data, tmp_path)
    d = prepare_data(cfg, tmp_path / "data")
    bench = load_workbench(cfg, d)
    rows = bench.task.train_set.rows[:4]
    pad = bench.tokenizer.pad_token_id
    before = class_scores(bench.prompted, rows, bench.task.space, pad, None)
    build_method("lora", bench, cfg)
    after = class_scores(bench.prompted, rows, bench.task.space, pad, None)
    torch.testing.assert_close(before, after)


def test_config_errors_are_all_reported(tiny_model_dir, data):
    with pytest.raises(ConfigError) as e:
        CompareConfig(train_file=data[0], methods="prompt,adapters", max_steps=0, lora_lrs="fast")
    msg = str(e.value)
    assert "adapters" in msg and "max_steps" in msg and "lora_lrs" in msg and "test_file is required" in msg


def test_cli_compare_and_errors(tiny_model_dir, data, tmp_path, capsys):
    train, test = data
    out = tmp_path / "cli"
    main(["compare", "--train_file", train, "--test_file", test, "--model", tiny_model_dir,
          "--template", "{text} sentiment", "--verbalizer", "negative=negative,positive=positive",
          "--methods", "prompt,lora", "--max_steps", "2", "--batch_size", "4", "--sweep_steps", "0",
          "--num_virtual_tokens", "2", "--switch_repeats", "1", "--isolate", "false", "--output_dir", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert "| prompt tuning (ours) |" in printed and "compare.md" in printed
    assert (out / "compare.png").is_file()

    with pytest.raises(SystemExit) as e:
        main(["compare", "--train_file", train, "--model", tiny_model_dir, "--output_dir", str(out)])
    assert e.value.code == 2
    assert "test_file is required" in capsys.readouterr().err


def test_prompt_method_trains_exactly_as_softprompt_train(tiny_model_dir, data, tmp_path):
    """compare trains with the training loop itself: its prompt equals `train`'s on the same settings."""
    from softprompt.compare.run import prepare_data, train_config
    from softprompt.prompt import load_prompt
    from softprompt.training import train

    cfg = make_cfg(tiny_model_dir, data, tmp_path / "cmp", methods="prompt", sweep_steps=0, isolate=False,
                   baselines=False, prompt_lrs="0.3", init="labels")  # fmt: skip
    compare(cfg)
    ours = load_prompt(tmp_path / "cmp" / "prompt").weight
    tcfg = train_config(cfg, 0.3, cfg.max_steps, prepare_data(cfg, tmp_path / "data"))
    # validate only at the last step, so the saved "best" prompt is the final one, as compare's is
    tcfg.eval_every, tcfg.baselines, tcfg.output_dir = 10**6, False, str(tmp_path / "train")
    train(tcfg)
    theirs = load_prompt(tmp_path / "train" / "prompt").weight
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_compare_is_made_of_trains_groups_and_checks_them_at_once(data):
    """compare takes train's data, input and prompt options by the same names, and refuses bad ones
    when the config is made, before any data or model is read."""
    from dataclasses import fields

    from softprompt.config import PromptArgs
    from softprompt.training.config import DataArgs, InputArgs

    names = {f.name for f in fields(CompareConfig)}
    assert all({f.name for f in fields(group)} <= names for group in (DataArgs, InputArgs, PromptArgs))
    with pytest.raises(ConfigError) as e:
        CompareConfig(train_file=data[0], test_file=data[1], init="text", template="x", max_grad_norm=-1)
    assert len(e.value.problems) == 3 and "init_text" in str(e.value)


def test_every_run_optimises_alike_but_for_its_lr(tiny_model_dir, data, tmp_path):
    cfg = make_cfg(tiny_model_dir, data, tmp_path, warmup_steps=5)
    short, final = cfg.optim_args(0.1, 2), cfg.optim_args(3e-4, 4)
    assert (short.optimizer, short.schedule, short.weight_decay) == ("adamw", "linear", 0.0)
    assert (short.lr, short.max_steps, short.warmup_steps) == (0.1, 2, 1)  # warmup fits the short run
    assert (final.lr, final.max_steps, final.warmup_steps, final.batch_size) == (3e-4, 4, 3, 4)


def test_seeds_give_mean_and_std_of_the_per_seed_runs(tiny_model_dir, data, tmp_path):
    """--seeds 3: each method's final run three times (seeds 0, 1, 2: other init and row order, the
    same lr); the row is the mean and sample std of the runs' accuracies and the median of their times;
    full fine-tuning stops at full_seeds."""
    import statistics

    out = tmp_path / "run"
    cfg = make_cfg(tiny_model_dir, data, out, methods="prompt,lora,full", seeds=3, isolate=False, baselines=False,
                   prompt_lrs="0.3", lora_lrs="3e-3", init="vocab")  # fmt: skip
    final = compare(cfg)["final"]
    assert final["prompt"]["seeds"] == final["lora"]["seeds"] == [0, 1, 2] and final["full"]["seeds"] == [0]
    for method in ("prompt", "lora"):
        r = final[method]
        accs = [run["test_accuracy"] for run in r["runs"]]
        assert [run["seed"] for run in r["runs"]] == [0, 1, 2] and all(
            run["lr"] == r["lr"] for run in r["runs"]
        )
        assert r["test_accuracy"] == r["test_accuracy_mean"] == pytest.approx(statistics.fmean(accs))
        assert r["test_accuracy_std"] == pytest.approx(statistics.stdev(accs))
        assert r["step_seconds_median"] == statistics.median(run["step_seconds_median"] for run in r["runs"])
        # the seed changes what is trained: three different losses
        assert len({run["final_loss"] for run in r["runs"]}) == 3, method
    assert final["full"]["test_accuracy_std"] is None and len(final["full"]["runs"]) == 1

    saved = json.loads((out / "compare.json").read_text())
    assert saved["prompt_test_accuracy_seeds"] == [run["test_accuracy"] for run in final["prompt"]["runs"]]
    assert (
        saved["prompt_test_accuracy_mean"]
        == saved["prompt_test_accuracy"]
        == final["prompt"]["test_accuracy"]
    )
    assert saved["lora_test_accuracy_std"] == final["lora"]["test_accuracy_std"] and saved["lora_seeds"] == 3
    assert saved["full_test_accuracy_std"] is None and saved["full_seeds"] == 1
    md = (out / "compare.md").read_text()
    mean, std = final["prompt"]["test_accuracy"], final["prompt"]["test_accuracy_std"]
    assert f"**{mean:.4f} ± {std:.4f}** (3 seeds)" in md
    assert md.count("| prompt tuning (ours) | ") == 4  # the results row and one row per seed


def test_one_seed_is_the_run_itself(tiny_model_dir, data, tmp_path):
    """seeds=1 (the default): the summary's figures are the one run's, and no ± is shown."""
    cfg = make_cfg(
        tiny_model_dir, data, tmp_path, methods="prompt", sweep_steps=0, isolate=False, baselines=False
    )
    r = compare(cfg)["final"]["prompt"]
    (run,) = r["runs"]
    assert (
        r["test_accuracy"] == run["test_accuracy"] and r["step_seconds_median"] == run["step_seconds_median"]
    )
    assert r["test_accuracy_std"] is None and "±" not in (tmp_path / "compare.md").read_text().split("##")[0]


def test_residual_method_trains_exactly_as_softprompt_train(tiny_model_dir, data, tmp_path):
    """residual is `softprompt train --reparam residual`: the same saved prompt, bit for bit, and the
    MLP counted in the trainable parameters."""
    from softprompt.compare.run import prepare_data, train_config
    from softprompt.prompt import load_prompt
    from softprompt.training import train

    cfg = make_cfg(tiny_model_dir, data, tmp_path / "cmp", methods="residual", sweep_steps=0, isolate=False,
                   baselines=False, residual_lrs="0.03", reparam_hidden=8)  # fmt: skip
    r = compare(cfg)["final"]["residual"]
    assert r["trainable_parameters"] == 4 * 32 + (32 * 8 + 8) + (8 * 32 + 32) + 2 * 32
    ours = load_prompt(tmp_path / "cmp" / "residual").weight
    tcfg = train_config(cfg, 0.03, cfg.max_steps, prepare_data(cfg, tmp_path / "data"))
    tcfg.eval_every, tcfg.baselines, tcfg.output_dir = 10**6, False, str(tmp_path / "train")
    tcfg.reparam, tcfg.reparam_hidden = "residual", 8
    train(tcfg)
    assert ours.shape == (4, 32)
    torch.testing.assert_close(ours, load_prompt(tmp_path / "train" / "prompt").weight, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["deep", "deep_residual"])
def test_deep_methods_train_a_deep_prompt_as_softprompt_train(tiny_model_dir, data, tmp_path, method):
    """deep is `softprompt train --prompt_kind deep`: a DeepPrompt (keys and values at every layer of the
    tiny Llama: 2 layers x 2 x 2 kv heads x 8 dims per virtual token), saved as train saves it;
    deep_residual adds `--reparam residual` (the MLP counted, the saved prompt its output)."""
    from softprompt.compare.run import prepare_data, train_config
    from softprompt.deep import DeepPrompt
    from softprompt.prompt import load_prompt
    from softprompt.training import train

    cfg = make_cfg(tiny_model_dir, data, tmp_path / "cmp", methods=method, sweep_steps=0, isolate=False,
                   baselines=False, deep_lrs="0.01", deep_residual_lrs="0.01", reparam_hidden=8)  # fmt: skip
    r = compare(cfg)["final"][method]
    ours = load_prompt(tmp_path / "cmp" / method)
    width = 2 * 2 * 2 * 8
    mlp = (width * 8 + 8) + (8 * width + width) + 2 * width if method == "deep_residual" else 0
    assert isinstance(ours, DeepPrompt) and ours.weight.numel() == 4 * width
    assert r["trainable_parameters"] == 4 * width + mlp
    tcfg = train_config(cfg, 0.01, cfg.max_steps, prepare_data(cfg, tmp_path / "data"))
    tcfg.eval_every, tcfg.baselines, tcfg.output_dir = 10**6, False, str(tmp_path / "train")
    tcfg.prompt_kind, tcfg.reparam, tcfg.reparam_hidden = "deep", "residual" if mlp else "none", 8
    train(tcfg)
    torch.testing.assert_close(ours.weight, load_prompt(tmp_path / "train" / "prompt").weight, atol=0, rtol=0)


def test_new_settings_are_checked(data):
    with pytest.raises(ConfigError) as e:
        CompareConfig(train_file=data[0], test_file=data[1], methods="prompt,deep", prompt_kind="deep", seeds=0,
                      residual_lrs="x", full_seeds=0)  # fmt: skip
    msg = str(e.value)
    assert len(e.value.problems) == 4 and "--methods" in msg and "seeds must be >= 1" in msg
    assert "residual_lrs" in msg and "full_seeds must be >= 1" in msg
    assert CompareConfig(seed=5, seeds=3, full_seeds=2).seed_list("full") == [5, 6]
    assert CompareConfig(seed=5, seeds=3).seed_list("deep") == [5, 6, 7]


def test_learned_scoring_trains_class_vectors_as_softprompt_train(tiny_model_dir, data, tmp_path):
    """--scoring learned: a prompt method trains its class vectors (at verbalizer_lr) as `softprompt
    train --scoring learned` does, bit for bit, through the residual MLP too; LoRA in the same
    comparison scores the label words (it has no class vectors)."""
    from softprompt.compare.run import prepare_data, train_config
    from softprompt.prompt import load_prompt
    from softprompt.training import train

    cfg = make_cfg(tiny_model_dir, data, tmp_path / "cmp", methods="deep_residual,lora", sweep_steps=0,
                   isolate=False, baselines=False, deep_residual_lrs="0.01", reparam_hidden=8,
                   scoring="learned", verbalizer_lr=0.003)  # fmt: skip
    final = compare(cfg)["final"]
    ours = load_prompt(tmp_path / "cmp" / "deep_residual")
    width = 2 * 2 * 2 * 8
    mlp = (width * 8 + 8) + (8 * width + width) + 2 * width
    assert ours.classes is not None and ours.classes.num_classes == 2
    assert final["deep_residual"]["trainable_parameters"] == 4 * width + mlp + 2 * (32 + 1)
    assert final["lora"]["status"] == "completed" and 0 <= final["lora"]["test_accuracy"] <= 1
    tcfg = train_config(cfg, 0.01, cfg.max_steps, prepare_data(cfg, tmp_path / "data"), "deep_residual")
    tcfg.eval_every, tcfg.baselines, tcfg.output_dir = 10**6, False, str(tmp_path / "train")
    tcfg.prompt_kind, tcfg.reparam, tcfg.reparam_hidden = "deep", "residual", 8
    assert tcfg.scoring == "learned" and tcfg.verbalizer_lr == 0.003
    train(tcfg)
    theirs = load_prompt(tmp_path / "train" / "prompt")
    torch.testing.assert_close(ours.weight, theirs.weight, atol=0, rtol=0)
    torch.testing.assert_close(ours.classes.tensors(), theirs.classes.tensors(), atol=0, rtol=0)
    start = train_config(cfg, 0.01, 1, None, "lora")
    assert start.scoring == "auto"  # LoRA, full and zero-shot: the words, as auto picks them
