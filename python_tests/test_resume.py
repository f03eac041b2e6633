"""Resuming: an interrupted run continues from its last checkpoint and its loss curve matches an
uninterrupted run with the same seed step for step (CPU, fp32); a run killed while saving leaves
the previous checkpoint loadable."""

from __future__ import annotations

import shutil

import pytest
import torch

from qlora_ext import finetune
from qlora_ext.checkpoint import atomic
from qlora_ext.training import checkpoint_folders, checkpointing, saving, steps
from qlora_ext.training.config import load_config
from qlora_ext.training.optim import cosine_with_warmup

from trainer_helpers import metrics, small_run_overrides, write_small_dataset, write_tiny_hf_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ckpt = write_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny_hf"))
    data = write_small_dataset(tmp_path_factory.mktemp("data") / "small.jsonl")
    return ckpt, data


def _overrides(setup, out):
    ckpt, data = setup
    # dropout makes the RNG state matter; 2 epochs x 4 steps, a checkpoint every 3 steps
    return small_run_overrides(ckpt, data, out) + [
        "epochs=2", "max_steps_per_epoch=4", "save_every_n_steps=3", "model.lora_dropout=0.1",
        "eval.before_and_after=False", "save_adapter_weights_only=True", "clip_grad_norm=1.0",
    ]


def _interrupt_at_micro_batch(monkeypatch, n):
    real, calls = steps.token_loss_sum, {"n": 0}

    def interrupted(outputs, labels, output_weight=None):
        calls["n"] += torch.is_grad_enabled()  # training micro-batches only, not the validation's
        if calls["n"] == n:
            raise KeyboardInterrupt("simulated kill")
        return real(outputs, labels, output_weight)

    monkeypatch.setattr(steps, "token_loss_sum", interrupted)


def test_resumed_run_matches_uninterrupted_step_for_step(tmp_path, setup, monkeypatch, capsys):
    full = tmp_path / "full"
    finetune.train(load_config("tiny_qlora", _overrides(setup, full)))
    reference = [(r["step"], r["loss"], r["lr"]) for r in metrics(full) if "loss" in r]
    assert [s for s, _, _ in reference] == list(range(1, 9))

    run = tmp_path / "interrupted"
    # killed during step 7: the last checkpoint is step_6, in the middle of the second epoch
    _interrupt_at_micro_batch(monkeypatch, 2 * 6 + 1)
    with pytest.raises(KeyboardInterrupt):
        finetune.train(load_config("tiny_qlora", _overrides(setup, run)))
    monkeypatch.undo()
    state = torch.load(run / "recipe_state.pt", weights_only=True)
    assert (state["checkpoint_name"], state["epoch"], state["step_in_epoch"]) == ("step_6", 1, 2)
    assert [r["step"] for r in metrics(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert state["metrics_log"] == (run / "logs" / "metrics.jsonl").read_text()  # the log as it stood at the save

    capsys.readouterr()
    finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["resume_from_checkpoint=True"]))
    printed = capsys.readouterr()
    assert "warning" not in printed.err  # the log's records up to step 6 are the checkpoint's own
    assert f"Training loss: {reference[6][1]:.4f} at step 7, the first after resuming, -> " in printed.out
    resumed = [(r["step"], r["loss"], r["lr"]) for r in metrics(run) if "loss" in r]
    assert resumed == reference  # exactly: same data order, RNG, optimizer and schedule state
    val = [(r["step"], r["val_loss"]) for r in metrics(run) if "val_loss" in r]
    assert val == [(r["step"], r["val_loss"]) for r in metrics(full) if "val_loss" in r] and [s for s, _ in val] == [4, 8]
    a = torch.load(full / "recipe_state.pt", weights_only=True)["adapter"]
    b = torch.load(run / "recipe_state.pt", weights_only=True)["adapter"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_killed_while_saving_keeps_previous_checkpoint(tmp_path, setup, monkeypatch):
    run = tmp_path / "run"
    real, calls = saving.save_peft_adapter, {"n": 0}

    def dies_on_second_save(model, out_dir, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "adapter_model.safetensors").write_bytes(b"half a file")
            raise KeyboardInterrupt("killed while saving")
        return real(model, out_dir, **kwargs)

    monkeypatch.setattr(saving, "save_peft_adapter", dies_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        finetune.train(load_config("tiny_qlora", _overrides(setup, run)))
    monkeypatch.undo()
    # the step-3 checkpoint and the state naming it are intact; the half-written save left nothing
    state = torch.load(run / "recipe_state.pt", weights_only=True)
    assert state["checkpoint_name"] == "step_3"
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["logs", "step_3"]
    from safetensors.torch import load_file

    assert load_file(run / "step_3" / "adapter" / "adapter_model.safetensors")
    summary = finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["resume_from_checkpoint=True"]))
    assert len(summary["losses"]) == 5  # steps 4..8


def test_resume_refuses_a_different_config(tmp_path, setup):
    run = tmp_path / "run"
    finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["epochs=1"]))
    with pytest.raises(Exception, match=r"config key 'model.lora_rank' is 4 but the checkpoint .* trained with 8"):
        finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["resume_from_checkpoint=True", "model.lora_rank=4"]))
    # a key of a section in a section is named by itself (was the whole dataset.column_map, a key not settable as a whole)
    with pytest.raises(Exception, match=r"config key 'dataset.column_map.output' is resp but the checkpoint .* trained with output"):
        finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["resume_from_checkpoint=True", "dataset.column_map.output=resp"]))


def test_resume_checks_the_number_of_records_and_accepts_the_data_moved(tmp_path, setup, monkeypatch, capsys):
    """The data files may be named otherwise on resume (moved, or relative from another folder),
    with the change reported; another number of records (another file under the same relative
    name, a file cut short) is refused, as the data position and the split depend on it. A state
    without the count (an earlier version's) is not refused for it."""
    ckpt, data = setup
    run = tmp_path / "run"
    here = tmp_path / "here"
    here.mkdir()
    shutil.copy(data, here / "data.jsonl")
    monkeypatch.chdir(here)
    relative = [o for o in _overrides(setup, run) if not o.startswith("dataset.data_files=")] + ["dataset.data_files=data.jsonl"]
    finetune.train(load_config("tiny_qlora", relative + ["epochs=1"]))
    assert torch.load(run / "recipe_state.pt", weights_only=True)["fingerprint"][saving.RECORDS_KEY] == 48
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_small_dataset(elsewhere / "data.jsonl", n=40)
    monkeypatch.chdir(elsewhere)  # data.jsonl there is another file
    resume = ["resume_from_checkpoint=True", "epochs=2"]
    with pytest.raises(Exception, match=r"dataset.data_files hold 40 records, but the checkpoint in .* was trained on 48; the data "
                                        r"position and the held-out split depend on them"):
        finetune.train(load_config("tiny_qlora", relative + resume))
    capsys.readouterr()
    summary = finetune.train(load_config("tiny_qlora", _overrides(setup, run) + resume))  # the same records, by their absolute path
    assert len(summary["losses"]) == 4
    assert f"Changed since the checkpoint, applied from step 5: dataset.data_files [data.jsonl] -> [{data}], epochs 1 -> 2" in capsys.readouterr().out
    state = torch.load(run / "recipe_state.pt", weights_only=True)
    del state["fingerprint"][saving.RECORDS_KEY]  # as an earlier version wrote it
    torch.save(state, run / "recipe_state.pt")
    finetune.train(load_config("tiny_qlora", relative + ["resume_from_checkpoint=True", "epochs=3"]))


def test_resume_refuses_another_base_and_accepts_the_same_one_moved(tmp_path, setup, capsys):
    """The base's weights are part of what a resumed run must share: another checkpoint of the
    same architecture (same files, same sizes) is refused, naming both; the same base in another
    folder resumes. A state without that entry (an earlier version's) is not refused for it."""
    ckpt, _ = setup
    run = tmp_path / "run"
    finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["epochs=1"]))
    other = tmp_path / "other_base"
    write_tiny_hf_checkpoint(other, seed=99)
    assert sorted(f.stat().st_size for f in other.iterdir()) == sorted(f.stat().st_size for f in ckpt.iterdir())
    resume = ["resume_from_checkpoint=True", "epochs=2"]
    with pytest.raises(Exception, match=r"checkpointer.checkpoint_dir holds other weights \(1 file\(s\), \d+ bytes, sampled sha256 \w+\) "
                                        r"than the base the checkpoint in .* was trained on \(1 file\(s\), \d+ bytes, sampled sha256 \w+\); "
                                        r"resume on that base"):
        finetune.train(load_config("tiny_qlora", _overrides(setup, run) + [f"checkpointer.checkpoint_dir={other}"] + resume))
    moved = tmp_path / "moved_base"
    shutil.copytree(ckpt, moved)
    summary = finetune.train(load_config("tiny_qlora", _overrides(setup, run) + [f"checkpointer.checkpoint_dir={moved}"] + resume))
    assert len(summary["losses"]) == 4  # the second epoch
    state = torch.load(run / "recipe_state.pt", weights_only=True)
    del state["fingerprint"]["checkpointer.weights"]  # as an earlier version wrote it
    torch.save(state, run / "recipe_state.pt")
    capsys.readouterr()
    finetune.train(load_config("tiny_qlora", _overrides(setup, run) + [f"checkpointer.checkpoint_dir={other}", "resume_from_checkpoint=True", "epochs=3"]))
    out = capsys.readouterr().out
    assert "Changed since the checkpoint, applied from step 9: epochs 2 -> 3 (the lr schedule now spans 12 steps)\n" in out
    assert "checkpointer.weights" not in out  # nor is the missing entry a change
    # The compute dtype, as resolved, may change (on another device, say), and is reported: it
    # was taken silently, and the run's config then said bf16 for steps trained in fp32.
    finetune.train(load_config("tiny_qlora", _overrides(setup, run) + [f"checkpointer.checkpoint_dir={other}", "resume_from_checkpoint=True",
                                                                        "epochs=4", "dtype=bf16"]))
    assert "Changed since the checkpoint, applied from step 13: dtype fp32 -> bf16, epochs 3 -> 4" in capsys.readouterr().out


def test_a_drawn_seed_is_kept_and_a_finished_run_is_named(tmp_path, setup, capsys):
    # seed=null draws one; the run's own config.yaml (which records it) and seed=null both resume it.
    run = tmp_path / "run"
    first = finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["epochs=1", "seed=null"]))
    printed = capsys.readouterr().out  # the resolved config shown holds the drawn seed, as the saved one does
    assert f"Resolved config (seed {first['seed']}):" in printed and f"\nseed: {first['seed']}\n" in printed
    saved = run / "config.yaml"
    assert f"seed: {first['seed']}" in saved.read_text()
    shutil.copy(saved, tmp_path / "again.yaml")
    assert finetune.train(load_config(str(tmp_path / "again.yaml"), ["resume_from_checkpoint=True", "epochs=2"]))["seed"] == first["seed"]
    assert finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["resume_from_checkpoint=True", "epochs=3", "seed=null"]))["seed"] == first["seed"]
    with pytest.raises(Exception, match=rf"config key 'seed' is {first['seed'] + 1} but the checkpoint .* was trained with seed {first['seed']}"):
        finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["resume_from_checkpoint=True", "epochs=4", f"seed={first['seed'] + 1}"]))
    # A finished run re-launched says so, and changes nothing (its config.yaml had been rewritten with the new epochs).
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert finetune.main(["--config", "tiny_qlora", *_overrides(setup, run), "resume_from_checkpoint=True", "epochs=2", "seed=null"]) == 0
    again = finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["resume_from_checkpoint=True", "epochs=3", "seed=null"]))
    assert again["nothing_left_to_train"] and again["losses"] == [] and again["checkpoint"].endswith("epoch_2")
    out = capsys.readouterr().out
    assert "Nothing left to train: the checkpoint" in out and "has completed 3 epochs and epochs is 2; set epochs above 3" in out
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_fresh_run_over_an_earlier_one_says_what_it_replaces_and_what_stays(tmp_path, setup, monkeypatch, capsys):
    # A run started afresh where a longer run saved: the earlier run's epoch folders past this
    # run's epochs would stay beside this run's own, silently; stopped before its first save, the
    # closing line does not offer to continue the earlier run, which is complete.
    run = tmp_path / "run"
    finetune.train(load_config("tiny_qlora", _overrides(setup, run)))  # 2 epochs: epoch_0, epoch_1
    capsys.readouterr()
    _interrupt_at_micro_batch(monkeypatch, 1)
    assert finetune.main(["--config", "tiny_qlora", *_overrides(setup, run), "epochs=1"]) == 130
    printed = capsys.readouterr()
    assert (f"Note: {run} holds an earlier run's checkpoints (epoch_0, epoch_1, recipe_state.pt); this run starts afresh "
            "(resume_from_checkpoint=False) and its saves replace the training state, the step folders and the epoch folders "
            "it reaches; epoch_1 stays as the earlier run left it (this run saves epoch_0). Choose another output_dir to keep "
            "that run whole.\n") in printed.out
    assert (f"Interrupted (Ctrl-C) before this run saved a checkpoint: the training state in {run} is an earlier run's "
            "(epoch_1, step 8), which completed 2 epochs; run again to start over, or with resume_from_checkpoint=True and "
            "epochs above 2 to train that run on.") in printed.err
    monkeypatch.undo()
    _interrupt_at_micro_batch(monkeypatch, 1)
    assert finetune.main(["--config", "tiny_qlora", *_overrides(setup, run), "epochs=3"]) == 130
    printed = capsys.readouterr()
    assert "the epoch folders it reaches. Choose" in printed.out  # a longer run reaches every epoch folder there
    assert "(epoch_1, step 8); resume_from_checkpoint=True would continue that run" in printed.err
    monkeypatch.undo()
    shutil.rmtree(run)
    finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["epochs=1"]))
    assert "holds an earlier run's" not in capsys.readouterr().out  # an empty folder: nothing to say


def test_a_finished_run_relaunched_gets_back_its_config_and_log(tmp_path, setup, monkeypatch, capsys):
    # A run started afresh over a finished one and stopped before its first save has replaced
    # config.yaml and the metrics log; re-launching the finished run (nothing left to train) puts
    # them back to its checkpoint's, so the folder describes the checkpoint it holds.
    run = tmp_path / "run"
    finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["epochs=1"]))
    finished = {p: p.read_bytes() for p in (run / "config.yaml", run / "logs" / "metrics.jsonl")}
    _interrupt_at_micro_batch(monkeypatch, 2 * 2 + 1)  # in step 3: steps 1 and 2 logged, nothing saved
    with pytest.raises(KeyboardInterrupt):
        finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["epochs=1", "optimizer.lr=1e-3"]))
    monkeypatch.undo()
    assert all(p.read_bytes() != text for p, text in finished.items())
    capsys.readouterr()
    summary = finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["epochs=1", "resume_from_checkpoint=True"]))
    assert summary["nothing_left_to_train"]
    assert {p: p.read_bytes() for p in finished} == finished
    out = capsys.readouterr().out
    assert all(f"Restored {p} to the checkpoint's" in out for p in finished)
    finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["epochs=1", "resume_from_checkpoint=True"]))
    assert "Restored" not in capsys.readouterr().out  # matching files are left alone
    # re-launched naming another log folder: the finished run's own (its config's) is the one checked
    elsewhere = tmp_path / "elsewhere"
    finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["epochs=1", "resume_from_checkpoint=True",
                                                                       f"metric_logger.log_dir={elsewhere}"]))
    assert "Restored" not in capsys.readouterr().out and not elsewhere.exists()
    # while another run logs into that folder (a shared log_dir), its log is not put back over that run's
    from qlora_ext.training import run_lock

    (run / "logs" / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')  # (that run's record)
    with run_lock.exclusive_output_dir(run / "logs"):
        finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["epochs=1", "resume_from_checkpoint=True"]))
    assert (run / "logs" / "metrics.jsonl").read_text() == '{"step": 1, "loss": 9.0}\n'
    assert (f"Left as it is: {run / 'logs' / 'metrics.jsonl'}, in a folder another training run holds; relaunch once that run "
            "has ended") in capsys.readouterr().out
    # a log folder that became a file: said, no traceback
    shutil.rmtree(run / "logs")
    (run / "logs").write_text("")
    finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["epochs=1", "resume_from_checkpoint=True"]))
    assert f"Not restored: {run / 'logs' / 'metrics.jsonl'}: '{run / 'logs'}' exists and is not a folder" in capsys.readouterr().out


def test_a_finished_run_relaunched_restores_its_log_where_its_config_keeps_it(tmp_path, setup, monkeypatch, capsys):
    # The finished run and the stopped one logged to a folder of their own; the re-launch names
    # none: the log goes back where the restored config.yaml says it is (where plot reads it).
    from qlora_ext.training.metric_logging import metrics_file

    run, logs = tmp_path / "run", tmp_path / "own_logs"
    finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["epochs=1", f"metric_logger.log_dir={logs}"]))
    finished = (logs / "metrics.jsonl").read_bytes()
    _interrupt_at_micro_batch(monkeypatch, 2 * 2 + 1)
    with pytest.raises(KeyboardInterrupt):
        finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["epochs=1", f"metric_logger.log_dir={logs}", "optimizer.lr=1e-3"]))
    monkeypatch.undo()
    capsys.readouterr()
    finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["epochs=1", "resume_from_checkpoint=True"]))
    assert f"Restored {logs / 'metrics.jsonl'} to the checkpoint's" in capsys.readouterr().out
    assert (logs / "metrics.jsonl").read_bytes() == finished and metrics_file(run) == logs / "metrics.jsonl"
    assert not (run / "logs").exists()


def test_a_finished_tensorboard_run_relaunched_says_its_events_still_show_the_stopped_run(tmp_path, setup, monkeypatch, capsys):
    pytest.importorskip("tensorboard", reason="tensorboard (optional) is not installed")
    run = tmp_path / "run"
    tb = ["epochs=1", "metric_logger.type=tensorboard"]
    finetune.train(load_config("tiny_qlora", _overrides(setup, run) + tb))
    _interrupt_at_micro_batch(monkeypatch, 2 * 2 + 1)
    with pytest.raises(KeyboardInterrupt):
        finetune.train(load_config("tiny_qlora", _overrides(setup, run) + tb + ["optimizer.lr=1e-3"]))
    monkeypatch.undo()
    capsys.readouterr()
    finetune.train(load_config("tiny_qlora", _overrides(setup, run) + tb + ["resume_from_checkpoint=True"]))
    out = capsys.readouterr().out
    assert "Restored" in out and "Note: TensorBoard's event files still show the later run's curve" in out
    import shutil as sh

    sh.rmtree(run / "logs")  # a log that went missing, with no later run: written back, without the note
    finetune.train(load_config("tiny_qlora", _overrides(setup, run) + tb + ["resume_from_checkpoint=True"]))
    out = capsys.readouterr().out
    assert f"Wrote {run / 'logs' / 'metrics.jsonl'} from the checkpoint (it was missing)" in out and "TensorBoard" not in out


def test_resume_applies_changed_optimizer_schedule_and_clipping(tmp_path, setup, monkeypatch, capsys):
    # What the NaN-loss advice asks for: resume with a lower lr (and other optimizer, schedule and
    # clipping settings); the loaded optimizer and schedule take the new values.
    run = tmp_path / "run"
    finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["epochs=1"]))  # lr 1e-2, warmup 2, clip 1.0
    assert [r["lr"] for r in metrics(run) if "loss" in r][-1] == pytest.approx(1e-2 * cosine_with_warmup(3, num_warmup_steps=2, num_training_steps=4))
    max_norms = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):
        max_norms.append(max_norm)
        return real_clip(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    capsys.readouterr()
    changed = ["optimizer.lr=1e-3", "optimizer.weight_decay=0.0", "optimizer.betas=[0.8,0.99]", "lr_scheduler.num_warmup_steps=6", "clip_grad_norm=0.5"]
    finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["resume_from_checkpoint=True", *changed]))
    text = capsys.readouterr().out
    assert "Changed since the checkpoint, applied from step 5: " in text
    for needle in ("clip_grad_norm 1.0 -> 0.5", "lr_scheduler.num_warmup_steps 2 -> 6", "optimizer.lr 0.01 -> 0.001", "optimizer.weight_decay 0.01 -> 0.0",
                   "optimizer.betas [0.9, 0.999] -> [0.8, 0.99]", "epochs 1 -> 2", "(the lr schedule now spans 8 steps)"):
        assert needle in text, (needle, text)
    # steps 5..8 at the new peak lr under the new warmup (cosine over the 8 steps of 2 epochs)
    lrs = [r["lr"] for r in metrics(run) if "loss" in r and r["step"] > 4]
    expected = [1e-3 * cosine_with_warmup(s, num_warmup_steps=6, num_training_steps=8) for s in range(4, 8)]
    assert lrs == pytest.approx(expected, rel=1e-12) and lrs[0] > 0
    assert max_norms == [0.5] * 4
    state = torch.load(run / "recipe_state.pt", weights_only=True)
    group = state["optimizer"]["param_groups"][0]
    assert (group["weight_decay"], group["betas"], group["initial_lr"]) == (0.0, (0.8, 0.99), 1e-3)
    assert state["lr_scheduler"]["base_lrs"] == [1e-3] and state["global_step"] == 8
    assert state["fingerprint"]["optimizer.lr"] == 1e-3  # the next resume compares with the new values


def test_resume_after_a_kill_while_an_old_step_folder_was_deleted(tmp_path, setup):
    # Killed (SIGKILL) after the last save: one replaced step folder still whole, another half
    # deleted by remove_dir. A resume with nothing left to train leaves only the named checkpoint.
    run = tmp_path / "run"
    finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["epochs=1"]))
    dead = 2**22 + 1
    shutil.copytree(run / "epoch_0", run / "step_4")
    shutil.copytree(run / "epoch_0", run / f".step_3.del-{dead}")
    shutil.rmtree(run / f".step_3.del-{dead}" / "adapter")
    summary = finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["epochs=1", "resume_from_checkpoint=True"]))
    assert summary["losses"] == []
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["epoch_0", "logs"]


def test_resume_after_a_save_killed_between_its_renames(tmp_path, setup):
    # A save of epoch_0 (re-run in the same output_dir) killed by SIGKILL after moving the old
    # epoch_0 aside and before moving the new one in: epoch_0 is missing, recipe_state.pt names it.
    run = tmp_path / "run"
    finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["epochs=1"]))
    dead = 2**22 + 1  # above Linux's largest pid, so no process has it
    (run / "epoch_0").rename(run / f".epoch_0.old-{dead}")
    (run / f".epoch_0.tmp-{dead}").mkdir()
    (run / f".epoch_0.tmp-{dead}" / "adapter_model.safetensors").write_bytes(b"complete but never recorded")
    finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["resume_from_checkpoint=True"]))
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["epoch_0", "epoch_1", "logs"]
    from safetensors.torch import load_file

    assert load_file(run / "epoch_0" / "adapter" / "adapter_model.safetensors")  # the restored, real one


def test_resume_names_its_source_when_the_checkpoint_folder_was_deleted(tmp_path, setup, capsys):
    # The training state (adapter included) is recipe_state.pt; the folder saved with it may be gone.
    run = tmp_path / "run"
    finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["epochs=1"]))
    shutil.rmtree(run / "epoch_0")
    capsys.readouterr()
    finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["epochs=2", "resume_from_checkpoint=True"]))
    out = capsys.readouterr().out
    assert f"Resumed from {run / 'recipe_state.pt'} (saved with {run / 'epoch_0'}, since deleted): epoch 2, step 4" in out, out
    capsys.readouterr()
    finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["epochs=3", "resume_from_checkpoint=True"]))
    assert f"Resumed from {run / 'epoch_1'}: epoch 3, step 8" in capsys.readouterr().out


def test_a_fresh_run_stopped_before_its_first_save_does_not_leak_into_the_resumed_log(tmp_path, setup, monkeypatch, capsys):
    # Run 1 saves epoch_0; a fresh run 2 in the same output_dir (another lr) is stopped before its
    # own first save, its records in metrics.jsonl; resuming continues run 1 (its recipe_state.pt)
    # and so must its log: run 1's records, then the continuation, as without run 2.
    ref = tmp_path / "ref"
    finetune.train(load_config("tiny_qlora", _overrides(setup, ref) + ["epochs=1"]))
    finetune.train(load_config("tiny_qlora", _overrides(setup, ref) + ["resume_from_checkpoint=True"]))
    run = tmp_path / "run"
    finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["epochs=1"]))
    _interrupt_at_micro_batch(monkeypatch, 2 * 2 + 1)  # in run 2's step 3, before its save at step 3
    with pytest.raises(KeyboardInterrupt):
        finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["optimizer.lr=5e-2"]))
    monkeypatch.undo()
    assert [r["lr"] for r in metrics(run) if "lr" in r] != [r["lr"] for r in metrics(ref) if "lr" in r][:2]  # run 2's records
    capsys.readouterr()
    finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["resume_from_checkpoint=True"]))
    assert "are not those logged by the run this checkpoint belongs to" in capsys.readouterr().err
    def curve(output_dir):
        return [(r["step"], r.get("loss"), r.get("lr"), r.get("val_loss")) for r in metrics(output_dir)]

    assert curve(run) == curve(ref) and [s for s, loss, _, _ in curve(ref) if loss is not None] == list(range(1, 9))


def test_ctrl_c_and_sigterm_stop_with_a_line_naming_what_to_resume(tmp_path, setup, monkeypatch, capsys):
    # Ctrl-C mid-training: exit status 130 and one line naming the checkpoint a resume continues
    # from (not a traceback). SIGTERM during a save: 143, the half-written folder removed (as
    # Ctrl-C's unwinding removes it), and the same kind of line.
    import os
    import signal

    run = tmp_path / "run"
    args = _overrides(setup, run)
    handler = signal.getsignal(signal.SIGTERM)
    _interrupt_at_micro_batch(monkeypatch, 2 * 4 + 1)  # in step 5: epoch_0 (step 4) was saved
    assert finetune.main(args) == 130
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert f"Interrupted (Ctrl-C): {run} keeps the checkpoint epoch_0 (step 4), complete; run again with " \
           "resume_from_checkpoint=True to continue from it." in err and "Traceback" not in err
    real_save = saving.save_peft_adapter

    def terminated_while_saving(*a, **k):
        real_save(*a, **k)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(saving, "save_peft_adapter", terminated_while_saving)
    assert finetune.main(args + ["resume_from_checkpoint=True"]) == 143
    monkeypatch.undo()
    assert "Interrupted (SIGTERM): " in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == [".lock", "config.yaml", "epoch_0", "logs", "recipe_state.pt"]  # no .step_6.tmp-PID
    assert signal.getsignal(signal.SIGTERM) == handler  # restored after the run
    # a fresh run stopped before its first save is told the state there is an earlier run's
    _interrupt_at_micro_batch(monkeypatch, 1)
    assert finetune.main(args) == 130
    assert (f"Interrupted (Ctrl-C) before this run saved a checkpoint: the training state in {run} is an earlier run's "
            "(epoch_0, step 4); resume_from_checkpoint=True would continue that run") in capsys.readouterr().err
    monkeypatch.undo()
    # stopped in the closing report, with training done: nothing to resume, and said so
    monkeypatch.setattr(finetune.evaluation, "print_report", lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM))
    assert finetune.main(args + ["epochs=1"]) == 143
    assert f"Interrupted (SIGTERM) after training finished: {run} keeps the checkpoint epoch_0 (step 4), complete.\n" in capsys.readouterr().err


def test_a_run_stopped_in_its_final_evaluation_keeps_its_loss_curve(tmp_path, setup, monkeypatch, capsys):
    # The curve shows the training steps alone, so it is drawn as soon as they end: a Ctrl-C in
    # the (slow, generating) before/after evaluation no longer costs it.
    from qlora_ext.training import evaluation

    run = tmp_path / "run"
    real_answer, calls = evaluation.answer, {"n": 0}

    def stopped_after_training(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the answers after training
            raise KeyboardInterrupt
        return real_answer(*a, **k)

    monkeypatch.setattr(evaluation, "answer", stopped_after_training)
    overrides = ["epochs=1", "eval.before_and_after=True", "dataset.validation_fraction=0.25", "eval.num_samples=1",
                 "eval.max_new_tokens=2"]
    assert finetune.main(_overrides(setup, run) + overrides) == 130
    assert calls["n"] == 2 and (run / "loss_curve.png").stat().st_size > 0
    assert "Interrupted (Ctrl-C) after training finished" in capsys.readouterr().err


def test_a_second_ctrl_c_while_the_closing_line_is_written_is_ignored(tmp_path, setup, monkeypatch, capsys):
    # Ctrl-C pressed twice: the second one lands while the closing line is composed (the training
    # state is read for it); it is ignored instead of printing a traceback over the line.
    import os
    import signal

    run = tmp_path / "run"
    real_line = finetune._interrupted_line

    def pressed_again(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        return real_line(*a, **k)

    monkeypatch.setattr(finetune, "_interrupted_line", pressed_again)
    _interrupt_at_micro_batch(monkeypatch, 2 * 4 + 1)  # in step 5: epoch_0 (step 4) was saved
    handler = signal.getsignal(signal.SIGINT)
    assert finetune.main(_overrides(setup, run)) == 130
    assert f"Interrupted (Ctrl-C): {run} keeps the checkpoint epoch_0 (step 4)" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is handler  # restored


def test_a_finished_run_relaunched_from_a_state_without_its_log_restores_only_its_config(tmp_path, setup, capsys):
    # A training state saved before the metrics log was saved with it ("metrics_log" is optional):
    # the re-launch puts back config.yaml, and leaves the log as it is, saying nothing of it.
    run = tmp_path / "run"
    finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["epochs=1"]))
    state = torch.load(run / "recipe_state.pt", weights_only=True)
    del state["metrics_log"]
    torch.save(state, run / "recipe_state.pt")
    finished_config = (run / "config.yaml").read_bytes()
    (run / "config.yaml").write_text("output_dir: elsewhere\n")  # a later run's, stopped before its first save
    (run / "logs" / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    capsys.readouterr()
    summary = finetune.train(load_config("tiny_qlora", _overrides(setup, run) + ["epochs=1", "resume_from_checkpoint=True"]))
    assert summary["nothing_left_to_train"]
    out = capsys.readouterr().out
    assert f"Restored {run / 'config.yaml'} to the checkpoint's" in out and "metrics.jsonl" not in out
    assert (run / "config.yaml").read_bytes() == finished_config
    assert (run / "logs" / "metrics.jsonl").read_text() == '{"step": 1, "loss": 9.0}\n'


# Ctrl-C (or a full disk) while recipe_state.pt is written, after the checkpoint folder was renamed into place: the
# folder and the state are one checkpoint, so the folder it replaced comes back (helper-145)
def _one_epoch_overrides(setup, out, *extra):
    ckpt, data = setup
    return small_run_overrides(ckpt, data, out) + [
        "epochs=1", "max_steps_per_epoch=2", "eval.before_and_after=False", "save_adapter_weights_only=True", *extra]


def _interrupt_state_write(monkeypatch, on_call=1):
    real, calls = checkpointing.save_training_state, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == on_call:
            raise KeyboardInterrupt("Ctrl-C while recipe_state.pt is written")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpointing, "save_training_state", interrupted)


def _adapter_file_bytes(folder):
    return (folder / "adapter" / "adapter_model.safetensors").read_bytes()


def test_interrupted_state_write_keeps_the_earlier_runs_folder_its_state_names(tmp_path, setup, monkeypatch):
    run = tmp_path / "run"
    finetune.train(load_config("tiny_qlora", _one_epoch_overrides(setup, run)))  # run A: epoch_0 + its state
    a_adapter = _adapter_file_bytes(run / "epoch_0")
    a_config = (run / "epoch_0" / "training_config.yaml").read_text()

    _interrupt_state_write(monkeypatch)
    with pytest.raises(KeyboardInterrupt):  # run B, afresh, other lr: interrupted while its state is written
        finetune.train(load_config("tiny_qlora", _one_epoch_overrides(setup, run, "optimizer.lr=5e-2")))
    monkeypatch.undo()

    state = torch.load(run / "recipe_state.pt", weights_only=True)
    assert state["checkpoint_name"] == "epoch_0" and state["fingerprint"]["optimizer.lr"] == 1e-2  # still A's
    # ... and so must be the folder it names (was B's, with lr 0.05 in its training_config.yaml)
    assert (run / "epoch_0" / "training_config.yaml").read_text() == a_config
    assert _adapter_file_bytes(run / "epoch_0") == a_adapter
    assert not [p.name for p in run.iterdir() if p.name.startswith(".epoch_0")]


def test_interrupted_state_write_discards_the_new_step_folder(tmp_path, setup, monkeypatch):
    run = tmp_path / "run"
    # saves at step 1 (complete) and step 2 (its state write interrupted)
    _interrupt_state_write(monkeypatch, on_call=2)
    with pytest.raises(KeyboardInterrupt):
        finetune.train(load_config("tiny_qlora", _one_epoch_overrides(setup, run, "save_every_n_steps=1", "max_steps_per_epoch=3")))
    monkeypatch.undo()
    state = torch.load(run / "recipe_state.pt", weights_only=True)
    assert state["checkpoint_name"] == "step_1"
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["logs", "step_1"]  # was also step_2


# an interruption after recipe_state.pt is in place, or inside commit_dir after its renames (helper-150)
def _step_save_overrides(setup, out, *extra):
    ckpt, data = setup
    return small_run_overrides(ckpt, data, out) + [
        "epochs=1", "max_steps_per_epoch=3", "eval.before_and_after=False", "save_adapter_weights_only=True",
        "save_every_n_steps=1", *extra]


def test_ctrl_c_after_the_state_is_renamed_into_place_keeps_the_folder_it_names(tmp_path, setup, monkeypatch):
    run = tmp_path / "run"
    real_save, real_fsync, calls = checkpointing.save_training_state, atomic.fsync_dir, {"n": 0}

    def save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] != 2:
            return real_save(*args, **kwargs)

        def fsync_then_interrupt(path):  # Ctrl-C while atomic_path syncs the folder, after os.replace
            real_fsync(path)
            raise KeyboardInterrupt("Ctrl-C after recipe_state.pt was renamed into place")

        monkeypatch.setattr(atomic, "fsync_dir", fsync_then_interrupt)
        try:
            return real_save(*args, **kwargs)
        finally:
            monkeypatch.setattr(atomic, "fsync_dir", real_fsync)

    monkeypatch.setattr(checkpointing, "save_training_state", save)
    with pytest.raises(KeyboardInterrupt):
        finetune.train(load_config("tiny_qlora", _step_save_overrides(setup, run)))
    monkeypatch.undo()
    named = torch.load(run / "recipe_state.pt", weights_only=True)["checkpoint_name"]
    assert (run / named).is_dir(), f"recipe_state.pt names {named}; folders: {sorted(p.name for p in run.iterdir())}"


def test_ctrl_c_inside_commit_dir_after_the_old_folder_moved_aside_puts_it_back(tmp_path, setup, monkeypatch):
    run = tmp_path / "run"
    finetune.train(load_config("tiny_qlora", _step_save_overrides(setup, run, "save_every_n_steps=100", "max_steps_per_epoch=2")))
    before = (run / "epoch_0" / "training_config.yaml").read_text()
    real_fsync, calls = checkpoint_folders.fsync_dir, {"n": 0}

    def interrupt(path):  # Ctrl-C while commit_dir syncs the folder after its renames (once)
        real_fsync(path)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt("Ctrl-C in commit_dir's fsync_dir")

    monkeypatch.setattr(checkpoint_folders, "fsync_dir", interrupt)
    with pytest.raises(KeyboardInterrupt):
        finetune.train(load_config("tiny_qlora", _step_save_overrides(setup, run, "save_every_n_steps=100", "max_steps_per_epoch=2",
                                                            "optimizer.lr=5e-2")))
    monkeypatch.undo()
    state = torch.load(run / "recipe_state.pt", weights_only=True)
    assert state["checkpoint_name"] == "epoch_0"
    # the state is the first run's, so must be the folder it names (and no hidden copy left for the next start to delete)
    assert (run / "epoch_0" / "training_config.yaml").read_text() == before
