"""QLoRA (or LoRA) fine-tuning of a Llama-2 model on Alpaca-format instruction data, on one device.

The default run needs no download and no GPU: it instruction-tunes a tiny Llama-2 model that
ships with the package, on a bundled synthetic dataset, in about a minute on 2 CPU cores, and shows
held-out loss and sample answers before and after:

    python -m qlora_ext.finetune

Llama-2-7B on one GPU, as torchtune's ``tune run lora_finetune_single_device --config
llama2/7B_qlora_single_device`` (a local Llama-2-7b-hf folder and a local Alpaca JSON file):

    python -m qlora_ext.finetune --config llama2_7b_qlora_single_device \\
        checkpointer.checkpoint_dir=/tmp/Llama-2-7b-hf \\
        tokenizer.path=/tmp/Llama-2-7b-hf/tokenizer.model \\
        dataset.data_files=alpaca_data_cleaned.json

Any config key can be overridden as ``dotted.key=value`` (``model.lora_rank=16``, ``compile=True``,
``max_steps_per_epoch=100``, ``resume_from_checkpoint=True``); ``--list-configs`` shows the
bundled configs and ``--config PATH.yaml`` reads your own, in our keys or as a torchtune recipe
config (``_component_`` sections; its overrides use torchtune's keys). Everything goes to ``output_dir``:
the resolved ``config.yaml``, ``logs/metrics.jsonl`` (loss, lr, throughput, memory at each logged
step; with a validation split, ``val_loss`` at each epoch end and every ``eval.every_n_steps``),
``loss_curve.png``, and a checkpoint folder per epoch (merged HF model, tokenizer, config, and the
PEFT adapter in its ``adapter/`` subfolder) plus ``recipe_state.pt`` for resuming.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from qlora_ext._console import STDOUT_NAME, StdoutErrorsNamed, print_out, stdout_reader_gone, tolerant_console
from qlora_ext._paths import unencodable_name, unwritable_folder, why_not_a_folder
from qlora_ext.checkpoint.atomic import atomic_write_text
from qlora_ext.generation import NonFiniteLogitsError
from qlora_ext.training import checkpoint_folders, checkpointing, evaluation, model_setup, run_lock, saving, steps
from qlora_ext.training.config import Config, ConfigError, available_configs, load_config
from qlora_ext.training.data import (
    InstructDataset,
    check_loss_tokens,
    epoch_order,
    eval_batches,
    iterate_batches,
    max_seq_len_cut,
    num_batches,
    split_records,
)
from qlora_ext.training.data_files import DataError, load_alpaca_records
from qlora_ext.training.loss_plot import Curve, plot_loss_curves
from qlora_ext.training.memory import format_memory_stats, memory_stats
from qlora_ext.training.metric_logging import (
    LOG_SUBDIR,
    METRICS_FILE,
    RUN_CONFIG_FILE,
    MetricLoggerError,
    MetricLoggers,
    MissingDependencyError,
    read_metrics,
    run_log_dir,
    run_logger_type,
)
from qlora_ext.training.optim import apply_hyperparameters, build_optimizer, build_scheduler, warmup_note

DEFAULT_CONFIG = "tiny_qlora"


def train(cfg: Config) -> dict[str, Any]:
    """Runs the whole fine-tuning described by ``cfg``; returns a summary (losses, paths).

    One run at a time per process: it seeds torch's global generator, sets its thread count and
    starts torch.compile afresh, so runs in a sweep go one after another, not in threads."""
    # -- setup: device, precision, seed, output folder ----------------------------------------
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    device = steps.resolve_device(cfg.device)
    dtype = steps.resolve_dtype(cfg.dtype, device)
    output_dir = Path(cfg.output_dir)
    data_files = cfg.dataset.data_files
    for key, path in (("output_dir", output_dir), ("checkpointer.checkpoint_dir", cfg.checkpointer.checkpoint_dir),
                      ("tokenizer.path", cfg.tokenizer.path), ("metric_logger.log_dir", cfg.metric_logger.log_dir),
                      *(("dataset.data_files", f) for f in ([data_files] if isinstance(data_files, str) else data_files or []))):
        if path is not None and (why := unencodable_name(path)):  # (else "not a file", or a traceback)
            raise ConfigError(f"{key}: {why}")
    for key, path, remedy in (
        ("checkpointer.checkpoint_dir", cfg.checkpointer.checkpoint_dir, f"copy it out of '{output_dir}' first, or choose another output_dir"),
        ("tokenizer.path", cfg.tokenizer.path, f"copy it out of '{output_dir}' first, or choose another output_dir"),
        ("metric_logger.log_dir", cfg.metric_logger.log_dir, "choose a log_dir outside the checkpoint folders"),  # (a save deleted the log)
    ):
        inside = path is not None and checkpoint_folders.checkpoint_folder_holding(output_dir, path)
        if inside:
            raise ConfigError(
                f"{key}: '{path}' lies in {inside}, a checkpoint folder of this run's output_dir '{output_dir}', which the "
                f"run's saves replace or delete; {remedy}"
            )
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=output_dir).close()  # an existing folder may still be read-only
    except OSError as e:
        raise ConfigError(unwritable_folder("output_dir", output_dir, e)) from None
    with run_lock.exclusive_output_dir(output_dir), contextlib.ExitStack() as on_exit:
        return _train_in(output_dir, cfg, device, dtype, on_exit)


def _base_non_finite(what: str, cfg: Config, dtype: torch.dtype) -> str:
    """The message for outputs that are NaN or infinite before any update: the base's doing."""
    overflow = "" if dtype == torch.float32 else (
        f"; activations may overflow in {str(dtype).removeprefix('torch.')} where they do not in float32: dtype=fp32 tells")
    return (f"{what} (the adapters start as the identity): the base model's outputs are non-finite, "
            f"which no learning rate changes; check the weights in {cfg.checkpointer.checkpoint_dir}{overflow}")


def _non_finite_remedy(cfg: Config) -> str:
    return "a lower optimizer.lr" + (" or a clip_grad_norm" if cfg.clip_grad_norm is None else "")  # (not one already set)


def _non_finite_advice(last_checkpoint: Path | None, cfg: Config) -> str:
    remedy = _non_finite_remedy(cfg)
    if last_checkpoint:
        return (
            f"the last good checkpoint is {last_checkpoint}. Continue from it with resume_from_checkpoint=True "
            f"and {remedy} (of the training settings, only "
            f"{', '.join(saving.ADJUSTABLE_ON_RESUME)} may change on resume); a bad record may be fixed in "
            "its file, keeping the number of records (checked on resume)"
        )
    return f"no checkpoint was saved yet. Rerun with {remedy}, or fix the data"


def _earlier_run_note(output_dir: Path, epochs: int) -> str | None:
    """For a run starting afresh where an earlier run saved: which of its checkpoints this run
    replaces and which stay, so that an epoch folder left from a longer run is not taken for this one's."""
    folders = checkpoint_folders.list_checkpoint_folders(output_dir)
    has_state = (output_dir / checkpointing.STATE_FILE).is_file()
    if not folders and not has_state:
        return None
    found = [*folders, *([checkpointing.STATE_FILE] if has_state else [])]
    staying = [f for f in folders if f.startswith("epoch_") and int(f.split("_")[1]) >= epochs]
    stay = (f"; {', '.join(staying)} {'stays' if len(staying) == 1 else 'stay'} as the earlier run left "
            f"{'it' if len(staying) == 1 else 'them'} (this run saves {'epoch_0' if epochs == 1 else f'epoch_0 to epoch_{epochs - 1}'})"
            ) if staying else ""
    return (f"{output_dir} holds an earlier run's checkpoints ({', '.join(found)}); this run starts afresh "
            f"(resume_from_checkpoint=False) and its saves replace the training state, the step folders and the "
            f"epoch folders it reaches{stay}. Choose another output_dir to keep that run whole.")


def _lock_log_dir(on_exit: contextlib.ExitStack, log_dir: Path, output_dir: Path, key: str) -> None:
    """Holds the run lock of the metrics folder (made if missing) until ``on_exit`` closes, unless
    it is ``output_dir``, held already: two runs logging to one folder (a shared
    metric_logger.log_dir) overwrote each other's metrics.jsonl."""
    log_dir.mkdir(parents=True, exist_ok=True)
    if not os.path.samefile(log_dir, output_dir):
        on_exit.enter_context(run_lock.exclusive_output_dir(log_dir, key=key))


def _restore_finished_run_files(output_dir: Path, state: dict[str, Any], on_exit: contextlib.ExitStack) -> list[str]:
    """Puts back the finished run's config.yaml (its checkpoint folder's training_config.yaml) and
    metrics log (the one saved with its training state, into the log folder that config names)
    where a later run, started afresh or resumed and stopped before its first save, replaced
    them; returns a line per file rewritten (none when they match, as after a run that ended
    with a save)."""
    saved_config = output_dir / state["checkpoint_name"] / saving.TRAINING_CONFIG_FILE
    config_text = saved_config.read_text(encoding="utf-8") if saved_config.is_file() else None
    config_line = _put_back(output_dir / RUN_CONFIG_FILE, config_text)
    log_dir = run_log_dir(output_dir)  # where config.yaml, as restored, says
    log_line = None
    if state.get("metrics_log") is not None:
        try:
            _lock_log_dir(on_exit, log_dir, output_dir, "metric_logger.log_dir")
            log_line = _put_back(log_dir / METRICS_FILE, state["metrics_log"])
        except ConfigError:  # another run logs there now: its log is not overwritten
            log_line = (f"Left as it is: {log_dir / METRICS_FILE}, in a folder another training run holds; relaunch once "
                        "that run has ended to put this run's log back")
        except OSError as e:
            log_line = f"Not restored: {log_dir / METRICS_FILE}: {why_not_a_folder(log_dir, e)}"
    lines = [line for line in (config_line, log_line) if line]
    if log_line and log_line.startswith("Restored") and run_logger_type(output_dir) == "tensorboard":
        lines.append("Note: TensorBoard's event files still show the later run's curve, until a run there replays the log")
    return lines


def _put_back(path: Path, text: str | None) -> str | None:
    """Writes ``text`` to ``path`` unless it holds it already (or there is no text); says what it did."""
    if text is None or (path.is_file() and path.read_bytes() == text.encode("utf-8")):
        return None
    existed = path.is_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    if existed:
        return f"Restored {path} to the checkpoint's (a later run had started here and stopped before saving)"
    return f"Wrote {path} from the checkpoint (it was missing)"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _train_in(output_dir: Path, cfg: Config, device: torch.device, dtype: torch.dtype,
              on_exit: contextlib.ExitStack) -> dict[str, Any]:
    """The run, once its output folder is checked and locked. ``on_exit`` closes the metric
    loggers and the progress bar however the run ends (an error, Ctrl-C: in a notebook or a sweep
    in one process, each stopped run left a TensorBoard thread or an unfinished W&B run)."""
    for note in checkpoint_folders.recover_interrupted_saves(output_dir):  # before reading the state that may name it
        print(f"Checkpoint folders: {note}")
    fingerprint = saving.resume_fingerprint(cfg)
    # the compute dtype as resolved (auto: by device), by its config name; a change is reported
    fingerprint["dtype"] = next((name for name, d in steps.DTYPES.items() if d == dtype), str(dtype))
    state = None
    if cfg.resume_from_checkpoint:
        state = checkpointing.load_training_state(output_dir, fingerprint, may_change=saving.ADJUSTABLE_ON_RESUME, seed=cfg.seed)
        # a run killed after saving, before deleting the step folder that save replaced
        checkpoint_folders.remove_step_folders(output_dir, keep=state["checkpoint_name"])
        if state["epoch"] >= cfg.epochs:  # a finished run re-launched: nothing is built or trained
            print(f"Nothing left to train: the checkpoint {output_dir / state['checkpoint_name']} has completed "
                  f"{_count(state['epoch'], 'epoch')} and epochs is {cfg.epochs}; set epochs above {state['epoch']} to train on")
            for line in _restore_finished_run_files(output_dir, state, on_exit):
                print(line)
            return {"output_dir": str(output_dir), "seed": state["seed"], "losses": [], "val_losses": [],
                    "checkpoint": str(output_dir / state["checkpoint_name"]), "metrics": None, "peak_memory": {},
                    "nothing_left_to_train": True}
    else:
        note = _earlier_run_note(output_dir, cfg.epochs)
        if note:
            print(f"Note: {note}")
    seed = cfg.seed if cfg.seed is not None else (state["seed"] if state else int.from_bytes(os.urandom(4), "little") >> 1)
    print(f"Resolved config (seed {seed}):\n{saving.resolved_yaml(cfg, seed)}")  # a drawn seed in place of seed: null
    log_dir = Path(cfg.metric_logger.log_dir or output_dir / LOG_SUBDIR)
    try:
        _lock_log_dir(on_exit, log_dir, output_dir, "metric_logger.log_dir" if cfg.metric_logger.log_dir else "output_dir")
        loggers = MetricLoggers(
            cfg.metric_logger.type, log_dir, project=cfg.metric_logger.project, config=cfg.to_dict(),
            resume_step=state["global_step"] if state else None, resume_log=state.get("metrics_log") if state else None,
        )
    except OSError as e:
        key = "metric_logger.log_dir" if cfg.metric_logger.log_dir else "output_dir (its logs/ folder, where metric_logger.log_dir=null puts the logs)"
        raise ConfigError(unwritable_folder(key, log_dir, e)) from None
    on_exit.push(lambda error_type, *_: loggers.close(failed=error_type is not None))

    # -- tokenizer and data (read before the model, so a data mistake fails fast) -------------
    tokenizer = model_setup.load_tokenizer(cfg.tokenizer.path)
    model_setup.check_tokenizer_files(cfg.tokenizer.path, cfg.checkpointer.checkpoint_dir)
    records = load_alpaca_records(cfg.dataset.data_files, cfg.dataset.column_map.to_dict())
    fingerprint[saving.RECORDS_KEY] = len(records)
    if state is not None:
        saving.check_resumed_records(state["fingerprint"], len(records), output_dir)
    train_records, val_records = split_records(records, cfg.dataset.validation_fraction, seed)
    steps_per_epoch = num_batches(len(train_records), cfg.batch_size) // cfg.gradient_accumulation_steps
    if cfg.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise DataError(
            f"dataset.data_files: too few training examples ({len(train_records)}) for one optimizer step with batch_size="
            f"{cfg.batch_size} and gradient_accumulation_steps={cfg.gradient_accumulation_steps}"
        )
    used = steps_per_epoch * cfg.gradient_accumulation_steps * cfg.batch_size
    left_out = ""
    if used < len(train_records):  # a window is whole batches of whole steps; the rest of the epoch's order waits
        left_out = (f" of {cfg.gradient_accumulation_steps} x {cfg.batch_size} examples: each epoch trains on {used}, and the "
                    f"last {len(train_records) - used} of its {'shuffled ' if cfg.shuffle else ''}order are left out")
    print(f"Data: {len(train_records)} training and {len(val_records)} held-out examples; "
          f"{_count(steps_per_epoch, 'step')} per epoch{left_out}")

    # -- model: base weights (NF4 for QLoRA) + fp32 adapters ---------------------------------
    torch.manual_seed(seed)
    model = model_setup.build_model(cfg, device, dtype)
    model_setup.check_vocab(model, tokenizer, cfg)
    max_seq_len = model_setup.check_max_seq_len(model, cfg)
    train_ds = InstructDataset(train_records, tokenizer, max_seq_len, cfg.dataset.train_on_input, cfg.dataset.template)
    val_ds = InstructDataset(val_records, tokenizer, max_seq_len, cfg.dataset.train_on_input, cfg.dataset.template)
    # The held-out examples the validation loss scores: it needs a token to score among them.
    scored = None if cfg.eval.max_batches is None else cfg.eval.max_batches * cfg.batch_size
    scored_by = f"eval.max_batches={cfg.eval.max_batches} x batch_size={cfg.batch_size}"
    cut_by_model = cfg.tokenizer.max_seq_len is None
    for note in (check_loss_tokens(train_ds, "training", cut_by_model=cut_by_model),
                 check_loss_tokens(val_ds, "held-out", scored, scored_by, "raise eval.max_batches", cut_by_model=cut_by_model)):
        if note:
            print(f"note: {note}")
    adapter = model_setup.adapter_parameters(model)
    if cfg.log_peak_memory_stats:
        print(format_memory_stats(memory_stats(device, reset_peak=True), "after model init"))
    n_train = sum(p.numel() for p in adapter.values())
    print(f"Model: {cfg.model.builder}, {n_train:,} trainable adapter parameters; {dtype} compute on {device}")
    if cfg.enable_activation_checkpointing:
        steps.enable_activation_checkpointing(model)
    if cfg.compile:
        # torch keeps compiled graphs per function for the whole process, 8 at most: runs with other
        # ranks or alphas in one process (a sweep, a notebook) met that limit at the 4th and failed
        # under fullgraph=True. Each run compiles afresh, as in a new process.
        torch._dynamo.reset()
        steps.compile_layers(model)

    optimizer = build_optimizer(
        adapter.values(), lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay, betas=cfg.optimizer.betas,
        eps=cfg.optimizer.eps, fused=cfg.optimizer.fused, device=device,
    )
    scheduler = build_scheduler(
        optimizer, cfg.lr_scheduler.name, num_warmup_steps=cfg.lr_scheduler.num_warmup_steps,
        num_training_steps=cfg.epochs * steps_per_epoch, num_cycles=cfg.lr_scheduler.num_cycles,
    )
    note = warmup_note(num_warmup_steps=cfg.lr_scheduler.num_warmup_steps, num_training_steps=cfg.epochs * steps_per_epoch,
                       lr=cfg.optimizer.lr)
    if note:
        print(f"note: {note}")
    start_epoch, start_step, global_step = 0, 0, 0
    if state is not None:
        model_setup.load_adapter_state(model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["lr_scheduler"])
        # The config's lr, weight decay, betas, eps replace the loaded ones (they may change on
        # resume); the schedule's multiplier and clip_grad_norm come from the config anyway.
        apply_hyperparameters(
            optimizer, scheduler, lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay,
            betas=cfg.optimizer.betas, eps=cfg.optimizer.eps,
        )
        checkpointing.set_rng_state(state["rng"])
        start_epoch, start_step, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        saved_with = output_dir / state["checkpoint_name"]
        # The training state (with the adapter) is recipe_state.pt; the folder saved beside it may have been deleted since.
        source = saved_with if saved_with.is_dir() else f"{output_dir / 'recipe_state.pt'} (saved with {saved_with}, since deleted)"
        print(f"Resumed from {source}: epoch {start_epoch + 1}, step {global_step}")
        changed = saving.changed_settings(state["fingerprint"], fingerprint)
        if changed:
            schedule = f" (the lr schedule now spans {cfg.epochs * steps_per_epoch} steps)" if any(c.startswith("epochs ") for c in changed) else ""
            print(f"Changed since the checkpoint, applied from step {global_step + 1}: {', '.join(changed)}{schedule}")

    # Written once setup has succeeded: a run that fails before it leaves an earlier run's
    # config.yaml (and, see DiskLogger, its metrics log) as they were.
    try:
        atomic_write_text(output_dir / RUN_CONFIG_FILE, saving.resolved_yaml(cfg, seed))
    except OSError as e:  # (a full disk's error names no file)
        raise OSError(e.errno, f"{e.strerror} (writing the run's config)", str(output_dir / RUN_CONFIG_FILE)) from None

    # -- before training: held-out loss and sample answers -----------------------------------
    summary: dict[str, Any] = {"output_dir": str(output_dir), "seed": seed, "losses": [], "loss_steps": [], "val_losses": [],
                               "first_step": global_step + 1}  # (loss_steps: the step of each loss; a skipped step has none)
    val_batches = eval_batches(val_ds, cfg.batch_size, tokenizer.pad_id, cfg.eval.max_batches) if len(val_ds) else []
    show = cfg.eval.before_and_after and state is None
    wants = []  # what asks for held-out examples
    if show:
        wants.append("eval.before_and_after shows the held-out loss and answers")
    if cfg.eval.every_n_steps:
        wants.append("eval.every_n_steps logs the held-out loss")
    if wants and not val_records:
        print(f"Note: {' and '.join(wants)}, and there are no held-out examples "
              f"(dataset.validation_fraction={cfg.dataset.validation_fraction}); set it above 0 to see them")
    samples = evaluation.pick_samples(val_records, cfg.eval.num_samples)
    if show and val_batches:
        summary["val_loss_before"] = steps.validation_loss(model, val_batches, device, dtype)
        if not math.isfinite(summary["val_loss_before"]):
            raise steps.NonFiniteLossError(
                _base_non_finite(f"the held-out loss is {summary['val_loss_before']} before training", cfg, dtype))
        print(f"Held-out loss before training: {summary['val_loss_before']:.4f}")
    if show and samples:
        try:
            summary["answers_before"] = evaluation.answer(model, tokenizer, samples, cfg.eval.max_new_tokens, device, dtype, cfg.dataset.template)
        except NonFiniteLogitsError:
            raise steps.NonFiniteLossError(_base_non_finite(
                "the logits of a held-out example's answer hold NaN or infinity before training", cfg, dtype)) from None

    # -- the loop ------------------------------------------------------------------------------
    # A frozen output projection is applied by the loss, chunk by chunk (no [b, s, vocab] logits).
    output_weight = steps.fused_output_weight(model)
    model.skip_output_layer = output_weight is not None
    last_checkpoint = output_dir / state["checkpoint_name"] if state else None
    skipped = 0  # steps whose window kept no token to learn from
    for epoch in range(start_epoch, cfg.epochs):
        order = epoch_order(len(train_ds), epoch, seed, cfg.shuffle)
        step_in_epoch = start_step if epoch == start_epoch else 0
        batches = iterate_batches(train_ds, order, cfg.batch_size, tokenizer.pad_id, step_in_epoch * cfg.gradient_accumulation_steps)
        # on stderr, as torchtune's: `> log.txt` keeps the report lines and leaves the bar on the terminal
        bar = tqdm(total=steps_per_epoch, initial=step_in_epoch, dynamic_ncols=True, file=sys.stderr)
        on_exit.callback(bar.close)
        tokens_since, t_since = 0, time.perf_counter()
        while step_in_epoch < steps_per_epoch:
            window = [next(batches) for _ in range(cfg.gradient_accumulation_steps)]
            window_tokens = sum(steps.num_loss_tokens(b["labels"]) for b in window)
            loss_value = grad_norm = None  # (a window with no token to learn from: no update)
            if window_tokens == 0:
                skipped += 1
                if skipped <= 3:  # (a dataset with many such windows would fill the screen)
                    more = "; further such steps are skipped without a line" if skipped == 3 else ""
                    tqdm.write(f"Step {global_step + 1}: {max_seq_len_cut(max_seq_len, cut_by_model)} each example of its batches "
                               f"to the prompt, leaving no token to learn from: the adapters are not updated{more}")
            else:
                step_loss = torch.zeros((), device=device)
                for batch in window:
                    tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
                    with steps.autocast(device, dtype):
                        outputs = model(tokens)  # [b, s, d] hidden states, or [b, s, vocab] logits
                    loss = steps.token_loss_sum(outputs, labels, output_weight) / window_tokens
                    loss.backward()
                    step_loss += loss.detach()
                    tokens_since += int(batch["num_tokens"])
                loss_value = step_loss.item()
                # Before this run's first update (a fresh run's adapters are the identity), no learning rate made it
                first_update = state is None and not summary["losses"]
                if not math.isfinite(loss_value) and first_update:
                    raise steps.NonFiniteLossError(
                        _base_non_finite(f"the loss is {loss_value} at step {global_step + 1}, before any update", cfg, dtype))
                if not math.isfinite(loss_value):
                    raise steps.NonFiniteLossError(
                        f"loss is {loss_value} at epoch {epoch + 1}, step {global_step + 1}: training stopped before applying "
                        f"it; {_non_finite_advice(last_checkpoint, cfg)}"
                    )
                if cfg.clip_grad_norm is not None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(list(adapter.values()), cfg.clip_grad_norm)
                    # clipping by an infinite norm zeroes (or NaNs) the gradients
                    bad_gradient = None if math.isfinite(grad_norm) else f"the adapters' gradient norm is {float(grad_norm)}"
                else:  # (unclipped, a large finite gradient is AdamW's to scale; NaN or inf is not)
                    largest = steps.largest_magnitude([p.grad for p in adapter.values() if p.grad is not None])
                    bad_gradient = None if math.isfinite(largest) else f"an adapter's gradient holds {largest}"
                if bad_gradient and first_update:  # (a finite loss: the base's outputs are finite; the backward overflowed)
                    raise steps.NonFiniteLossError(
                        f"{bad_gradient} (loss {loss_value}) at step {global_step + 1}, before any update: the backward "
                        f"overflows, which no learning rate changes; the adapters' scale model.lora_alpha / model.lora_rank = "
                        f"{cfg.model.lora_alpha / cfg.model.lora_rank:g} multiplies their gradients: a lower model.lora_alpha "
                        f"shrinks it, and where it is small the base's weights in {cfg.checkpointer.checkpoint_dir} make it"
                    )
                if bad_gradient:
                    raise steps.NonFiniteLossError(
                        f"{bad_gradient} at epoch {epoch + 1}, step {global_step + 1} (loss {loss_value}): training "
                        f"stopped before applying it; {_non_finite_advice(last_checkpoint, cfg)}"
                    )
            lr = optimizer.param_groups[0]["lr"]
            if loss_value is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                # A finite gradient can still give a non-finite update (an overflowing weight decay or
                # lr): the adapters are checked so that no checkpoint saves them.
                largest = steps.largest_magnitude(list(adapter.values()))
                if not math.isfinite(largest):
                    raise steps.NonFiniteLossError(
                        f"the update of epoch {epoch + 1}, step {global_step + 1} (loss {loss_value}, finite gradients) made an "
                        f"adapter weight {largest}: training stopped before saving it; {_non_finite_advice(last_checkpoint, cfg)}"
                    )
                summary["losses"].append(loss_value)
                summary["loss_steps"].append(global_step + 1)
            with warnings.catch_warnings():  # (after a skipped first step torch warns of a schedule it thinks is early)
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")
                scheduler.step()  # the schedule follows the step count, skipped steps included
            global_step += 1
            step_in_epoch += 1
            bar.update(1)
            bar.set_description(f"{epoch + 1}|{global_step}|Loss: {'none' if loss_value is None else loss_value}")

            last_step = epoch == cfg.epochs - 1 and step_in_epoch == steps_per_epoch
            if global_step % cfg.log_every_n_steps == 0 or last_step:  # the last one: a curve even for short runs
                elapsed = time.perf_counter() - t_since
                # (no token to learn from: no loss, and no rate applied)
                metrics = {} if loss_value is None else {"loss": loss_value, "lr": lr}
                metrics["tokens_per_second"] = tokens_since / max(elapsed, 1e-9)
                if grad_norm is not None:
                    metrics["grad_norm"] = float(grad_norm)
                if cfg.log_peak_memory_stats:
                    metrics.update(memory_stats(device, reset_peak=True))
                loggers.log(metrics, step=global_step)
                tokens_since, t_since = 0, time.perf_counter()
            at_epoch_end = step_in_epoch == steps_per_epoch
            # Validation before saving: a checkpoint at step N implies step N's val_loss is logged
            # (a resumed run keeps the log up to its checkpoint and does not score that step again).
            if val_batches and (at_epoch_end or (cfg.eval.every_n_steps and global_step % cfg.eval.every_n_steps == 0)):
                bar.clear()
                t_val = time.perf_counter()
                val_loss = steps.validation_loss(model, val_batches, device, dtype)
                if not math.isfinite(val_loss):  # (finite adapters can still overflow the model's activations)
                    raise steps.NonFiniteLossError(
                        f"the held-out loss is {val_loss} at epoch {epoch + 1}, step {global_step}: the adapters make the "
                        f"model's outputs non-finite; training stopped before saving them; {_non_finite_advice(last_checkpoint, cfg)}"
                    )
                t_since += time.perf_counter() - t_val  # validation time is not training throughput either
                loggers.log({"val_loss": val_loss}, step=global_step)
                summary["val_losses"].append((global_step, val_loss))
                tqdm.write(f"Held-out loss at step {global_step}: {val_loss:.4f}")
            if at_epoch_end or (cfg.save_every_n_steps and global_step % cfg.save_every_n_steps == 0):
                name = f"epoch_{epoch}" if at_epoch_end else f"step_{global_step}"
                position = (epoch + 1, 0) if at_epoch_end else (epoch, step_in_epoch)
                bar.clear()
                t_save = time.perf_counter()
                try:
                    last_checkpoint = saving.save_checkpoint(
                        output_dir, name, model, cfg, seed, optimizer=optimizer, scheduler=scheduler, adapter=adapter,
                        epoch=position[0], step_in_epoch=position[1], global_step=global_step, fingerprint=fingerprint,
                        metrics_log=loggers.disk_log_text(),
                    )
                except Exception as e:  # noqa: BLE001  (re-raised as is unless the file system failed)
                    if not saving.is_write_failure(e):
                        raise
                    try:
                        free = f"{shutil.disk_usage(output_dir).free / 1e9:.2f} GB free there"
                    except OSError:  # the folder itself is gone (a lost mount)
                        free = "free space unknown"
                    last = (f"the last complete checkpoint, {last_checkpoint}, is intact: once the cause is fixed, "
                            "resume_from_checkpoint=True continues from it") if last_checkpoint else "no checkpoint was saved before"
                    # torch.save reports a full disk in its own words ("unexpected pos ...")
                    cause = "" if isinstance(e, OSError) else " (torch.save's file writer stopped, as on a full disk)"
                    raise saving.CheckpointWriteError(
                        f"output_dir: cannot write checkpoint {name} to '{output_dir}' ({free}): "
                        f"{type(e).__name__}: {e}{cause}; {last}"
                    ) from e
                t_since += time.perf_counter() - t_save  # saving time is not training throughput
                tqdm.write(f"Saved checkpoint {last_checkpoint}")
        bar.close()
    summary["last_step"] = global_step
    # the peaks since the last logged step: the last checkpoint save (GPU); the process's (CPU)
    after_training = memory_stats(device) if cfg.log_peak_memory_stats else {}
    model.skip_output_layer = False
    loggers.close()
    # drawn before the evaluation below, so a run stopped there still leaves its curve
    if cfg.metric_logger.plot_loss_curve:
        summary["loss_curve"], summary["plot_renderer"] = _plot(loggers.metrics_path, output_dir)

    # -- after training: held-out loss, the same samples ---------------------------------------
    if cfg.eval.before_and_after and val_batches:
        if summary["val_losses"] and summary["val_losses"][-1][0] == global_step:  # scored at the last epoch end
            summary["val_loss_after"] = summary["val_losses"][-1][1]
        else:
            summary["val_loss_after"] = steps.validation_loss(model, val_batches, device, dtype)
    if cfg.eval.before_and_after and samples:
        try:
            summary["answers_after"] = evaluation.answer(model, tokenizer, samples, cfg.eval.max_new_tokens, device, dtype, cfg.dataset.template)
        except NonFiniteLogitsError:  # (no held-out loss caught it: the loss of these samples is not scored)
            raise steps.NonFiniteLossError(
                f"after training, the model's logits for a held-out example's answer hold NaN or infinity: the adapters "
                f"saved in {last_checkpoint} make its outputs non-finite; rerun with {_non_finite_remedy(cfg)}"
            ) from None
    summary["checkpoint"] = str(last_checkpoint) if last_checkpoint else None
    summary["metrics"] = str(loggers.metrics_path)
    summary["peak_memory"] = _peak_memory(loggers.metrics_path, after_training)
    evaluation.print_report(summary, samples, cfg)
    return summary


def _peak_memory(metrics_path: Path, after_training: dict[str, float]) -> dict[str, float]:
    """The largest of each logged memory statistic over the run and of those taken after its
    last step, so the last checkpoint save counts too (GB)."""
    peaks: dict[str, float] = {}
    for record in [*read_metrics(metrics_path), after_training]:
        for key in ("peak_memory_alloc", "peak_memory_reserved", "peak_memory_active", "peak_rss_memory"):
            if key in record:
                peaks[key] = max(peaks.get(key, 0.0), record[key])
    return peaks


def _plot(metrics_path: Path, output_dir: Path) -> tuple[str | None, str | None]:
    records = [r for r in read_metrics(metrics_path) if "loss" in r]
    if not records:
        return None, None
    path = output_dir / "loss_curve.png"
    try:
        renderer = plot_loss_curves([Curve(output_dir.name, [r["step"] for r in records], [r["loss"] for r in records])], path)
    except OSError as e:  # a full disk: the run and its checkpoints are complete, the picture is not needed for them
        print(f"warning: the loss curve could not be written to {path} ({e}); draw it later with "
              f"python -m qlora_ext.plot {output_dir}", file=sys.stderr)
        return None, None
    return str(path), renderer


def main(argv: list[str] | None = None) -> int:
    paragraphs = (__doc__ or "").split("\n\n")  # (python -OO leaves no docstring)
    parser = argparse.ArgumentParser(
        prog="python -m qlora_ext.finetune", description=paragraphs[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n\n".join(paragraphs[1:]),
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="a bundled config name or a YAML path (default: %(default)s)")
    parser.add_argument("--list-configs", action="store_true", help="print the bundled config names and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.lora_rank=16")
    tolerant_console()
    args, unknown = parser.parse_known_intermixed_args(argv)  # (overrides before and after --config alike)
    if unknown:
        # torchtune users' --key=value, HF users' --key value
        dashed = [a.lstrip("-") for a in unknown if a.startswith("--") and "=" in a]
        hint = " (overrides are written key=value, without dashes" + (f": {' '.join(dashed)})" if dashed else ")")
        parser.error(f"unrecognized arguments: {' '.join(unknown)}" + (hint if any(a.startswith("--") for a in unknown) else ""))
    if args.list_configs:
        return print_out("\n".join(available_configs()))
    world = os.environ.get("WORLD_SIZE", "")
    # torchrun's processes (RANK set with it; a WORLD_SIZE left in a job script alone is not one)
    if world.isascii() and world.isdigit() and int(world) > 1 and "RANK" in os.environ:
        print(f"error: python -m qlora_ext.finetune trains on one device; it was started as process {os.environ.get('RANK', '?')} "
              f"of WORLD_SIZE={world} (torchrun --nproc_per_node {world}, say): run it without torchrun, or with one process",
              file=sys.stderr)
        return 2
    cfg, started = None, time.time()
    # SIGTERM (a scheduler's or `docker stop`'s) stops the run as Ctrl-C does: a checkpoint being
    # written is removed whole (the metrics log is flushed line by line), and the same closing
    # line is printed.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    stdout = sys.stdout
    # (sys.stdout is the process's: not swapped from a thread, whose runs may overlap; None where
    # the stream is closed, `>&-`, and print writes nothing)
    if main_thread and stdout is not None:
        sys.stdout = StdoutErrorsNamed(stdout)  # a full disk under `> log.txt` is said as such
    try:
        notes: list[str] = []
        cfg = load_config(args.config, args.overrides, notes)
        for note in notes:
            print(f"note: {note}")
        train(cfg)
    except (ConfigError, DataError, checkpointing.ResumeError, MissingDependencyError, MetricLoggerError, model_setup.ModelSetupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (steps.NonFiniteLossError, saving.CheckpointWriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001  (re-raised unless the file system or torch.compile's backend failed)
        if cfg is not None and cfg.compile and _compiler_failure(e):  # (at the first step, or a later recompile)
            inner = getattr(e, "inner_exception", None) or e  # (what the backend raised)
            what = f"{type(inner).__name__}: {(str(inner).strip().splitlines() or [''])[0][:300]}"
            print(f"error: compile=True: torch.compile could not compile the model's layers ({what}); compile=False trains "
                  "without it (inductor needs a working C++ compiler on a CPU, Triton on a GPU). "
                  + _interrupted_line("torch.compile failed", cfg, started), file=sys.stderr)
            return 2
        # A write outside a checkpoint save (the metrics log, config.yaml) that fails, as on a full
        # disk: said with what the run leaves, as for an interruption, not as a traceback.
        if not saving.is_write_failure(e) or cfg is None:
            raise
        print(f"error: {_interrupted_line(_failed_write(e), cfg, started, verb='Stopped')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        terminated = isinstance(e, _Terminated)
        with _interrupts_ignored():  # a second Ctrl-C while the line is composed: no traceback over it
            print(f"\n{_interrupted_line('SIGTERM' if terminated else 'Ctrl-C', cfg, started)}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    finally:
        sys.stdout = stdout
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _failed_write(e: BaseException) -> str:
    """What could not be written, for the closing line: the file the error names, or standard
    output (a full disk under ``> log.txt``)."""
    if isinstance(e, OSError) and e.filename == STDOUT_NAME:
        try:
            process_stdout = sys.stdout.fileno() == 1
        except (AttributeError, OSError, ValueError):  # (io.UnsupportedOperation is both of the last two)
            process_stdout = False
        if process_stdout:  # (to /dev/null: Python's flush at exit would fail again; a caller's own stream is left)
            stdout_reader_gone()
        return f"standard output cannot be written: {e.strerror or e}"
    return f"a write failed: {type(e).__name__}: {e}"


def _compiler_failure(e: BaseException) -> bool:
    """Whether ``e`` is torch.compile's backend failing (no C++ compiler for inductor, say): a
    matter of the machine, not of the run, unlike an error inside the compiled code."""
    dynamo_exc = sys.modules.get("torch._dynamo.exc")  # (not imported: nothing was compiled)
    return dynamo_exc is not None and isinstance(e, dynamo_exc.BackendCompilerFailed)


@contextlib.contextmanager
def _interrupts_ignored():
    """SIGINT and SIGTERM ignored inside the block (main thread only), their handlers restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, so that it unwinds as from Ctrl-C."""


def _raise_terminated(signum, frame) -> None:  # noqa: ANN001
    raise _Terminated


def _interrupted_line(what: str, cfg: Config | None, started: float, verb: str = "Interrupted") -> str:
    """What an interrupted run leaves: the checkpoint a resume continues from, or none (a
    training state older than this run is an earlier run's, when this one started afresh).
    ``verb`` opens the line: "Interrupted" (Ctrl-C, SIGTERM), or "Stopped" (a failed write)."""
    if cfg is None:
        return f"{verb} ({what}) before the config was read."
    output_dir = Path(cfg.output_dir)
    try:
        state = checkpointing.read_state_summary(output_dir)
        earlier = state is not None and (output_dir / checkpointing.STATE_FILE).stat().st_mtime < started
    except Exception:  # noqa: BLE001  (nothing readable to resume from: said as such)
        state = None
    if state is None:
        return f"{verb} ({what}): there is no checkpoint to resume from in {output_dir}; run again to start over."
    name, step, epochs_done = state
    if epochs_done >= cfg.epochs and not earlier:
        return f"{verb} ({what}) after training finished: {output_dir} keeps the checkpoint {name} (step {step}), complete."
    if earlier and not cfg.resume_from_checkpoint:
        if epochs_done >= cfg.epochs:
            return (f"{verb} ({what}) before this run saved a checkpoint: the training state in {output_dir} is an earlier "
                    f"run's ({name}, step {step}), which completed {_count(epochs_done, 'epoch')}; run again to start over, "
                    f"or with resume_from_checkpoint=True and epochs above {epochs_done} to train that run on.")
        return (f"{verb} ({what}) before this run saved a checkpoint: the training state in {output_dir} is an earlier "
                f"run's ({name}, step {step}); resume_from_checkpoint=True would continue that run, without it a run starts over.")
    return (f"{verb} ({what}): {output_dir} keeps the checkpoint {name} (step {step}), complete; "
            "run again with resume_from_checkpoint=True to continue from it.")


if __name__ == "__main__":
    sys.exit(main())
