"""What a person sees of the learning: held-out prompts answered by the model (greedy, so the
before and after answers are comparable), and the closing report of a run."""

from __future__ import annotations

import textwrap
from typing import Any

import torch
from torch import nn

from qlora_ext._eager import force_eager
from qlora_ext.training.data import prompt_tokens
from qlora_ext.training.loss_plot import builtin_renderer_note
from qlora_ext.training.saving import ADAPTER_SUBDIR
from qlora_ext.training.steps import autocast


@torch.no_grad()
@force_eager()  # layers compiled for training run eagerly: each decode step is a new shape
def answer(
    model: nn.Module, tokenizer, records: list[dict[str, str]], max_new_tokens: int, device: torch.device, dtype: torch.dtype,
    template: str = "alpaca",
) -> list[str]:
    """Greedy answers of the model to the records' prompts in ``template`` (generation stops at EOS).

    A prompt too long for ``max_new_tokens`` more within the model's ``max_seq_len`` is answered
    with as many tokens as fit; one that fills ``max_seq_len`` alone gets a line saying so."""
    prompts = [prompt_tokens(tokenizer, record, template) for record in records]
    answers = [""] * len(prompts)
    rooms: dict[int, list[int]] = {}  # new tokens that fit -> the prompts (by index) that get that many
    for i, prompt in enumerate(prompts):
        room = min(max_new_tokens, model.max_seq_len - len(prompt))
        if room > 0:
            rooms.setdefault(room, []).append(i)
        else:
            answers[i] = f"(not answered: its prompt of {len(prompt)} tokens fills the model's max_seq_len {model.max_seq_len})"
    for room, rows in rooms.items():  # usually one batch: every prompt has room for max_new_tokens
        for i, text in zip(rows, _answer_batch(model, tokenizer, [prompts[i] for i in rows], room, device, dtype)):
            answers[i] = text
    return answers


def _answer_batch(
    model: nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int, device: torch.device, dtype: torch.dtype,
) -> list[str]:
    from qlora_ext.generation import generate

    was_training = model.training
    model.eval()
    # Caches sized for these prompts, set up here: generate would size its own for the model's
    # max_seq_len when the layers are compiled (compile=True), to reuse graphs these eager calls never use.
    cache_len = max(len(p) for p in prompts) + max_new_tokens  # at most max_seq_len (answer's rooms)
    model.setup_caches(len(prompts), model.tok_embeddings.weight.dtype, max_seq_len=cache_len)
    try:
        with autocast(device, dtype):  # one batch: rows of different lengths decode side by side
            out = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                           stop_tokens=[tokenizer.eos_id], pad_id=tokenizer.eos_id,
                           vocab_limit=tokenizer.vocab_size)  # a padded embedding's extra ids would not decode
    finally:
        model.remove_caches()
        model.train(was_training)
    answers = []
    for prompt, row in zip(prompts, out.tolist()):
        new = row[len(prompt) :]  # the answer, then EOS-valued padding (if any)
        if tokenizer.eos_id in new:
            new = new[: new.index(tokenizer.eos_id)]
        answers.append(tokenizer.decode(new).strip())
    return answers


def pick_samples(records: list[dict[str, str]], count: int) -> list[dict[str, str]]:
    """``count`` records, in order, preferring instructions that begin differently (a crude
    "kind of task": the first two words), so the samples show a mix of tasks."""
    seen: set[tuple[str, ...]] = set()
    first, rest = [], []
    for r in records:
        kind = tuple(r["instruction"].lower().split()[:2])
        if kind not in seen:
            seen.add(kind)
            first.append(r)
            if len(first) == count:
                break
        elif len(rest) < count:
            rest.append(r)
    return (first + rest)[:count]


def _one_line(text: str, width: int = 100) -> str:
    text = " ".join(text.split()) or "(empty)"
    return textwrap.shorten(text, width=width, placeholder=" ...")


def print_report(summary: dict[str, Any], samples: list[dict[str, str]], cfg) -> None:
    """The end-of-run summary: held-out loss before -> after, sample answers, where things are."""
    lines = ["", "=" * 78, "Run finished."]
    if "val_loss_before" in summary and "val_loss_after" in summary:
        lines.append(f"Held-out loss: {summary['val_loss_before']:.4f} before -> {summary['val_loss_after']:.4f} after training")
    elif "val_loss_after" in summary:
        lines.append(f"Held-out loss after training: {summary['val_loss_after']:.4f}")
    if summary.get("losses"):
        # the steps of the first and last losses: a step with no token to learn from has none
        first, last = summary["loss_steps"][0], summary["loss_steps"][-1]
        if first == 1:
            where = "the first step"
        elif first == summary["first_step"]:
            where = f"step {first}, the first after resuming,"
        else:
            where = f"step {first}"
        end = "the last" if last == summary["last_step"] else f"step {last}"
        lines.append(f"Training loss: {summary['losses'][0]:.4f} at {where} -> {summary['losses'][-1]:.4f} at {end}")
    if summary.get("peak_memory"):
        names = {"peak_memory_alloc": "GPU allocated", "peak_memory_reserved": "GPU reserved",
                 "peak_memory_active": "GPU active", "peak_rss_memory": "CPU resident"}
        lines.append("Peak memory during training and its checkpoint saves: "
                     + ", ".join(f"{names[k]} {v:.2f} GB" for k, v in summary["peak_memory"].items()))
    if summary.get("answers_after"):
        lines.append("")
        lines.append("Held-out prompts (never trained on):")
        before = summary.get("answers_before") or [None] * len(samples)
        for record, b, a in zip(samples, before, summary["answers_after"]):
            # the input on a line of its own: pasted into the instruction, generate --prompt got another prompt
            lines.append(f"  prompt:   {_one_line(record['instruction'])}")
            if record["input"]:
                lines.append(f"  input:    {_one_line(record['input'])}")
            lines.append(f"  expected: {_one_line(record['output'])}")
            if b is not None:
                lines.append(f"  before:   {_one_line(b)}")
            lines.append(f"  after:    {_one_line(a)}")
            lines.append("")
    out = summary["output_dir"]
    lines.append(f"Outputs in {out}:")
    if summary.get("checkpoint"):
        ckpt = summary["checkpoint"]
        lines.append(f"  adapter (PEFT format):   {ckpt}/{ADAPTER_SUBDIR}/ (adapter_model.safetensors, adapter_config.json)")
        if not cfg.save_adapter_weights_only:
            lines.append(f"  merged model (HF):       {ckpt}/ (config.json, *.safetensors, tokenizer.model)")
        lines.append(f"  training state:          {out}/recipe_state.pt (resume_from_checkpoint=True)")
    lines.append(f"  metrics log:             {summary['metrics']}")
    if summary.get("loss_curve"):
        note = ""
        if summary.get("plot_renderer") == "built-in":
            note = f"  ({builtin_renderer_note()})"
        lines.append(f"  loss curve:              {summary['loss_curve']}{note}")
    lines.append(f"  resolved config:         {out}/config.yaml")
    lines.append("=" * 78)
    print("\n".join(lines))
