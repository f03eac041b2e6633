"""The trainer end to end on CPU: the default run (reduced), the 7B config's code path on a tiny
HF checkpoint, the outputs it writes, the CLI's errors, NaN handling and torch.compile."""

from __future__ import annotations

import json
import math
import os
import re
import threading
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters
from safetensors.torch import load_file

from qlora_ext import finetune
from qlora_ext.generation import NonFiniteLogitsError
from qlora_ext.training import evaluation, steps
from qlora_ext.training.config import ASSETS_DIR, load_config
from qlora_ext.training.optim import cosine_with_warmup

from trainer_helpers import metrics, small_run_overrides, write_small_dataset, write_tiny_hf_checkpoint


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return write_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny_hf"))


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return write_small_dataset(tmp_path_factory.mktemp("data") / "small.jsonl")


@pytest.mark.skipif(not (ASSETS_DIR / "tiny_llama2" / "config.json").is_file(), reason="bundled tiny model not built")
def test_default_run_reduced(tmp_path, capsys):
    out = tmp_path / "run"
    rc = finetune.main([f"output_dir={out}", "max_steps_per_epoch=3", "epochs=1", "eval.max_batches=1",
                        "eval.num_samples=1", "eval.max_new_tokens=4", "log_every_n_steps=1"])
    captured = capsys.readouterr()
    text = captured.out
    assert rc == 0
    assert "Memory Stats after model init::\nCPU resident memory:" in text
    assert "Held-out loss:" in text and "before ->" in text
    assert "prompt:" in text and "before:" in text and "after:" in text
    assert "|3|Loss: " in captured.err and "|Loss: " not in text  # the progress bar (epoch|step|Loss), on stderr as torchtune's
    assert "Resolved config (seed " in text and "model:\n  builder: qlora_llama2" in text
    ckpt = out / "epoch_0"
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "model.safetensors", "config.json", "tokenizer.model",
                 "tokenizer_config.json", "training_config.yaml"):
        assert (ckpt / name).is_file(), name
    assert not (ckpt / "adapter_config.json").exists()  # beside the merged weights, transformers would apply it again
    assert (out / "recipe_state.pt").is_file() and (out / "loss_curve.png").is_file() and (out / "config.yaml").is_file()
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in metrics(out) if "val_loss" in r] == [3]  # the epoch end
    for record in (r for r in metrics(out) if "loss" in r):  # throughput and CPU memory with every logged step
        assert record["tokens_per_second"] > 0 and 0 < record["rss_memory"] <= record["peak_rss_memory"] * 1.01 + 0.01
    assert str(out) in text and "loss_curve.png" in text
    # the merged model is in the base's dtype (bf16) and differs from the base where LoRA applied
    merged, base = load_file(ckpt / "model.safetensors"), load_file(ASSETS_DIR / "tiny_llama2" / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert merged[key].dtype == torch.bfloat16 and not torch.equal(merged[key], base[key])
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_seed_7b_config_code_path_on_tiny_hf_checkpoint(tmp_path, tiny_ckpt, small_data, capsys):
    """The llama2_7b_qlora_single_device config (by torchtune's name, with the seed's overrides
    checkpointer.checkpoint_files and tokenizer_checkpoint), with only the model size, device and
    paths changed."""
    out = tmp_path / "run"
    args = ["--config", "llama2/7B_qlora_single_device", "model.builder=qlora_llama2", f"checkpointer.checkpoint_dir={tiny_ckpt}",
            "checkpointer.checkpoint_files=[model.safetensors]",
            f"tokenizer_checkpoint={ASSETS_DIR / 'tokenizer.model'}", f"dataset.data_files={small_data}", f"output_dir={out}",
            "device=cpu", "dtype=fp32", "max_steps_per_epoch=2", "lr_scheduler.num_warmup_steps=1"]
    assert finetune.main(args) == 0
    cfg = load_config(str(out / "config.yaml"))
    assert cfg.checkpointer.checkpoint_files == ["model.safetensors"]
    assert cfg.tokenizer.path == str(ASSETS_DIR / "tokenizer.model")
    assert cfg.enable_activation_checkpointing and cfg.gradient_accumulation_steps == 8 and cfg.model.lora_rank == 8
    adapter_cfg = json.loads((out / "epoch_0" / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 8 and adapter_cfg["lora_alpha"] == 16
    assert sorted(adapter_cfg["target_modules"]) == ["down_proj", "gate_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    lrs = [r["lr"] for r in metrics(out)]
    assert lrs == pytest.approx([0.0, 3e-4])  # warmup from 0 to the seed config's 3e-4


def test_the_last_step_is_logged_whatever_log_every_n_steps(tmp_path, tiny_ckpt, small_data):
    # log_every_n_steps above the run's steps had logged no loss at all: no curve, no memory peaks.
    out = tmp_path / "run"
    overrides = small_run_overrides(tiny_ckpt, small_data, out) + ["epochs=2", "max_steps_per_epoch=3", "log_every_n_steps=4",
                                                                   "save_adapter_weights_only=True", "eval.before_and_after=False"]
    summary = finetune.train(load_config("tiny_qlora", overrides))
    assert [r["step"] for r in metrics(out) if "loss" in r] == [4, 6]
    assert (out / "loss_curve.png").is_file() and summary["peak_memory"]


def test_the_peak_memory_summary_counts_the_last_save(tmp_path, tiny_ckpt, small_data, monkeypatch, capsys):
    """The summary's peaks are the largest of the logged steps' and of a reading after the last
    step, which the last checkpoint save precedes (on a GPU each logged reading starts a new
    window, so that save's peak was in none). Readings here are stand-ins that grow per call."""
    readings = []

    def growing(device, reset_peak=False):
        readings.append(len(readings) + 1.0)
        return {"peak_memory_reserved": readings[-1]}

    monkeypatch.setattr(finetune, "memory_stats", growing)
    out = tmp_path / "run"
    overrides = small_run_overrides(tiny_ckpt, small_data, out) + ["epochs=1", "max_steps_per_epoch=2", "log_every_n_steps=1",
                                                                   "save_adapter_weights_only=True", "eval.before_and_after=False"]
    summary = finetune.train(load_config("tiny_qlora", overrides))
    assert [r["peak_memory_reserved"] for r in metrics(out) if "loss" in r] == [2.0, 3.0]  # init reading, then one per step
    assert readings == [1.0, 2.0, 3.0, 4.0] and summary["peak_memory"] == {"peak_memory_reserved": 4.0}
    assert "Peak memory during training and its checkpoint saves: GPU reserved 4.00 GB" in capsys.readouterr().out


@pytest.mark.parametrize("folder", ["epoch_0", "step_3/sub"])
def test_a_base_inside_a_checkpoint_folder_of_the_run_is_refused(tmp_path, tiny_ckpt, small_data, folder):
    """A base model (or tokenizer) inside output_dir/epoch_N or step_N: the run's saves would
    replace it (epoch) or delete it (step), as chaining runs in one output_dir did. Refused by
    key, before anything is written; a base elsewhere in output_dir is fine."""
    import shutil

    from qlora_ext.training.config import ConfigError

    out = tmp_path / "run"
    base = out / folder
    shutil.copytree(tiny_ckpt, base)
    before = {f.name: f.read_bytes() for f in base.iterdir()}
    overrides = small_run_overrides(base, small_data, out) + ["epochs=1", "max_steps_per_epoch=1", "eval.before_and_after=False"]
    with pytest.raises(ConfigError, match=rf"checkpointer.checkpoint_dir: '{base}' lies in {out / folder.split('/')[0]}, a checkpoint "
                                          rf"folder of this run's output_dir '{out}', which the run's saves replace or delete"):
        finetune.train(load_config("tiny_qlora", overrides))
    assert {f.name: f.read_bytes() for f in base.iterdir()} == before and sorted(p.name for p in out.iterdir()) == [folder.split("/")[0]]
    shutil.copy(ASSETS_DIR / "tokenizer.model", base / "tokenizer.model")
    tokenizer_inside = small_run_overrides(tiny_ckpt, small_data, out) + [f"tokenizer.path={base / 'tokenizer.model'}"]
    with pytest.raises(ConfigError, match=r"tokenizer.path: .* lies in "):
        finetune.train(load_config("tiny_qlora", tokenizer_inside))
    # a metrics log there: the first save deleted it, and the run stopped blaming the checkpoint
    log_inside = small_run_overrides(tiny_ckpt, small_data, out) + [f"metric_logger.log_dir={out / folder / 'logs'}"]
    with pytest.raises(ConfigError, match=r"metric_logger.log_dir: .* lies in .*; choose a log_dir outside the checkpoint folders$"):
        finetune.train(load_config("tiny_qlora", log_inside))
    elsewhere = out / "bases" / "tiny"  # inside output_dir, but in no checkpoint folder: kept as it is
    shutil.copytree(tiny_ckpt, elsewhere)
    finetune.train(load_config("tiny_qlora", small_run_overrides(elsewhere, small_data, out) + [
        "epochs=1", "max_steps_per_epoch=1", "eval.before_and_after=False", "save_adapter_weights_only=True"]))
    assert (out / "epoch_0").is_dir() and sorted(f.name for f in elsewhere.iterdir()) == sorted(f.name for f in Path(tiny_ckpt).iterdir())


def test_a_save_the_file_system_refuses_stops_with_the_last_checkpoint_named(tmp_path, tiny_ckpt, small_data, monkeypatch, capsys):
    """A full disk while saving epoch_1: a one-line error naming the checkpoint, the folder and
    the intact epoch_0 (torch.save reports a full disk as a RuntimeError of its stream writer);
    epoch_0 and the training state are untouched. Any other error is raised as it is."""
    import errno

    from qlora_ext.training import saving

    out = tmp_path / "run"
    args = small_run_overrides(tiny_ckpt, small_data, out) + ["epochs=2", "max_steps_per_epoch=1", "eval.before_and_after=False",
                                                              "save_adapter_weights_only=True"]
    real = saving.save_peft_adapter
    calls = []

    def fails_second(error):
        def save(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                raise error
            return real(*a, **k)
        return save

    monkeypatch.setattr(saving, "save_peft_adapter", fails_second(OSError(errno.ENOSPC, "No space left on device")))
    assert finetune.main(["--config", "tiny_qlora", *args]) == 1
    err = capsys.readouterr().err
    assert re.search(rf"error: output_dir: cannot write checkpoint epoch_1 to '{out}' \([0-9.]+ GB free there\): OSError: "
                     rf"\[Errno 28\] No space left on device; the last complete checkpoint, {out / 'epoch_0'}, is intact: "
                     r"once the cause is fixed, resume_from_checkpoint=True continues from it", err), err
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".epoch", "epoch"))) == ["epoch_0"]
    assert torch.load(out / "recipe_state.pt", weights_only=True)["checkpoint_name"] == "epoch_0"
    calls.clear()
    monkeypatch.setattr(saving, "save_peft_adapter", fails_second(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")))

    def lost_mount(path):
        raise OSError(errno.ESTALE, "Stale file handle")

    monkeypatch.setattr(finetune.shutil, "disk_usage", lost_mount)
    assert finetune.main(["--config", "tiny_qlora", *args]) == 1
    assert (f"cannot write checkpoint epoch_1 to '{out}' (free space unknown): RuntimeError: [enforce fail at inline_container.cc:672] . "
            "unexpected pos (torch.save's file writer stopped, as on a full disk); the last complete checkpoint") in capsys.readouterr().err
    monkeypatch.undo()
    calls.clear()
    monkeypatch.setattr(saving, "save_peft_adapter", fails_second(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        finetune.main(["--config", "tiny_qlora", *args])


def test_other_writes_the_file_system_refuses_are_named_with_what_the_run_leaves(tmp_path, tiny_ckpt, small_data, monkeypatch, capsys):
    """A full disk met by the metrics log (not a checkpoint save) ends with an error line naming
    the intact checkpoint, not a traceback; one met by the loss plot after the run is a warning."""
    import errno

    from qlora_ext.training import metric_logging

    out = tmp_path / "run"
    args = small_run_overrides(tiny_ckpt, small_data, out) + ["epochs=2", "max_steps_per_epoch=2", "eval.before_and_after=False",
                                                              "save_adapter_weights_only=True"]
    real_log, logged = metric_logging.MetricLoggers.log, []

    def full_after_the_first_save(self, metrics, step):
        logged.append(step)
        if step == 3:  # after epoch_0 (steps 1-2) was saved
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_log(self, metrics, step)

    monkeypatch.setattr(metric_logging.MetricLoggers, "log", full_after_the_first_save)
    assert finetune.main(["--config", "tiny_qlora", *args]) == 1
    err = capsys.readouterr().err
    assert (f"error: Stopped (a write failed: OSError: [Errno 28] No space left on device): {out} keeps the checkpoint epoch_0 (step 2), "
            "complete; run again with resume_from_checkpoint=True to continue from it.") in err, err
    assert "Traceback" not in err
    monkeypatch.undo()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(finetune, "plot_loss_curves", full)
    assert finetune.main(["--config", "tiny_qlora", *args, "resume_from_checkpoint=True"]) == 0
    err = capsys.readouterr().err
    assert (f"warning: the loss curve could not be written to {out / 'loss_curve.png'} ([Errno 28] No space left on device); "
            f"draw it later with python -m qlora_ext.plot {out}") in err, err
    assert (out / "epoch_1").is_dir()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_under_the_metrics_log_or_stdout_is_named(tmp_path, tiny_ckpt, small_data):
    # The log's own error (naming metrics.jsonl) was replaced by a bare OSError from closing it,
    # which flushed the stuck line again; a full stdout (> log.txt on a full disk) named nothing.
    import subprocess
    import sys

    out = tmp_path / "run"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "metrics.jsonl").symlink_to("/dev/full")  # writes fail with ENOSPC
    args = small_run_overrides(tiny_ckpt, small_data, out) + ["epochs=1", "max_steps_per_epoch=1", "eval.before_and_after=False"]
    env = {**os.environ, "PYTHONPATH": str(Path(finetune.__file__).parent.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-m", "qlora_ext.finetune", "--config", "tiny_qlora", *args], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 1, run.stderr[-2000:]
    assert (f"error: Stopped (a write failed: OSError: [Errno 28] No space left on device (writing the metrics log): "
            f"'{out / 'logs' / 'metrics.jsonl'}'): there is no checkpoint to resume from in {out}") in run.stderr, run.stderr[-2000:]
    (out / "logs" / "metrics.jsonl").unlink()
    with open("/dev/full", "w") as full:
        run = subprocess.run([sys.executable, "-m", "qlora_ext.finetune", "--config", "tiny_qlora", *args], stdout=full,
                             stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    assert run.returncode == 1, run.stderr[-2000:]
    assert "error: Stopped (standard output cannot be written: No space left on device)" in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and "Exception ignored" not in run.stderr
    # a closed stdout (>&-) is None in Python, and print writes nothing: the run trains on
    command = " ".join(f"'{a}'" for a in [sys.executable, "-m", "qlora_ext.finetune", "--config", "tiny_qlora", *args])
    run = subprocess.run(["bash", "-c", f"exec {command} >&-"], stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    assert run.returncode == 0 and (out / "epoch_0").is_dir(), run.stderr[-2000:]


def test_a_stdout_of_the_caller_that_fails_is_named_and_left_in_place(tmp_path, tiny_ckpt, small_data, monkeypatch, capsys):
    # finetune.main embedded with a stdout object of its own (no file descriptor): its failure
    # gave io.UnsupportedOperation while the line was composed (the redirect to /dev/null).
    import errno
    import io
    import sys

    class Full(io.TextIOBase):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    stream = Full()
    monkeypatch.setattr(sys, "stdout", stream)
    args = small_run_overrides(tiny_ckpt, small_data, tmp_path / "run") + ["epochs=1", "max_steps_per_epoch=1"]
    assert finetune.main(["--config", "tiny_qlora", *args]) == 1
    assert "error: Stopped (standard output cannot be written: No space left on device)" in capsys.readouterr().err
    assert sys.stdout is stream


def test_an_older_step_folder_that_cannot_be_removed_is_left_with_a_warning(tmp_path, tiny_ckpt, small_data, monkeypatch):
    # After step_4 and the training state were saved, moving step_2 away failed (a write-protected
    # folder): the run stopped with "cannot write checkpoint step_4 ... step_2 is intact", while
    # the state on disk named step_4.
    from qlora_ext.training import checkpoint_folders

    out = tmp_path / "run"
    args = small_run_overrides(tiny_ckpt, small_data, out) + ["epochs=1", "max_steps_per_epoch=4", "save_every_n_steps=2",
                                                              "eval.before_and_after=False", "save_adapter_weights_only=True"]
    real = checkpoint_folders.os.replace

    def protected(src, dst):
        if Path(src).name == "step_2" and ".del-" in str(dst):
            raise PermissionError(1, "Operation not permitted", str(src), None, str(dst))
        return real(src, dst)

    monkeypatch.setattr(checkpoint_folders.os, "replace", protected)
    with pytest.warns(RuntimeWarning, match=rf"could not delete the older checkpoint {out / 'step_2'}: .*Operation not permitted"):
        summary = finetune.train(load_config("tiny_qlora", args))
    assert summary["last_step"] == 4 and (out / "epoch_0").is_dir() and (out / "step_2").is_dir()
    assert torch.load(out / "recipe_state.pt", weights_only=True)["checkpoint_name"] == "epoch_0"


def test_a_torchrun_launch_of_several_processes_is_refused(tmp_path, tiny_ckpt, small_data, monkeypatch, capsys):
    # Each rank trained alone: the second was refused output_dir as "in use by another training
    # run (pid of its sibling)", and torchrun then killed the first.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    args = small_run_overrides(tiny_ckpt, small_data, tmp_path / "run")
    assert finetune.main(["--config", "tiny_qlora", *args]) == 2
    assert ("error: python -m qlora_ext.finetune trains on one device; it was started as process 1 of WORLD_SIZE=2 (torchrun "
            "--nproc_per_node 2, say): run it without torchrun, or with one process") in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    # a WORLD_SIZE left in a job script, with no RANK (torchrun sets both), is one process: not refused
    monkeypatch.delenv("RANK")
    assert finetune.main(["--config", "tiny_qlora", *args, "batch_size=0"]) == 2
    assert "torchrun" not in capsys.readouterr().err


def test_a_damaged_tokenizer_config_of_the_base_stops_the_run_at_setup(tmp_path, tiny_ckpt, small_data, capsys):
    # It is copied at each save: it failed there, after training, with a JSONDecodeError traceback and no checkpoint.
    import shutil

    from trainer_helpers import TOKENIZER

    base = tmp_path / "base"
    shutil.copytree(tiny_ckpt, base)
    shutil.copyfile(TOKENIZER, base / "tokenizer.model")
    (base / "tokenizer_config.json").write_text('{"add_bos_token": true, ')
    out = tmp_path / "run"
    args = small_run_overrides(base, small_data, out) + [f"tokenizer.path={base / 'tokenizer.model'}", "epochs=1", "max_steps_per_epoch=1"]
    assert finetune.main(["--config", "tiny_qlora", *args]) == 2
    err = capsys.readouterr().err
    assert f"error: checkpointer.checkpoint_dir: {base / 'tokenizer_config.json'} is not valid JSON" in err, err
    assert not (out / "logs").exists() or not any(out.glob("epoch_*"))
    # so is a tokenizer.json of another tokenizer, which transformers would read before tokenizer.model
    (base / "tokenizer_config.json").write_text('{"add_bos_token": true}')
    (base / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {"Hello": 0}}}')
    assert finetune.main(["--config", "tiny_qlora", *args]) == 2
    err = capsys.readouterr().err
    assert f"error: checkpointer.checkpoint_dir: {base / 'tokenizer.json'} does not describe the tokenizer.model beside it" in err, err


def test_a_second_run_on_a_busy_output_dir_is_refused(tmp_path, tiny_ckpt, small_data):
    """Two trainers on one output_dir: the second had swept the first one's temporary files
    mid-write (a FileNotFoundError) and interleaved the metrics log. Now it is refused while the
    first holds the folder's lock (flock, per open file: here the test holds it), and runs once
    the lock is free; a killed holder's lock goes with its process."""
    from qlora_ext.training import run_lock
    from qlora_ext.training.config import ConfigError

    out = tmp_path / "run"
    out.mkdir()
    cfg = load_config("tiny_qlora", small_run_overrides(tiny_ckpt, small_data, out) + [
        "epochs=1", "max_steps_per_epoch=1", "eval.before_and_after=False", "save_adapter_weights_only=True"])
    with run_lock.exclusive_output_dir(out):
        with pytest.raises(ConfigError, match=rf"output_dir: '{out}' is in use by another training run \(pid {os.getpid()}\); "
                                              r"wait for it to end, or choose another output_dir"):
            finetune.train(cfg)
        assert not (out / "config.yaml").exists()
    finetune.train(cfg)
    assert (out / "epoch_0").is_dir()
    # Two runs with one metric_logger.log_dir (each its own output_dir) overwrote each other's
    # metrics.jsonl (mixed records, lines cut into each other): that folder is locked too.
    shared = tmp_path / "tb"
    shared.mkdir()
    overrides = [f"metric_logger.log_dir={shared}", "metric_logger.type=tensorboard"]
    first = load_config("tiny_qlora", small_run_overrides(tiny_ckpt, small_data, tmp_path / "a") + overrides)
    with run_lock.exclusive_output_dir(shared, key="metric_logger.log_dir"):  # (the first run, holding it)
        with pytest.raises(ConfigError, match=rf"metric_logger.log_dir: '{shared}' is in use by another training run \(pid "
                                              r"\d+\); wait for it to end, or choose another metric_logger.log_dir"):
            finetune.train(first)
    # the default logs/ folder of a run is locked as well: another run's log_dir pointing there waits
    other = load_config("tiny_qlora", small_run_overrides(tiny_ckpt, small_data, tmp_path / "b") + [f"metric_logger.log_dir={out}/logs"])
    with run_lock.exclusive_output_dir(out / "logs", key="metric_logger.log_dir"):
        with pytest.raises(ConfigError, match=r"metric_logger.log_dir: .* is in use by another training run"):
            finetune.train(other)
        # and the run whose logs/ it is, with log_dir unset, is told of output_dir, the key it set
        with pytest.raises(ConfigError, match=rf"output_dir: '{out / 'logs'}' is in use by another training run .* choose another output_dir$"):
            finetune.train(cfg)
    # a log_dir that is output_dir by another spelling (through a folder made for it) is not a second run
    again = load_config("tiny_qlora", small_run_overrides(tiny_ckpt, small_data, out) + [
        "epochs=1", "max_steps_per_epoch=1", "eval.before_and_after=False", "save_adapter_weights_only=True",
        f"metric_logger.log_dir={out}/tb/.."])
    assert len(finetune.train(again)["losses"]) == 1


def test_too_few_examples_for_one_step_are_named(tmp_path, tiny_ckpt, small_data):
    from qlora_ext.training.data_files import DataError

    # 48 examples - 10% held out = 43: a batch of 64 makes no step
    cfg = load_config("tiny_qlora", small_run_overrides(tiny_ckpt, small_data, tmp_path / "run") + ["batch_size=64"])
    with pytest.raises(DataError, match=r"dataset.data_files: too few training examples \(43\) for one optimizer step "
                                        r"with batch_size=64 and gradient_accumulation_steps=\d+"):
        finetune.train(cfg)


_CUT_TO_PROMPT = {"instruction": "Describe " + "the forest island silver orange " * 20, "input": "", "output": "Ok."}  # > 64 tokens
_SHORT = {"instruction": "Greet.", "input": "", "output": "Hello there, friend."}


def test_examples_cut_by_the_models_max_seq_len_name_it(tmp_path, tiny_ckpt, small_data, capsys):
    # With tokenizer.max_seq_len null, the model's max_seq_len cuts: the message told the user to
    # raise tokenizer.max_seq_len, which the next run refuses as longer than the model's.
    overrides = small_run_overrides(tiny_ckpt, small_data, tmp_path / "run") + ["model.max_seq_len=16", "tokenizer.max_seq_len=null"]
    assert finetune.main(["--config", "tiny_qlora", *overrides]) == 2
    assert re.search(r"error: the model's max_seq_len 16 \(tokenizer.max_seq_len is null\) cuts all \d+ training examples to their "
                     r"prompt \(up to \d+ tokens with BOS\), leaving no response token to learn from; shorten their prompts \(or set "
                     r"dataset.train_on_input=true\)", capsys.readouterr().err)


def test_a_step_with_no_token_to_learn_from_leaves_the_adapters_and_logs_no_loss(tmp_path, tiny_ckpt, capsys):
    # It logged loss 0.0 and AdamW still moved the adapters by their momentum.
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [_SHORT, _SHORT, _CUT_TO_PROMPT, _SHORT]))

    def run(name, steps_):
        overrides = small_run_overrides(tiny_ckpt, data, tmp_path / name) + [
            "batch_size=1", "gradient_accumulation_steps=1", "shuffle=false", "dataset.validation_fraction=0", "epochs=1",
            "tokenizer.max_seq_len=64", f"max_steps_per_epoch={steps_}", "lr_scheduler.name=constant_with_warmup",
            "lr_scheduler.num_warmup_steps=0",  # (the same lr at step 2 in both runs)
            "optimizer.weight_decay=0", "save_adapter_weights_only=true", "metric_logger.plot_loss_curve=false"]
        summary = finetune.train(load_config("tiny_qlora", overrides))
        return summary, load_file(tmp_path / name / "epoch_0" / "adapter" / "adapter_model.safetensors")

    (_, two), (summary, three) = run("two", 2), run("three", 3)
    assert "Step 3: tokenizer.max_seq_len=64 cuts each example of its batches to the prompt, leaving no token to learn from: " \
           "the adapters are not updated" in capsys.readouterr().out
    assert two.keys() == three.keys() and all(torch.equal(two[k], three[k]) for k in two)
    assert len(summary["losses"]) == 2
    logged = metrics(tmp_path / "three")
    assert [r["step"] for r in logged] == [1, 2, 3] and "loss" in logged[1] and "loss" not in logged[2]
    assert logged[1]["lr"] == 1e-2 and "lr" not in logged[2]  # a rate the skipped step never applied is not logged


def test_skipped_first_and_last_steps_are_reported_by_the_steps_that_have_losses(tmp_path, tiny_ckpt, capsys):
    # The closing report called step 2's loss the first step's; a skipped first step made torch
    # warn that the schedule was stepped before the optimizer.
    import warnings

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [_CUT_TO_PROMPT, _SHORT, _SHORT, _CUT_TO_PROMPT]))
    overrides = small_run_overrides(tiny_ckpt, data, tmp_path / "run") + [
        "batch_size=1", "gradient_accumulation_steps=1", "shuffle=false", "dataset.validation_fraction=0", "epochs=1",
        "tokenizer.max_seq_len=64", "save_adapter_weights_only=true", "metric_logger.plot_loss_curve=false"]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".*lr_scheduler\.step\(\)")  # that warning fails the run
        summary = finetune.train(load_config("tiny_qlora", overrides))
    assert summary["loss_steps"] == [2, 3] and summary["last_step"] == 4
    losses = summary["losses"]
    assert f"Training loss: {losses[0]:.4f} at step 2 -> {losses[1]:.4f} at step 3\n" in capsys.readouterr().out


def test_held_out_batches_with_no_token_to_score_are_refused_at_setup(tmp_path, tiny_ckpt):
    # The validation loss had failed with a traceback at the end of the first epoch, its training lost.
    from qlora_ext.training.data import split_records
    from qlora_ext.training.data_files import DataError

    records = [_CUT_TO_PROMPT] * 10 + [_SHORT] * 30
    assert [r is _CUT_TO_PROMPT for r in split_records(records, 0.2, 7)[1][:3]] == [True, True, True]  # (seed=7)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    overrides = small_run_overrides(tiny_ckpt, data, tmp_path / "run") + [
        "batch_size=2", "gradient_accumulation_steps=1", "dataset.validation_fraction=0.2", "tokenizer.max_seq_len=64",
        "eval.max_batches=1", "max_steps_per_epoch=2", "epochs=1"]
    with pytest.raises(DataError, match=r"tokenizer.max_seq_len=64 cuts all 2 held-out examples scored \(eval.max_batches=1 x "
                                        r"batch_size=2\) to their prompt \(up to \d+ tokens with BOS\), leaving no response "
                                        r"token to learn from; raise tokenizer.max_seq_len \(or set dataset.train_on_input=true\), "
                                        r"or raise eval.max_batches"):
        finetune.train(load_config("tiny_qlora", overrides))
    assert not (tmp_path / "run" / "epoch_0").exists()
    summary = finetune.train(load_config("tiny_qlora", overrides + ["eval.max_batches=3"]))  # scores some
    assert math.isfinite(summary["val_loss_after"])


def test_a_compiler_that_torch_compile_cannot_use_is_named(tmp_path, monkeypatch, capsys):
    # compile=True on a machine without a working C++ compiler ended in a 34-frame inductor traceback.
    import torch._dynamo.exc

    def no_compiler(cfg):
        raise torch._dynamo.exc.BackendCompilerFailed(
            lambda: None, RuntimeError("No working C++ compiler found in torch._inductor.config.cpp.cxx"), None)

    monkeypatch.setattr(finetune, "train", no_compiler)
    assert finetune.main(["compile=True", f"output_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err.startswith(
        "error: compile=True: torch.compile could not compile the model's layers (RuntimeError: No working C++ compiler found in "
        "torch._inductor.config.cpp.cxx); compile=False trains without it (inductor needs a working C++ compiler on a CPU, Triton "
        "on a GPU). Interrupted (torch.compile failed): there is no checkpoint to resume from in ")
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed):  # without compile=True it is no matter of that key
        finetune.main([f"output_dir={tmp_path / 'run'}"])


def test_adapter_only_and_loss_decreases(tmp_path, tiny_ckpt, small_data):
    out = tmp_path / "run"
    overrides = small_run_overrides(tiny_ckpt, small_data, out) + ["epochs=4", "save_adapter_weights_only=True", "model.lora_rank=16"]
    summary = finetune.train(load_config("tiny_qlora", overrides))
    assert not (out / "epoch_3" / "model.safetensors").exists() and (out / "epoch_3" / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("epoch_")) == ["epoch_0", "epoch_1", "epoch_2", "epoch_3"]
    losses = summary["losses"]
    assert len(losses) == 4 * 5  # 48 examples - 10% held out = 43 -> 10 batches of 4 -> 5 steps; 4 epochs
    assert sum(losses[-4:]) < sum(losses[:4])
    assert summary["val_loss_after"] < summary["val_loss_before"]


def test_validation_loss_is_logged_periodically_and_at_epoch_ends(tmp_path, tiny_ckpt, small_data, monkeypatch, capsys):
    # through every metric logger: the disk log and, here, a stand-in wandb module
    import sys
    import types

    wandb_logged = []
    run = types.SimpleNamespace(log=lambda m, step: wandb_logged.append((step, dict(m))), finish=lambda exit_code: None)
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kwargs: run))
    out = tmp_path / "run"
    overrides = small_run_overrides(tiny_ckpt, small_data, out) + [
        "dataset.validation_fraction=0.25", "eval.every_n_steps=2", "epochs=2", "max_steps_per_epoch=3",
        "eval.before_and_after=True", "save_adapter_weights_only=True", "metric_logger.type=wandb",
    ]
    summary = finetune.train(load_config("tiny_qlora", overrides))
    val = [(r["step"], r["val_loss"]) for r in metrics(out) if "val_loss" in r]
    assert [s for s, _ in val] == [2, 3, 4, 6]  # every 2 steps and at the ends of the 3-step epochs, once each
    assert all(v > 0 for _, v in val) and val[0][1] != val[-1][1]
    assert val == summary["val_losses"] and summary["val_loss_after"] == val[-1][1]
    assert [(s, m["val_loss"]) for s, m in wandb_logged if "val_loss" in m] == val
    assert [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, 7))  # the training records unchanged
    # no validation split: nothing to score, no val_loss
    out2 = tmp_path / "no_split"
    overrides = small_run_overrides(tiny_ckpt, small_data, out2) + [
        "dataset.validation_fraction=0.0", "eval.every_n_steps=1", "epochs=1", "max_steps_per_epoch=2", "save_adapter_weights_only=True",
    ]
    capsys.readouterr()
    assert finetune.train(load_config("tiny_qlora", overrides + ["eval.before_and_after=True"]))["val_losses"] == []
    assert not any("val_loss" in r for r in metrics(out2))
    out = capsys.readouterr().out  # the before/after report it asks for cannot be shown, and says why
    assert ("Note: eval.before_and_after shows the held-out loss and answers and eval.every_n_steps logs the held-out loss, "
            "and there are no held-out examples "
            "(dataset.validation_fraction=0.0); set it above 0 to see them") in out
    # the examples past the steps' windows are named as left out (here max_steps_per_epoch stops early)
    n = len(small_data.read_text().splitlines())
    assert f"held-out examples; 2 steps per epoch of 2 x 4 examples: each epoch trains on 16, and the last {n - 16} of its shuffled order are left out" in out
    # a warmup as long as the run: its peak is never reached, and the run says so
    assert ("note: lr_scheduler.num_warmup_steps=2 is not below the run's 2 optimizer steps: the learning rate never reaches "
            "optimizer.lr=0.01 (the last step runs at 0.005)") in out


def test_accumulated_micro_batches_equal_one_big_batch(tmp_path, tiny_ckpt, small_data):
    # 2 micro-batches of 2 per step vs 1 batch of 4: the loss is normalized by the unmasked tokens
    # of the whole window, so losses and the trained adapter agree (fp32, no shuffle, no dropout).
    def run(batch_size, accumulation, name):
        overrides = small_run_overrides(tiny_ckpt, small_data, tmp_path / name) + [
            f"batch_size={batch_size}", f"gradient_accumulation_steps={accumulation}", "shuffle=False",
            "model.lora_dropout=0.0", "epochs=1", "max_steps_per_epoch=3", "save_adapter_weights_only=True",
        ]
        summary = finetune.train(load_config("tiny_qlora", overrides))
        return summary["losses"], load_file(tmp_path / name / "epoch_0" / "adapter" / "adapter_model.safetensors")

    losses_a, adapter_a = run(2, 2, "accumulated")
    losses_b, adapter_b = run(4, 1, "one_batch")
    assert len(losses_a) == 3 and losses_a == pytest.approx(losses_b, rel=1e-5)
    for name in adapter_a:
        torch.testing.assert_close(adapter_a[name], adapter_b[name], rtol=1e-4, atol=1e-6)


def test_gradient_clipping_is_applied_and_logged(tmp_path, tiny_ckpt, small_data, monkeypatch):
    real_clip = torch.nn.utils.clip_grad_norm_
    seen = []

    def spy(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        before = real_clip(parameters, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters])).item()
        seen.append((before.item(), after))
        return before

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    overrides = small_run_overrides(tiny_ckpt, small_data, tmp_path / "run") + ["clip_grad_norm=1e-3", "epochs=1", "max_steps_per_epoch=2"]
    finetune.train(load_config("tiny_qlora", overrides))
    assert len(seen) == 2
    for (before, after), record in zip(seen, [r for r in metrics(tmp_path / "run") if "loss" in r], strict=True):
        assert before > 1e-3 and after <= 1e-3 * (1 + 1e-4)  # clipped to the limit
        assert record["grad_norm"] == pytest.approx(before)  # the logged norm is the one before clipping


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_ckpt, small_data, monkeypatch, capsys):
    out = tmp_path / "run"
    overrides = small_run_overrides(tiny_ckpt, small_data, out) + ["save_every_n_steps=2", "max_steps_per_epoch=4", "eval.before_and_after=False",
                                                                   "clip_grad_norm=null"]
    real, calls = steps.token_loss_sum, {"n": 0}

    def poisoned(outputs, labels, output_weight=None):
        calls["n"] += 1
        loss = real(outputs, labels, output_weight)
        return loss * float("nan") if calls["n"] == 7 else loss  # micro-batch 7 = optimizer step 4

    monkeypatch.setattr(steps, "token_loss_sum", poisoned)
    rc = finetune.main(["--config", "tiny_qlora", *overrides])
    err = capsys.readouterr().err
    assert rc == 1
    assert "loss is nan at epoch 1, step 4" in err and f"the last good checkpoint is {out / 'step_2'}" in err
    assert "resume_from_checkpoint=True and a lower optimizer.lr or a clip_grad_norm" in err
    state = torch.load(out / "recipe_state.pt", weights_only=True)
    assert state["checkpoint_name"] == "step_2" and state["global_step"] == 2
    assert (out / "step_2" / "adapter" / "adapter_model.safetensors").is_file()
    # the advice works: the resume with a lower lr and clipping is accepted and finishes the epoch
    monkeypatch.undo()
    resume = ["resume_from_checkpoint=True", "optimizer.lr=1e-3", "clip_grad_norm=0.5", "epochs=1"]
    assert finetune.main(["--config", "tiny_qlora", *overrides, *resume]) == 0
    assert "optimizer.lr 0.01 -> 0.001" in capsys.readouterr().out
    lrs = [r["lr"] for r in metrics(out) if "loss" in r]
    assert len(lrs) == 4 and lrs[2:] == pytest.approx([1e-3 * cosine_with_warmup(s, num_warmup_steps=2, num_training_steps=4) for s in (2, 3)])


def test_a_non_finite_gradient_norm_stops_as_a_non_finite_loss_does(tmp_path, tiny_ckpt, small_data, monkeypatch, capsys):
    # Clipping by an infinite norm zeroes the gradients (a NaN one poisons them): the run stops
    # before applying the step, as for a NaN loss, instead of logging grad_norm Infinity and going on.
    out = tmp_path / "run"
    overrides = small_run_overrides(tiny_ckpt, small_data, out) + ["save_every_n_steps=2", "max_steps_per_epoch=4",
                                                                   "eval.before_and_after=False", "clip_grad_norm=1.0"]
    real, calls = torch.nn.utils.clip_grad_norm_, {"n": 0}

    def overflowing(parameters, max_norm, *args, **kwargs):
        calls["n"] += 1
        norm = real(parameters, max_norm, *args, **kwargs)
        return norm * float("inf") if calls["n"] == 3 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", overflowing)
    assert finetune.main(["--config", "tiny_qlora", *overrides]) == 1
    err = capsys.readouterr().err
    assert "the adapters' gradient norm is inf at epoch 1, step 3 (loss " in err and f"the last good checkpoint is {out / 'step_2'}" in err
    assert torch.load(out / "recipe_state.pt", weights_only=True)["global_step"] == 2
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2]


def test_a_nan_gradient_stops_the_run_without_clipping(tmp_path, tiny_ckpt, small_data, monkeypatch, capsys):
    # clip_grad_norm=null (the 7B configs' default): a finite loss with a NaN gradient (0 * sqrt(0)'s
    # derivative) was applied and saved as NaN adapters, exit 0.
    out = tmp_path / "run"
    overrides = small_run_overrides(tiny_ckpt, small_data, out) + ["save_every_n_steps=2", "max_steps_per_epoch=4",
                                                                   "eval.before_and_after=False", "clip_grad_norm=null"]
    real, calls = steps.token_loss_sum, {"n": 0}

    def nan_gradient(outputs, labels, output_weight=None):
        calls["n"] += 1
        loss = real(outputs, labels, output_weight)
        return loss + 0 * torch.sqrt(0 * loss) if calls["n"] == 5 else loss  # micro-batch 5 = optimizer step 3

    monkeypatch.setattr(steps, "token_loss_sum", nan_gradient)
    assert finetune.main(["--config", "tiny_qlora", *overrides]) == 1
    err = capsys.readouterr().err
    assert "error: an adapter's gradient holds nan at epoch 1, step 3 (loss " in err
    assert f"the last good checkpoint is {out / 'step_2'}" in err and "a lower optimizer.lr or a clip_grad_norm" in err
    assert torch.load(out / "recipe_state.pt", weights_only=True)["global_step"] == 2
    assert not (out / "step_4").exists() and not (out / "epoch_0").exists()


def test_an_update_that_makes_the_adapters_non_finite_is_not_saved(tmp_path, tiny_ckpt, small_data, capsys):
    # Finite loss and gradients, but AdamW's decoupled weight decay (lr x 1e45 > float32's range)
    # makes lora_a infinite at the first update; it was found only by the next step's loss (or, at
    # an epoch's end, saved).
    out = tmp_path / "run"
    overrides = small_run_overrides(tiny_ckpt, small_data, out) + ["max_steps_per_epoch=4", "eval.before_and_after=False",
                                                                   "optimizer.weight_decay=1e45", "clip_grad_norm=1.0"]
    assert finetune.main(["--config", "tiny_qlora", *overrides]) == 1
    err = capsys.readouterr().err
    assert re.search(r"error: the update of epoch 1, step \d \(loss [0-9.]+, finite gradients\) made an adapter weight (inf|nan): "
                     r"training stopped before saving it; no checkpoint was saved yet. Rerun with a lower optimizer.lr, or fix "
                     r"the data", err), err  # (clip_grad_norm is set: not advised again)
    assert not (out / "epoch_0").exists()


def test_a_non_finite_held_out_loss_stops_before_the_save(tmp_path, tiny_ckpt, small_data, capsys):
    # lr=1e10 leaves the adapters finite (up to about 1e17) and the training loss finite, but the
    # model's held-out outputs NaN: the epoch's checkpoint was saved and the run exited 0.
    out = tmp_path / "run"
    overrides = small_run_overrides(tiny_ckpt, small_data, out) + ["max_steps_per_epoch=3", "epochs=1", "optimizer.lr=1e10",
                                                                   "dataset.validation_fraction=0.1", "eval.before_and_after=False"]
    assert finetune.main(["--config", "tiny_qlora", *overrides]) == 1
    err = capsys.readouterr().err
    assert "error: the held-out loss is nan at epoch 1, step 3: the adapters make the model's outputs non-finite; training " \
           "stopped before saving them; no checkpoint was saved yet." in err
    assert not (out / "epoch_0").exists()
    assert all(math.isfinite(value) for record in metrics(out) for value in record.values())  # (valid JSON: no NaN)


def test_non_finite_logits_after_training_are_an_error_line(tmp_path, tiny_ckpt, small_data, monkeypatch, capsys):
    # The samples answered after training are the last look at the model: non-finite logits there
    # (not scored by a held-out loss) gave generate's ValueError traceback.
    out = tmp_path / "run"
    overrides = small_run_overrides(tiny_ckpt, small_data, out) + ["max_steps_per_epoch=1", "epochs=1", "eval.num_samples=1",
                                                                   "eval.max_new_tokens=2", "dataset.validation_fraction=0.1"]
    real, calls = evaluation.answer, {"n": 0}

    def nan_after_training(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise NonFiniteLogitsError("generate: the model's logits for new token 1 hold NaN or infinity")
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "answer", nan_after_training)
    assert finetune.main(["--config", "tiny_qlora", *overrides]) == 1
    err = capsys.readouterr().err
    assert f"error: after training, the model's logits for a held-out example's answer hold NaN or infinity: the adapters saved " \
           f"in {out / 'epoch_0'} make its outputs non-finite; rerun with a lower optimizer.lr\n" in err
    assert "Traceback" not in err


def test_a_base_whose_outputs_are_non_finite_is_named_before_training(tmp_path, tiny_ckpt, small_data, capsys):
    # The before-training held-out loss printed nan and training went on, to a first-step NaN
    # loss advised away with a lower learning rate (the adapters start as the identity).
    import shutil

    from safetensors.torch import save_file

    base = tmp_path / "base"
    shutil.copytree(tiny_ckpt, base)
    weights = load_file(base / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], 3e38)  # finite, overflowing
    save_file(weights, base / "model.safetensors")
    args = small_run_overrides(base, small_data, tmp_path / "run") + ["epochs=1", "max_steps_per_epoch=1"]
    for extra, what in ((["dataset.validation_fraction=0.1"], r"the held-out loss is nan before training"),
                        (["dataset.validation_fraction=0"], r"the loss is nan at step 1, before any update")):
        assert finetune.main(["--config", "tiny_qlora", *args, *extra]) == 1
        err = capsys.readouterr().err
        assert re.search(rf"error: {what} \(the adapters start as the identity\): the base model's outputs are "
                         rf"non-finite, which no learning rate changes; check the weights in {re.escape(str(base))}\n", err), err


def test_a_gradient_that_overflows_at_the_first_update_names_the_adapters_scale(tmp_path, tiny_ckpt, small_data, capsys):
    # A finite loss with an infinite gradient norm (alpha 1e30) was blamed on the base's outputs.
    args = small_run_overrides(tiny_ckpt, small_data, tmp_path / "run") + ["epochs=1", "max_steps_per_epoch=1", "model.lora_alpha=1e30",
                                                                            "clip_grad_norm=1.0", "dataset.validation_fraction=0"]
    assert finetune.main(["--config", "tiny_qlora", *args]) == 1
    err = capsys.readouterr().err
    assert re.search(r"error: the adapters' gradient norm is inf \(loss [0-9.]+\) at step 1, before any update: the backward "
                     r"overflows, which no learning rate changes; the adapters' scale model.lora_alpha / model.lora_rank = "
                     r"[0-9.e+]+ multiplies their gradients: a lower model.lora_alpha shrinks it, and where it is small the base's "
                     r"weights in .* make it\n", err), err


def test_compile_has_no_graph_breaks(tmp_path, tiny_ckpt, small_data, monkeypatch):
    """compile=True compiles each layer with fullgraph=True (a graph break is an error), and the
    before/after evaluation still runs (eagerly); the cheap aot_eager backend stands in for
    inductor to keep the test fast."""
    real_compile, used = torch.compile, {}

    def compile_aot_eager(model, **kwargs):
        used.update(kwargs)
        return real_compile(model, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    torch._dynamo.reset()
    counters.clear()
    out = tmp_path / "run"
    overrides = small_run_overrides(tiny_ckpt, small_data, out) + [
        "compile=True", "max_steps_per_epoch=2", "epochs=1", "enable_activation_checkpointing=True",
        "dataset.validation_fraction=0.25", "eval.num_samples=1", "eval.max_new_tokens=3",
    ]
    summary = finetune.train(load_config("tiny_qlora", overrides))
    assert used.get("fullgraph") is True and len(summary["losses"]) == 2
    assert "val_loss_after" in summary and len(summary["answers_after"]) == 1
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    torch._dynamo.reset()


def test_a_dataset_with_other_column_names_trains(tmp_path, tiny_ckpt, small_data):
    # dataset.column_map (torchtune's): the same run as with Alpaca names
    dolly = tmp_path / "dolly.jsonl"
    rows = [json.loads(line) for line in small_data.read_text().splitlines()]
    dolly.write_text("".join(json.dumps({"instruction": r["instruction"], "context": r.get("input"), "response": r["output"]}) + "\n"
                             for r in rows))
    runs = []
    for data, extra in ((small_data, []), (dolly, ["dataset.column_map.input=context", "dataset.column_map.output=response"])):
        overrides = small_run_overrides(tiny_ckpt, data, tmp_path / f"run{len(runs)}") + [
            "max_steps_per_epoch=2", "epochs=1", "eval.before_and_after=False", *extra]
        runs.append(finetune.train(load_config("tiny_qlora", overrides))["losses"])
    assert runs[0] == runs[1]


def test_compiled_runs_with_other_ranks_in_one_process(tmp_path, tiny_ckpt, small_data, monkeypatch):
    # torch keeps a function's graphs for the whole process, up to its recompile limit (8): each run
    # with another rank added its own, and under fullgraph=True the 4th run failed with torch's
    # FailOnRecompileLimitHit. Here the limit is 5, so that the second run would meet it.
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend="aot_eager", **kw))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=5):  # (monkeypatch's undo would delete the setting: hidden)
        for rank in (8, 4):
            out = tmp_path / f"rank{rank}"
            overrides = small_run_overrides(tiny_ckpt, small_data, out) + [
                "compile=True", "max_steps_per_epoch=2", "epochs=1", "eval.before_and_after=False", f"model.lora_rank={rank}",
                "batch_size=1", "gradient_accumulation_steps=1",  # (examples of several lengths: the dynamic graphs too)
            ]
            assert len(finetune.train(load_config("tiny_qlora", overrides))["losses"]) == 2
    torch._dynamo.reset()
    assert torch._dynamo.config.recompile_limit == 8


def test_a_stopped_run_closes_its_loggers(tmp_path, tiny_ckpt, small_data, monkeypatch):
    # A run stopped by an error or Ctrl-C (in a notebook, a sweep) left its TensorBoard writer
    # thread running and its W&B run unfinished; the disk log's file open until collected.
    closed = []

    class Recorded(finetune.MetricLoggers):
        def close(self, failed=False):
            closed.append(failed)
            super().close(failed)

    monkeypatch.setattr(finetune, "MetricLoggers", Recorded)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune.steps, "validation_loss", interrupted)
    out = tmp_path / "run"
    overrides = small_run_overrides(tiny_ckpt, small_data, out) + [
        "max_steps_per_epoch=2", "epochs=1", "eval.before_and_after=False", "dataset.validation_fraction=0.25",
        "metric_logger.type=tensorboard",
    ]
    threads = threading.active_count()
    with pytest.raises(KeyboardInterrupt):
        finetune.train(load_config("tiny_qlora", overrides))
    assert closed == [True] and threading.active_count() == threads  # (the writer's thread ended)
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2]  # what was logged is kept
    # a run that fails before logging leaves an earlier run's log as it was
    before = (out / "logs" / "metrics.jsonl").read_bytes()
    closed.clear()
    assert finetune.main([*overrides, "dataset.data_files=/nonexistent.jsonl"]) == 2
    assert closed == [True] and (out / "logs" / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize(
    "args, needle",
    [
        (["model.lora_rnk=3"], "did you mean 'model.lora_rank'"),
        # the seed's command with only `tune` replaced: the recipe name was "must have the form key=value"
        (["run", "lora_finetune_single_device", "--config", "llama2/7B_qlora_single_device"],
         "'run' is a word of torchtune's command line: python -m qlora_ext.finetune stands for `tune run RECIPE` as a whole"),
        (["lora_finetune_single_device", "--config", "llama2/7B_qlora_single_device"],
         "'lora_finetune_single_device' is a word of torchtune's command line"),
        (["model.foo_distributed"], "override 'model.foo_distributed': must have the form key=value"),  # (a key, not a recipe)
        (["--config", "nope"], "bundled configs:"),
        (["dataset.data_files=/nonexistent.jsonl"], "dataset.data_files: '/nonexistent.jsonl' is not a file"),
        (["checkpointer.checkpoint_dir=/nonexistent"], "checkpointer.checkpoint_dir: '/nonexistent' is not a folder"),
        (["checkpointer.checkpoint_files=[model-1.safetensors]"], "checkpoint_files ['model-1.safetensors'] are not files in"),
        (["tokenizer.path=/nonexistent.model"], "tokenizer.path: '/nonexistent.model' is not a file"),
        (["resume_from_checkpoint=True", "output_dir=/tmp/qlora_ext_test_no_such_run"], "resume_from_checkpoint=true: there is no"),
        # sizes that allocated before any check failed (a 768 GB adapter, an 8 TB RoPE table, threads)
        (["model.lora_rank=100000"], "model.lora_rank must be at most the smaller side of every adapted linear"),
        (["model.lora_rank=1000000000"], "config key 'model.lora_rank' must be <= 16777216"),
        # an empty list of weight files was named by the loader's argument, after the data was read
        (["checkpointer.checkpoint_files=[]"], "config key 'checkpointer.checkpoint_files' must name at least one file, or be null"),
        (["model.builder=qlora_llama2", "model.max_seq_len=1000000000000"], "config key 'model.max_seq_len'"),
        (["num_threads=1000000000"], "config key 'num_threads'"),
    ],
)
def test_cli_errors_name_the_key(args, needle, capsys, tmp_path):
    if not any(a.startswith("output_dir=") for a in args):
        args = [*args, f"output_dir={tmp_path / 'run'}"]
    assert finetune.main(args) == 2
    assert needle in capsys.readouterr().err


def test_unreadable_inputs_are_named(capsys, tmp_path):
    binary = tmp_path / "binary.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    cases = [
        ([f"dataset.data_files={binary}"], "dataset.data_files: '" + str(binary) + "' cannot be read as UTF-8 JSON text"),
        ([f"tokenizer.path={binary}"], f"tokenizer.path: Llama2Tokenizer: argument 'path' must be a readable SentencePiece model file; '{binary}' is not"),
        ([f"output_dir={binary}"], f"output_dir: '{binary}' must be a folder this user can create or write to: '{binary}' exists "
                                   "and is not a folder"),
        ([f"output_dir={binary / 'run'}"], f"output_dir: '{binary / 'run'}' must be a folder this user can create or write to: "
                                           f"'{binary}' exists and is not a folder"),
        ([f"metric_logger.log_dir={binary}"], f"metric_logger.log_dir: '{binary}' must be a folder this user can create or write "
                                              f"to: '{binary}' exists and is not a folder"),
        (["--config", str(binary)], f"--config: {binary} cannot be read as UTF-8 YAML text"),
    ]
    long_name = tmp_path / ("x" * 300) / "run"  # a name the file system refuses: its own error, no traceback
    cases.append(([f"output_dir={long_name}"], f"output_dir: '{long_name}' must be a folder this user can create or write to: "
                                              "[Errno 36] File name too long"))
    dangling = tmp_path / "gone"  # a symbolic link whose target was removed: mkdir alone says "File exists"
    dangling.symlink_to(tmp_path / "removed")
    for args in ([f"output_dir={dangling}"], [f"output_dir={dangling / 'run'}"], [f"metric_logger.log_dir={dangling}"]):
        cases.append((args, f"'{dangling}' is a symbolic link to '{tmp_path / 'removed'}', which does not exist"))
    import gzip

    packed = tmp_path / "alpaca.json.gz"  # cut short (a gzip'd file that is whole is read)
    packed.write_bytes(gzip.compress(b'[{"instruction": "a", "input": "", "output": "b"}]')[:20])
    cases.append(([f"dataset.data_files={packed}"], f"dataset.data_files: '{packed}' is gzip-compressed but cannot be decompressed"))
    for args, needle in cases:
        if not any(a.startswith("output_dir=") for a in args):
            args = [*args, f"output_dir={tmp_path / 'run'}"]
        assert finetune.main(args) == 2, args
        assert needle in capsys.readouterr().err, args


def test_read_only_folders_are_found_at_setup(capsys, tmp_path, monkeypatch):
    # An existing folder that cannot be written (a read-only mount; root ignores chmod, so the
    # failure is simulated): named at setup, not a traceback after the model is built and trained.
    from qlora_ext.training import metric_logging

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(finetune.tempfile, "TemporaryFile", read_only)
    assert finetune.main([f"output_dir={tmp_path}"]) == 2
    assert f"output_dir: '{tmp_path}' must be a folder this user can create or write to: [Errno 30] Read-only" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(metric_logging, "open", read_only, raising=False)
    assert finetune.main([f"output_dir={tmp_path}", f"metric_logger.log_dir={tmp_path / 'logs'}"]) == 2
    assert f"metric_logger.log_dir: '{tmp_path / 'logs'}' must be a folder this user can create or write to" in capsys.readouterr().err
    assert finetune.main([f"output_dir={tmp_path}"]) == 2  # log_dir unset: the logs go to output_dir/logs, named so
    assert (f"output_dir (its logs/ folder, where metric_logger.log_dir=null puts the logs): '{tmp_path / 'logs'}' must be a folder "
            "this user can create or write to") in capsys.readouterr().err


def test_a_run_that_fails_in_setup_leaves_the_earlier_runs_log(tmp_path, tiny_ckpt, small_data, capsys):
    out = tmp_path / "run"
    overrides = small_run_overrides(tiny_ckpt, small_data, out) + ["max_steps_per_epoch=2", "epochs=1", "eval.before_and_after=False"]
    finetune.train(load_config("tiny_qlora", overrides))
    before = {name: (out / name).read_bytes() for name in ("logs/metrics.jsonl", "config.yaml")}
    assert sum("loss" in r for r in metrics(out)) == 2
    assert finetune.main([*overrides, "dataset.data_files=/nonexistent.jsonl", "optimizer.lr=0.5"]) == 2
    assert "dataset.data_files: '/nonexistent.jsonl' is not a file" in capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in before} == before


def test_a_metric_logger_that_cannot_start_stops_the_cli_at_setup_and_leaves_the_earlier_run(tmp_path, tiny_ckpt, small_data, monkeypatch, capsys):
    # tensorboard or wandb not installed, or wandb.init failing (no login): exit 2 with the fix,
    # before the model is built; the earlier run's log and config stay, and the folders' locks are
    # released (the next run starts).
    import builtins
    import sys
    import types

    out = tmp_path / "run"
    overrides = small_run_overrides(tiny_ckpt, small_data, out) + ["max_steps_per_epoch=1", "epochs=1", "eval.before_and_after=False",
                                                                   "metric_logger.plot_loss_curve=false"]
    assert finetune.main(overrides) == 0
    before = {name: (out / name).read_bytes() for name in ("logs/metrics.jsonl", "config.yaml")}
    real_import = builtins.__import__

    def without(package):
        def importing(name, *args, **kwargs):
            if name.split(".")[0] == package or name == "torch.utils.tensorboard":
                raise ModuleNotFoundError(f"No module named '{name}'", name=name)
            return real_import(name, *args, **kwargs)
        return importing

    class UsageError(Exception):
        pass

    def failing_init(**kwargs):
        raise UsageError("api_key not configured (no-tty).")

    cases = [
        ("tensorboard", lambda: monkeypatch.setattr(builtins, "__import__", without("tensorboard")),
         "error: metric_logger.type=tensorboard needs the tensorboard package: pip install tensorboard (or pip install "
         "'qlora_ext[tensorboard]'), or use metric_logger.type=disk\n"),
        ("wandb", lambda: monkeypatch.setattr(builtins, "__import__", without("wandb")),
         "error: metric_logger.type=wandb needs the wandb package: pip install wandb (or pip install 'qlora_ext[wandb]'), "
         "or use metric_logger.type=disk\n"),
        ("wandb", lambda: monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=failing_init)),
         "error: metric_logger.type=wandb: wandb.init(project='qlora_ext') failed: UsageError: api_key not configured (no-tty). "
         "Run `wandb login` first, or set WANDB_MODE=offline, or use metric_logger.type=disk\n"),
    ]
    for kind, absent, message in cases:
        absent()
        if kind == "wandb" and message.startswith("error: metric_logger.type=wandb needs"):
            monkeypatch.delitem(sys.modules, "wandb", raising=False)
        capsys.readouterr()
        assert finetune.main([*overrides, f"metric_logger.type={kind}", "optimizer.lr=0.5"]) == 2, message
        captured = capsys.readouterr()
        assert captured.err == message and "Model:" not in captured.out
        assert {name: (out / name).read_bytes() for name in before} == before
        monkeypatch.undo()
    assert finetune.main(overrides) == 0  # nothing left locked


def test_the_configs_notes_are_printed_before_an_error_stops_the_run(tmp_path, capsys):
    assert finetune.main([f"output_dir={tmp_path / 'run'}", "model.lora_alpha=0", "dataset.data_files=/nonexistent.jsonl"]) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith("note: model.lora_alpha=0 scales every adapter's output by 0")
    assert "error: dataset.data_files: '/nonexistent.jsonl' is not a file" in captured.err


def test_ctrl_c_before_the_config_or_beside_a_damaged_state_says_there_is_nothing_to_resume(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune, "load_config", interrupted)
    assert finetune.main([f"output_dir={tmp_path / 'run'}"]) == 130
    assert capsys.readouterr().err == "\nInterrupted (Ctrl-C) before the config was read.\n"
    monkeypatch.undo()
    # a training state that cannot be read offers no resume; the file is left as it was
    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe_state.pt").write_bytes(b"not a training state")
    monkeypatch.setattr(finetune, "load_alpaca_records", interrupted)
    assert finetune.main([f"output_dir={out}"]) == 130
    assert capsys.readouterr().err.endswith(
        f"\nInterrupted (Ctrl-C): there is no checkpoint to resume from in {out}; run again to start over.\n")
    assert (out / "recipe_state.pt").read_bytes() == b"not a training state"


def test_the_cli_in_a_worker_thread_keeps_the_process_signal_handlers(tmp_path, monkeypatch):
    # A sweep or a notebook's worker thread: signal handlers can only be set from the main thread
    # (signal.signal raises there); errors and Ctrl-C still end as exit codes with their lines.
    import contextlib
    import io
    import signal
    import sys

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    results = {}

    def work(key, args):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            results[key] = (finetune.main(args), err.getvalue())

    handler, stdout = signal.getsignal(signal.SIGTERM), sys.stdout
    for key, args in (("usage", ["--config", "nope", f"output_dir={tmp_path / 'run'}"]), ("ctrl-c", [f"output_dir={tmp_path / 'run'}"])):
        if key == "ctrl-c":
            monkeypatch.setattr(finetune, "load_config", interrupted)
        worker = threading.Thread(target=work, args=(key, args))
        worker.start()
        worker.join()
    assert results["usage"][0] == 2 and "'nope' is neither a file nor a bundled config" in results["usage"][1]
    assert results["ctrl-c"] == (130, "\nInterrupted (Ctrl-C) before the config was read.\n")
    assert signal.getsignal(signal.SIGTERM) is handler and sys.stdout is stdout


def test_a_run_config_that_cannot_be_written_is_named(tmp_path, tiny_ckpt, small_data, monkeypatch, capsys):
    # A full disk's error names no file: the closing line names config.yaml, and what the run leaves.
    import errno

    real = finetune.atomic_write_text

    def full(path, text):
        if Path(path).name == "config.yaml":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, text)

    monkeypatch.setattr(finetune, "atomic_write_text", full)
    out = tmp_path / "run"
    args = small_run_overrides(tiny_ckpt, small_data, out) + ["max_steps_per_epoch=1", "epochs=1", "eval.before_and_after=False"]
    assert finetune.main(args) == 1
    err = capsys.readouterr().err
    assert (f"error: Stopped (a write failed: OSError: [Errno 28] No space left on device (writing the run's config): "
            f"'{out / 'config.yaml'}'): there is no checkpoint to resume from in {out}; run again to start over.\n") in err
    assert "Traceback" not in err and not (out / "config.yaml").exists() and not (out / "epoch_0").exists()


def test_non_finite_logits_before_training_are_named_as_the_bases(tmp_path, tiny_ckpt, small_data, monkeypatch, capsys):
    # The answers shown before training come from the base alone: non-finite logits there are the base's doing.
    def nan_logits(*args, **kwargs):
        raise NonFiniteLogitsError("generate: the model's logits for new token 1 hold NaN or infinity")

    monkeypatch.setattr(evaluation, "answer", nan_logits)
    out = tmp_path / "run"
    args = small_run_overrides(tiny_ckpt, small_data, out) + ["max_steps_per_epoch=1", "epochs=1", "eval.num_samples=1",
                                                              "eval.max_new_tokens=2", "dataset.validation_fraction=0.1"]
    assert finetune.main(args) == 1
    err = capsys.readouterr().err
    assert (f"error: the logits of a held-out example's answer hold NaN or infinity before training (the adapters start as the "
            f"identity): the base model's outputs are non-finite, which no learning rate changes; check the weights in {tiny_ckpt}\n") in err
    assert "Traceback" not in err and not (out / "epoch_0").exists()


def test_a_run_of_many_steps_with_no_token_to_learn_from_names_only_the_first_three(tmp_path, tiny_ckpt, capsys):
    # (log_peak_memory_stats=false: no memory statistics are logged or printed)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [_CUT_TO_PROMPT] * 5 + [_SHORT]))
    overrides = small_run_overrides(tiny_ckpt, data, tmp_path / "run") + [
        "batch_size=1", "gradient_accumulation_steps=1", "shuffle=false", "dataset.validation_fraction=0", "epochs=1",
        "tokenizer.max_seq_len=64", "save_adapter_weights_only=true", "metric_logger.plot_loss_curve=false",
        "log_peak_memory_stats=false"]
    summary = finetune.train(load_config("tiny_qlora", overrides))
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "leaving no token to learn from: the adapters are not updated" in line]
    assert [line.split(":")[0] for line in lines] == ["Step 1", "Step 2", "Step 3"]
    assert lines[2].endswith("; further such steps are skipped without a line") and not lines[1].endswith("without a line")
    assert summary["loss_steps"] == [6]
    logged = metrics(tmp_path / "run")
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert not any(key.endswith("memory") for r in logged for key in r) and "Memory Stats" not in out


def test_a_run_whose_logged_steps_have_no_loss_draws_no_curve(tmp_path, tiny_ckpt, capsys):
    # Only the last step is logged (log_every_n_steps past it), and it kept no token: no loss to draw.
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [_SHORT, _CUT_TO_PROMPT]))
    overrides = small_run_overrides(tiny_ckpt, data, tmp_path / "run") + [
        "batch_size=1", "gradient_accumulation_steps=1", "shuffle=false", "dataset.validation_fraction=0", "epochs=1",
        "tokenizer.max_seq_len=64", "save_adapter_weights_only=true", "log_every_n_steps=5"]
    summary = finetune.train(load_config("tiny_qlora", overrides))
    logged = metrics(tmp_path / "run")
    assert [r["step"] for r in logged] == [2] and "loss" not in logged[0]
    assert summary["loss_curve"] is None and not (tmp_path / "run" / "loss_curve.png").exists()
    assert summary["losses"] and (tmp_path / "run" / "epoch_0").is_dir()


def test_a_path_the_file_system_encoding_cannot_hold_is_named_in_process(tmp_path, capsys):
    # (a lone surrogate: no encoding holds it, whatever the locale; from a notebook's main(argv))
    name = tmp_path / "run\ud800"
    assert finetune.main([f"output_dir={name}"]) == 2
    err = capsys.readouterr().err
    assert f"error: output_dir: {str(name)!r} cannot be a file name in this system's encoding" in err
    assert "run with PYTHONUTF8=1 or under a UTF-8 locale" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_list_configs(capsys):
    assert finetune.main(["--list-configs"]) == 0
    assert "llama2_7b_qlora_single_device" in capsys.readouterr().out


def test_checkpoint_folder_loads_in_transformers_and_peft(tmp_path, tiny_ckpt, small_data):
    """transformers' from_pretrained of a checkpoint folder gives the fine-tuned model once: the
    folder holds the merged weights and keeps the adapter in adapter/, where from_pretrained does
    not apply it a second time; PEFT puts that adapter on the base to the same model."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from qlora_ext.models.llama2 import llama2_from_checkpoint

    out = tmp_path / "run"
    # a dense base (LoRA, not QLoRA), so that the merged weights are the base's plus the adapter's
    overrides = small_run_overrides(tiny_ckpt, small_data, out) + ["model.builder=lora_llama2", "epochs=1", "max_steps_per_epoch=2",
                                                                   "optimizer.lr=0.05"]
    finetune.train(load_config("tiny_qlora", overrides))
    ckpt = out / "epoch_0"
    tokens = torch.randint(0, 1024, (2, 11))
    with torch.no_grad():
        want = llama2_from_checkpoint(tiny_ckpt, adapter_dir=ckpt / "adapter").eval()(tokens)
        base = llama2_from_checkpoint(tiny_ckpt).eval()(tokens)
        merged = transformers.LlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
        assert not any("lora" in name for name, _ in merged.named_parameters())
        got = merged(tokens).logits
        peft_model = peft.PeftModel.from_pretrained(
            transformers.LlamaForCausalLM.from_pretrained(tiny_ckpt, torch_dtype=torch.float32), ckpt / "adapter"
        ).eval()
        via_peft = peft_model(tokens).logits
    assert (want - base).abs().max() > 1e-2  # the training changed the model
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)  # the adapter applied once (twice was off by about half the logits)
    assert torch.allclose(via_peft, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("declared", [None, ["bfloat16"]], ids=["absent", "not_a_name"])
def test_merged_model_keeps_the_stored_dtype_of_a_base_that_declares_none(tmp_path, small_data, declared):
    """A base whose config.json names no dtype (or a Meta one, which has no config.json) is saved
    merged in the dtype its weights are stored in, not in the float32 the CPU run computed in.
    A torch_dtype that is not a name (a hand-edited list) is taken as none: the save had raised
    TypeError after training, nothing saved."""
    from safetensors import safe_open

    from qlora_ext.checkpoint import save_hf_checkpoint
    from qlora_ext.checkpoint.load import stored_dtype
    from qlora_ext.models.llama2 import llama2
    from trainer_helpers import TINY_ARCH

    base = tmp_path / "base"
    torch.manual_seed(0)
    save_hf_checkpoint(llama2(**TINY_ARCH), base, dtype=torch.bfloat16)
    config = json.loads((base / "config.json").read_text())
    for key in ("torch_dtype", "dtype"):
        config.pop(key, None)
    if declared is not None:
        config["torch_dtype"] = declared
    (base / "config.json").write_text(json.dumps(config))
    assert stored_dtype(base) == torch.bfloat16
    out = tmp_path / "run"
    finetune.train(load_config("tiny_qlora", small_run_overrides(base, small_data, out) + ["epochs=1", "max_steps_per_epoch=1"]))
    with safe_open(out / "epoch_0" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((out / "epoch_0" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # Weights under a name of the user's, given as checkpointer.checkpoint_files: found for the dtype
    # too (the save had looked for the standard names and failed after training).
    (base / "model.safetensors").rename(base / "weights.safetensors")
    assert stored_dtype(base, ["weights.safetensors"]) == torch.bfloat16
    out = tmp_path / "named"
    finetune.train(load_config("tiny_qlora", small_run_overrides(base, small_data, out)
                               + ["epochs=1", "max_steps_per_epoch=1", "checkpointer.checkpoint_files=[weights.safetensors]"]))
    with safe_open(out / "epoch_0" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_a_float64_base_trains_and_saves_in_float64(tmp_path, small_data):
    """A base stored in float64 (config.json says so) loads, trains and saves its merged model in
    float64 (a save that took only float32/bf16/fp16 had failed after training, nothing saved)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    base = write_tiny_hf_checkpoint(tmp_path / "base")
    save_file({k: v.double() for k, v in load_file(base / "model.safetensors").items()}, base / "model.safetensors",
              metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "torch_dtype": "float64"}))
    out = tmp_path / "run"
    finetune.train(load_config("tiny_qlora", small_run_overrides(base, small_data, out) + ["epochs=1", "max_steps_per_epoch=1"]))
    with safe_open(out / "epoch_0" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F64"}
    assert (out / "recipe_state.pt").is_file()


def test_the_adapter_records_its_base_as_an_absolute_path(tmp_path, tiny_ckpt, small_data, monkeypatch):
    """checkpointer.checkpoint_dir given relative to the working directory: the saved
    adapter_config.json names the base absolutely, so PEFT's AutoPeftModelForCausalLM finds it
    from anywhere (a relative name would be taken for a Hub repository)."""
    out = tmp_path / "run"
    monkeypatch.chdir(tiny_ckpt.parent)
    overrides = small_run_overrides(tiny_ckpt, small_data, out) + [
        f"checkpointer.checkpoint_dir={tiny_ckpt.name}", "epochs=1", "max_steps_per_epoch=1", "save_adapter_weights_only=True"]
    finetune.train(load_config("tiny_qlora", overrides))
    config = json.loads((out / "epoch_0" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_ckpt) and tiny_ckpt.is_absolute()
    peft = pytest.importorskip("peft")
    monkeypatch.chdir(tmp_path)
    model = peft.AutoPeftModelForCausalLM.from_pretrained(out / "epoch_0" / "adapter")
    assert type(model).__name__ == "PeftModelForCausalLM"


def test_a_merged_save_of_a_meta_base_keeps_its_context_length(tmp_path):
    # A Meta base records no context length (4096 read for Llama-2): a shorter model.max_seq_len
    # caps the run's sequences, not the saved model's max_position_embeddings.
    from qlora_ext.checkpoint import save_meta_checkpoint
    from qlora_ext.models.llama2 import llama2_from_checkpoint

    save_meta_checkpoint(llama2_from_checkpoint(write_tiny_hf_checkpoint(tmp_path / "hf")), tmp_path / "meta")
    data = write_small_dataset(tmp_path / "data.jsonl")
    finetune.train(load_config("tiny_qlora", small_run_overrides(tmp_path / "meta", data, tmp_path / "out") + [
        "epochs=1", "max_steps_per_epoch=1", "model.max_seq_len=128", "eval.before_and_after=False"]))
    assert json.loads((tmp_path / "out" / "epoch_0" / "config.json").read_text())["max_position_embeddings"] == 4096


def test_a_dashed_override_is_told_to_drop_the_dashes(capsys):
    # torchtune users write --key=value out of habit; argparse said only "unrecognized arguments"
    with pytest.raises(SystemExit) as exit_:
        finetune.main(["--optimizer.lr=3e-4", "--bogus"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --optimizer.lr=3e-4 --bogus (overrides are written key=value, without dashes: optimizer.lr=3e-4)" in err
    with pytest.raises(SystemExit):  # HF's --key value: the value is taken as an override, the key is left
        finetune.main(["--optimizer.lr", "3e-4"])
    assert "unrecognized arguments: --optimizer.lr (overrides are written key=value, without dashes)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        finetune.main(["---epochs=2"])
    assert "without dashes: epochs=2)" in capsys.readouterr().err

