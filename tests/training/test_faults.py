"""Faults a run must survive or report, each injected rather than timed: a kill at every step of a
save, a torn log line, a resume with changed settings or data, a run folder that already holds a
run, a damaged ``softprompt.json`` and a hub model asked for offline."""

from __future__ import annotations

import contextlib
import json
import time

import pytest
import torch

import softprompt.folders as folders
import softprompt.loading as loading
import softprompt.peft_format as pf
from helpers.training import config  # the tiny sentiment run (its `data` fixture: training/conftest.py)
from softprompt import PromptMeta, load_prompt
from softprompt.cli import main
from softprompt.errors import DataError, ModelLoadError, TrainingInterrupted, UsageError
from softprompt.training import TrainConfig, train


class Killed(BaseException):
    """A simulated SIGKILL: raised at a fault point; nothing after it runs, no cleanup either."""


@contextlib.contextmanager
def killed_at(monkeypatch, point: str, folder: str, on_save: int = 1):
    """Cut off the ``on_save``-th save of a folder named ``folder`` at ``point``, leaving the disk
    as a kill would (from then on nothing is deleted)."""
    seen = {"saves": 0, "killed": False}
    real_discard = folders._discard

    def fault(name: str, dest) -> None:
        if dest.name != folder:
            return
        seen["saves"] += name == "written"  # every save passes this point first
        if name == point and seen["saves"] == on_save:
            seen["killed"] = True
            raise Killed(point)

    monkeypatch.setattr(folders, "_fault_point", fault)
    monkeypatch.setattr(folders, "_discard", lambda path: None if seen["killed"] else real_discard(path))
    try:
        with pytest.raises(Killed):
            yield
    finally:
        monkeypatch.undo()
    assert seen["killed"], f"save {on_save} of {folder} never reached {point}"


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("point", folders.FAULT_POINTS)
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


@pytest.mark.parametrize("point", folders.FAULT_POINTS)
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


# ---------------------------------------------------------------- one writer per folder
HOLD_LOCK = """
import sys
from softprompt.locking import folder_lock
with folder_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()  # held until the test closes our stdin (or kills us)
"""


@contextlib.contextmanager
def lock_held_by_another_process(folder):
    """A real second process holding the write lock of ``folder``; yields its Popen."""
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(timeout=30)


def train_args(tiny_model_dir, data, out, *extra) -> list[str]:
    return ["train", "--train_file", data["train"], "--model", tiny_model_dir, "--template", "review {text} sentiment",
            "--num_virtual_tokens", "4", "--max_steps", "2", "--batch_size", "4", "--output_dir", str(out), *extra]  # fmt: skip


def test_a_live_run_is_not_deleted_by_a_second_overwrite(tiny_model_dir, data, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    train(config(tiny_model_dir, data, out, max_steps=2, baselines=False))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with lock_held_by_another_process(out) as holder:
        with pytest.raises(SystemExit) as e:
            main(train_args(tiny_model_dir, data, out, "--overwrite", "true"))
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"PID {holder.pid}" in err and "folder_lock" not in err and "Traceback" not in err
        assert "being written by another softprompt process" in err and "--output_dir" in err
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched
        holder.kill()  # dies holding the lock: the kernel releases it, its holder file stays
        holder.wait(timeout=30)
    with caplog.at_level("WARNING", logger="softprompt"):
        main(train_args(tiny_model_dir, data, out, "--overwrite", "true"))
    assert f"taking over the lock left by PID {holder.pid}" in caplog.text
    assert (out / "metrics.json").is_file()


def test_init_refuses_a_prompt_folder_another_process_writes(tiny_model_dir, tmp_path, capsys):
    dest = tmp_path / "prompts" / "p"
    with lock_held_by_another_process(dest) as holder:
        with pytest.raises(SystemExit) as e:
            main(
                [
                    "init",
                    str(dest),
                    "--model",
                    tiny_model_dir,
                    "--num_virtual_tokens",
                    "2",
                    "--init",
                    "random",
                ]
            )
        assert e.value.code == 2 and f"PID {holder.pid}" in capsys.readouterr().err
        assert not dest.exists()
    main(["init", str(dest), "--model", tiny_model_dir, "--num_virtual_tokens", "2", "--init", "random"])
    assert load_prompt(dest).num_virtual_tokens == 2


def test_lock_is_released_after_a_run_and_after_a_failure(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    train(config(tiny_model_dir, data, out, max_steps=2, baselines=False))
    with pytest.raises(UsageError, match="already holds a run"):
        train(config(tiny_model_dir, data, out, max_steps=2, baselines=False))
    train(config(tiny_model_dir, data, out, max_steps=2, baselines=False, resume=True))  # not locked out


# ---------------------------------------------------------------- --overwrite checks first
@pytest.mark.parametrize("broken", ["empty train file", "malformed train file", "missing model"])
def test_overwrite_that_fails_before_its_first_write_keeps_the_old_run(
    tiny_model_dir, data, tmp_path, broken
):
    out = tmp_path / "run"
    train(config(tiny_model_dir, data, out, max_steps=2, baselines=False))
    files = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text({"empty train file": "", "malformed train file": "{not json\n"}.get(broken, ""))
    change = (
        {"model": str(tmp_path / "no-such-model")} if broken == "missing model" else {"train_file": str(bad)}
    )
    with pytest.raises(Exception) as e:  # noqa: B017  (the data or model error itself is tested elsewhere)
        train(config(tiny_model_dir, data, out, max_steps=2, baselines=False, overwrite=True, **change))
    assert isinstance(e.value, (DataError, ModelLoadError, UsageError, OSError)), e.value
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == files


def test_a_refused_run_leaves_no_empty_folders_behind(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("")
    out = tmp_path / "new" / "deeper" / "run"
    with pytest.raises(DataError):
        train(TrainConfig(train_file=str(bad), model=tiny_model_dir, template="review {text} sentiment",
                          output_dir=str(out)))  # fmt: skip
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- signals
def test_interrupt_saves_a_checkpoint_and_resume_ends_where_an_uninterrupted_run_would(
    tiny_model_dir, data, tmp_path, monkeypatch
):
    import os
    import signal

    import softprompt.training.runlog as runlog

    train(config(tiny_model_dir, data, tmp_path / "full", baselines=False, eval_every=4))
    real = runlog.warn_gradient

    def ctrl_c_at_step_3(grad_norm, step):
        real(grad_norm, step)
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: finish this step, then stop

    monkeypatch.setattr(runlog, "warn_gradient", ctrl_c_at_step_3)
    out = tmp_path / "cut"
    with pytest.raises(TrainingInterrupted, match="SIGINT at step 3 of 6.*--resume true"):
        train(config(tiny_model_dir, data, out, baselines=False, eval_every=4))
    assert json.loads((out / "checkpoint/trainer_state.json").read_text())["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back
    monkeypatch.undo()
    resumed = train(config(tiny_model_dir, data, out, baselines=False, eval_every=4, resume=True))
    assert resumed["steps"] == 6 and resumed["status"] == "completed"
    a = load_prompt(tmp_path / "full/checkpoint/prompt").weight
    assert torch.equal(a, load_prompt(out / "checkpoint/prompt").weight)


def test_a_second_signal_stops_at_once():
    import os
    import signal

    from softprompt.training.stopping import stop_on_signals

    with stop_on_signals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop() and stop.signal == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs between bytecodes: well before this ends


def test_ctrl_c_in_the_cli_prints_one_line_and_exits_130(tiny_model_dir, data, tmp_path):
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    args = train_args(tiny_model_dir, data, out, "--eval_every", "1000", "--baselines", "false")
    args[args.index("--max_steps") + 1] = "100000"
    proc = subprocess.Popen(
        [sys.executable, "-m", "softprompt.cli", *args], stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not (
            (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 2
        ):
            assert proc.poll() is None and time.monotonic() < deadline, "training never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "interrupted: stopped by SIGINT at step" in err and "--resume true" in err
    step = json.loads((out / "checkpoint/trainer_state.json").read_text())["step"]
    assert 2 <= step < 100000


# ---------------------------------------------------------------- a full, read-only or forbidden disk
DISK_FULL = (
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
)


@pytest.mark.parametrize("code", ["ENOSPC", "EROFS", "EACCES"])
def test_a_refusing_disk_is_one_error_line_and_old_files_stay(
    tiny_model_dir, tmp_path, monkeypatch, capsys, code
):
    import errno

    from safetensors import SafetensorError

    dest = tmp_path / "p"
    init = ["init", str(dest), "--model", tiny_model_dir, "--num_virtual_tokens", "2", "--init", "random"]
    main(init)
    before = load_prompt(dest).weight

    def refuse(*args, **kwargs):
        if code == "ENOSPC":  # how safetensors reports a full disk: text, not an OSError
            raise SafetensorError(DISK_FULL)
        raise OSError(getattr(errno, code), os_message[code], str(args[1]))

    os_message = {"EROFS": "Read-only file system", "EACCES": "Permission denied"}
    monkeypatch.setattr(pf, "save_file", refuse)
    with pytest.raises(SystemExit) as e:
        main([*init[:-2], "--init", "random", "--seed", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    expected = {"ENOSPC": "no space left", "EROFS": "read-only", "EACCES": "permission denied"}[code]
    assert err.startswith("error: could not save") and expected in err and str(dest) in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert torch.equal(load_prompt(dest).weight, before)
    assert [n for n in leftovers(tmp_path) if not n.endswith(".lock")] == []  # no temporaries


def test_a_full_disk_during_training_is_one_error_line(tiny_model_dir, data, tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError(DISK_FULL)

    monkeypatch.setattr(pf, "save_file", full)
    with pytest.raises(SystemExit) as e:
        main(train_args(tiny_model_dir, data, tmp_path / "run"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: could not save: no space left on the device" in err and "Traceback" not in err


def test_a_reader_caught_between_a_saves_renames_reads_the_complete_copy(tmp_path, monkeypatch, capsys):
    """The folder a reader chose is renamed away by a save before its files are read: the read
    starts again on the copy the save leaves, in `info` as in every reader."""
    import os

    dest = tmp_path / "p"
    saved = torch.randn(3, 8)
    pf.write_prompt_folder(saved, PromptMeta(init="random"), dest)
    os.rename(dest, tmp_path / ".p.new")  # the save's state between its renames
    real, calls = pf.complete_copy, []

    def stale_first(path):  # the first look saw dest, just before the save renamed it
        calls.append(path)
        return dest if len(calls) == 1 else real(path)

    monkeypatch.setattr(pf, "complete_copy", stale_first)
    assert torch.equal(pf.read_prompt_folder(dest)[0], saved)
    calls.clear()
    main(["info", str(dest), "--as_json", "true"])
    assert json.loads(capsys.readouterr().out)["num_virtual_tokens"] == 3
