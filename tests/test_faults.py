"""Faults a run must survive or report, each injected rather than timed: a kill at every step of a
save, a torn log line, a resume with changed settings or data, a run folder that already holds a
run, a damaged ``softprompt.json`` and a hub model asked for offline."""

# ruff: noqa: F811  (the `data` fixture imported from test_training is a test argument here)
from __future__ import annotations

import contextlib
import json
import time

import pytest
import torch
from test_training import config, data  # noqa: F401  (the tiny sentiment run and its data fixture)

import softprompt.loading as loading
import softprompt.peft_format as pf
from softprompt import PromptMeta, load_prompt
from softprompt.cli import main
from softprompt.errors import DataError, ModelLoadError, UsageError
from softprompt.training import train


class Killed(BaseException):
    """A simulated SIGKILL: raised at a fault point; nothing after it runs, no cleanup either."""


@contextlib.contextmanager
def killed_at(monkeypatch, point: str, folder: str, on_save: int = 1):
    """Cut off the ``on_save``-th save of a folder named ``folder`` at ``point``, leaving the disk
    as a kill would (from then on nothing is deleted)."""
    seen = {"saves": 0, "killed": False}
    real_discard = pf._discard

    def fault(name: str, dest) -> None:
        if dest.name != folder:
            return
        seen["saves"] += name == "written"  # every save passes this point first
        if name == point and seen["saves"] == on_save:
            seen["killed"] = True
            raise Killed(point)

    monkeypatch.setattr(pf, "_fault_point", fault)
    monkeypatch.setattr(pf, "_discard", lambda path: None if seen["killed"] else real_discard(path))
    try:
        with pytest.raises(Killed):
            yield
    finally:
        monkeypatch.undo()
    assert seen["killed"], f"save {on_save} of {folder} never reached {point}"


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("point", pf.FAULT_POINTS)
def test_prompt_save_killed_at_each_step_leaves_a_complete_prompt(tmp_path, monkeypatch, point):
    dest = tmp_path / "prompt"
    old, new = torch.randn(3, 8), torch.randn(3, 8)
    pf.write_prompt_folder(old, PromptMeta(init="random"), dest)
    with killed_at(monkeypatch, point, "prompt"):
        pf.write_prompt_folder(new, PromptMeta(init="random"), dest)

    weight, _ = pf.read_prompt_folder(dest)  # never an error, never a mix
    expected = old if point in ("written", "complete") else new  # the old one until it is moved aside
    assert torch.equal(weight, expected)

    newest = torch.randn(3, 8)
    pf.write_prompt_folder(newest, PromptMeta(init="random"), dest)  # finishes the interrupted save
    assert torch.equal(pf.read_prompt_folder(dest)[0], newest)
    assert leftovers(tmp_path) == []  # temporaries and hidden copies are gone


def test_stale_temporaries_of_live_processes_are_kept(tmp_path):
    """Another process may be writing its temporary right now: only dead writers' folders go."""
    import os

    pf.write_prompt_folder(torch.randn(2, 4), PromptMeta(), tmp_path / "p")
    live = tmp_path / f".p.tmp-{os.getppid()}-abc"  # the parent (pytest's launcher) is alive
    dead = tmp_path / ".p.tmp-999999999-abc"
    live.mkdir(), dead.mkdir()
    pf.write_prompt_folder(torch.randn(2, 4), PromptMeta(), tmp_path / "p")
    assert live.is_dir() and not dead.exists()


@pytest.mark.parametrize("point", pf.FAULT_POINTS)
def test_checkpoint_save_killed_at_each_step_resumes_exactly(
    tiny_model_dir, data, tmp_path, monkeypatch, point
):
    """Killed while saving the step-4 checkpoint, a resume continues from step 2 or 4 (whichever
    complete copy the kill left) and ends with the uninterrupted run's prompt."""
    train(config(tiny_model_dir, data, tmp_path / "full", baselines=False))
    out = tmp_path / "cut"
    with killed_at(monkeypatch, point, "checkpoint", on_save=2):  # the checkpoint of step 4
        train(config(tiny_model_dir, data, out, baselines=False))
    resumed = train(config(tiny_model_dir, data, out, baselines=False, resume=True))
    assert resumed["steps"] == 6
    a = load_prompt(tmp_path / "full/checkpoint/prompt").weight
    b = load_prompt(out / "checkpoint/prompt").weight
    assert torch.equal(a, b)
    assert leftovers(out) == []


def test_torn_last_log_line_is_dropped_on_resume(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    train(config(tiny_model_dir, data, out, max_steps=4, baselines=False))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.6')  # the run was killed in the middle of this write
    train(config(tiny_model_dir, data, out, max_steps=6, baselines=False, resume=True))
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if "loss" in x]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_damaged_log_line_in_the_middle_names_file_and_line(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    train(config(tiny_model_dir, data, out, max_steps=2, baselines=False))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    lines[1] = "garbage"
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"metrics\.jsonl:2: "):
        train(config(tiny_model_dir, data, out, max_steps=4, baselines=False, resume=True))


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"lr": 0.03}, "lr: 0.3 in the checkpoint, 0.03 now"),
        ({"template": "text {text} mood"}, "template: "),
        ({"verbalizer": "0=bad,1=good"}, "verbalizer: "),
        ({"seed": 7}, "seed: 0 in the checkpoint, 7 now"),
    ],
)
def test_resume_with_changed_settings_is_refused_listing_each(
    tiny_model_dir, data, tmp_path, change, expected
):
    out = tmp_path / "run"
    train(config(tiny_model_dir, data, out, max_steps=2, baselines=False))
    before = (out / "hyperparameters.json").read_text()
    with pytest.raises(UsageError, match="cannot resume") as e:
        train(config(tiny_model_dir, data, out, max_steps=4, baselines=False, resume=True, **change))
    assert expected in str(e.value) and "--overwrite true" in str(e.value)
    assert (out / "hyperparameters.json").read_text() == before  # nothing was touched


def test_resume_with_changed_data_is_refused(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    train(config(tiny_model_dir, data, out, max_steps=2, baselines=False))
    with open(data["train"], "a") as f:
        f.write(json.dumps({"text": "good good", "label": 1}) + "\n")
    with pytest.raises(UsageError, match="train_file: .* has changed since the checkpoint"):
        train(config(tiny_model_dir, data, out, max_steps=4, baselines=False, resume=True))


def test_resume_may_extend_max_steps(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    train(config(tiny_model_dir, data, out, max_steps=2, baselines=False))
    result = train(config(tiny_model_dir, data, out, max_steps=4, eval_every=1, baselines=False, resume=True))
    assert result["steps"] == 4


def test_training_into_a_run_folder_is_refused_without_resume_or_overwrite(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    train(config(tiny_model_dir, data, out, max_steps=2, baselines=False))
    saved = load_prompt(out / "prompt").weight
    with pytest.raises(UsageError, match="already holds a run") as e:
        train(config(tiny_model_dir, data, out, max_steps=2, baselines=False, lr=0.01))
    assert "--resume true" in str(e.value) and "--overwrite true" in str(e.value)
    assert torch.equal(load_prompt(out / "prompt").weight, saved)

    (out / "notes.txt").write_text("mine")
    train(config(tiny_model_dir, data, out, max_steps=2, baselines=False, lr=0.01, overwrite=True))
    assert not torch.equal(load_prompt(out / "prompt").weight, saved)
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files are deleted


def test_cli_reports_a_refused_run_in_one_line(tiny_model_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    train(config(tiny_model_dir, data, out, max_steps=2, baselines=False))
    args = ["train", "--train_file", data["train"], "--model", tiny_model_dir, "--template", "review {text} sentiment",
            "--num_virtual_tokens", "4", "--max_steps", "2", "--batch_size", "4", "--output_dir", str(out)]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "Traceback" not in err


def test_wrong_types_in_softprompt_json_are_one_clear_message(tmp_path, capsys):
    dest = tmp_path / "p"
    pf.write_prompt_folder(torch.randn(2, 4), PromptMeta(init="random"), dest)
    meta = json.loads((dest / pf.META_NAME).read_text())
    meta.update(template=5, label_words="positive", max_new_tokens="many")
    (dest / pf.META_NAME).write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as e:
        main(["info", str(dest)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for field in ("template", "label_words", "max_new_tokens"):
        assert field in err


def test_hub_model_offline_fails_at_once_with_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="offline") as e:
        loading.load_model("someorg/some-model-not-here")
    assert time.perf_counter() - start < 10
    assert "smollm2" in str(e.value)


def test_hub_reachable_honours_hf_hub_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert loading.hub_reachable() is False
