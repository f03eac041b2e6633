"""Instruction data in Alpaca form: reading, the prompt template, tokenizing with the loss mask,
the held-out split, the seeded order of each epoch, and the padding collate.

A record is ``{"instruction": str, "input": str (may be empty or absent), "output": str}``, read
from a JSON list of records or JSONL (one record a line) by ``data_files``. An example becomes

    tokens = [BOS] + prompt + output + [EOS]
    labels = [-100] * (1 + len(prompt)) + output + [EOS]     (train_on_input=False)

cut to ``max_seq_len``; the loss is taken where labels != -100 (``IGNORE_INDEX``). Tokens are
those of torchtune's Alpaca dataset through its ``llama2_tokenizer`` (compared token for token
with torchtune 0.6.1), with ``prompt_template=None`` (template ``alpaca``, as torchtune before 0.3
and the seed tutorial) or its default ``Llama2ChatTemplate`` (template ``llama2_chat``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Protocol

import torch
from torch import Tensor

from qlora_ext.training.data_files import DataError

IGNORE_INDEX = -100
TEMPLATES = ("alpaca", "llama2_chat")  # see prompt_tokens

# Stanford Alpaca's prompts, as torchtune's AlpacaInstructTemplate.
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class Tokenizer(Protocol):
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True, trim_leading_whitespace: bool = False) -> list[int]: ...


def alpaca_prompt(record: dict[str, str]) -> str:
    """The Alpaca prompt for a record (the with-input form when ``input`` is non-empty)."""
    if record.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])


def prompt_tokens(tokenizer: Tokenizer, record: dict[str, str], template: str = "alpaca") -> list[int]:
    """BOS and the tokens of a record's prompt (the user turn), as torchtune tokenizes them.

    ``alpaca``: the Alpaca prompt. ``llama2_chat``: torchtune's ``Llama2ChatTemplate`` around it,
    ``"[INST] "`` + prompt + ``" [/INST] "``. torchtune encodes each piece on its own, with
    trailing spaces stripped, so the pieces do too.

    Raises:
        ValueError: an unknown template.
    """
    if template not in TEMPLATES:
        raise ValueError(f"argument 'template' must be one of {', '.join(TEMPLATES)}; got {template!r}")
    pieces = ["[INST] ", alpaca_prompt(record), " [/INST] "] if template == "llama2_chat" else [alpaca_prompt(record)]
    return [tokenizer.bos_id] + [t for piece in pieces for t in tokenizer.encode(piece.rstrip(" "), add_bos=False, add_eos=False)]


def response_tokens(tokenizer: Tokenizer, output: str, template: str = "alpaca") -> list[int]:
    """The tokens of a record's output and EOS, as torchtune tokenizes the assistant turn: trailing
    spaces stripped; after the Alpaca prompt (which ends in a newline) the text continues without
    SentencePiece's word-start space, after ``" [/INST] "`` it starts a word."""
    return tokenizer.encode(output.rstrip(" "), add_bos=False, add_eos=True, trim_leading_whitespace=template == "alpaca")


def tokenize_example(
    tokenizer: Tokenizer, record: dict[str, str], max_seq_len: int | None, train_on_input: bool, template: str = "alpaca"
) -> tuple[list[int], list[int]]:
    """(tokens, labels) of one record; labels are IGNORE_INDEX on the prompt unless train_on_input.

    Longer than ``max_seq_len``: cut, and the last token made EOS (as torchtune's ``truncate``),
    its label EOS where that position is trained.
    """
    prompt = prompt_tokens(tokenizer, record, template)
    response = response_tokens(tokenizer, record["output"], template)
    tokens = prompt + response
    labels = list(tokens) if train_on_input else [IGNORE_INDEX] * len(prompt) + response
    if max_seq_len is not None and len(tokens) > max_seq_len:
        tokens, labels = tokens[:max_seq_len], labels[:max_seq_len]
        tokens[-1] = tokenizer.eos_id
        if labels[-1] != IGNORE_INDEX:
            labels[-1] = tokenizer.eos_id
    return tokens, labels


class InstructDataset(torch.utils.data.Dataset):
    """Alpaca records tokenized on access (cheap next to a training step, and memory-lean)."""

    def __init__(
        self, records: list[dict[str, str]], tokenizer: Tokenizer, max_seq_len: int | None, train_on_input: bool, template: str = "alpaca"
    ):
        self.records = records
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.train_on_input = train_on_input
        self.template = template

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[list[int], list[int]]:
        return tokenize_example(self.tokenizer, self.records[index], self.max_seq_len, self.train_on_input, self.template)


def max_seq_len_cut(max_seq_len: int, cut_by_model: bool) -> str:
    """What cuts the examples, for messages: ``tokenizer.max_seq_len=N cuts``, or the model's
    max_seq_len where ``tokenizer.max_seq_len`` is null."""
    if cut_by_model:
        return f"the model's max_seq_len {max_seq_len} (tokenizer.max_seq_len is null) cuts"
    return f"tokenizer.max_seq_len={max_seq_len} cuts"


def check_loss_tokens(dataset: InstructDataset, name: str, scored: int | None = None, scored_by: str = "", more_with: str = "",
                      probe: int = 256, cut_by_model: bool = False) -> str | None:
    """Checks that examples of ``dataset`` leave tokens to learn from after ``max_seq_len`` cuts them.

    Args:
        scored: only the first ``scored`` examples count (the held-out batches that are scored);
            None: all of them.
        scored_by: what sets ``scored``, for the messages (e.g. "eval.max_batches=1 x batch_size=2").
        more_with: how to count more of them, for the message (e.g. "raise eval.max_batches").
        probe: how many examples are tokenized for the note: all of them when there are no more,
            else a fixed random sample (a file sorted by length is not judged by its first lines).
        cut_by_model: the dataset's max_seq_len is the model's (``tokenizer.max_seq_len`` is
            null), for the messages.

    Returns:
        None, or a note when some of the probed examples keep none (they add nothing to the loss).

    Raises:
        DataError: none of the counted examples keeps a loss token (looked for in all of them
            before saying so), naming ``tokenizer.max_seq_len`` (or the model's max_seq_len).
    """
    count = len(dataset) if scored is None else min(scored, len(dataset))
    if count == 0:
        return None
    order = list(range(count)) if count <= probe else torch.randperm(count, generator=torch.Generator().manual_seed(0)).tolist()
    sample = order[:probe]

    def keeps_none(index: int) -> bool:
        return all(label == IGNORE_INDEX for label in dataset[index][1][1:])

    empty = [i for i in sample if keeps_none(i)]
    if not empty:
        return None
    longest = max(len(prompt_tokens(dataset.tokenizer, dataset.records[i], dataset.template)) for i in empty)
    limited = scored is not None and scored < len(dataset) and scored_by
    what = f"{name} examples" + (f" scored ({scored_by})" if limited else "")
    cut = max_seq_len_cut(dataset.max_seq_len, cut_by_model)
    why = f"to their prompt (up to {longest} tokens with BOS), leaving no response token to learn from"
    if len(empty) == len(sample) and all(keeps_none(i) for i in order[len(sample) :]):
        remedy = ("shorten their prompts" if cut_by_model else "raise tokenizer.max_seq_len") + (
            "" if dataset.train_on_input else " (or set dataset.train_on_input=true)")
        if limited and more_with:
            remedy += f", or {more_with}"
        raise DataError(f"{cut} all {count} {what} {why}; {remedy}")
    some = f"{len(empty)} of the {count}" if len(sample) == count else f"{len(empty)} of {len(sample)} sampled from the {count}"
    return f"{cut} {some} {what} {why}: they add nothing to the loss"


def split_records(records: list, validation_fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): a seeded random ``validation_fraction`` of the records held out (the
    nearest whole number of them, a half rounded up, at least one)."""
    if validation_fraction <= 0.0:
        return list(records), []
    n_val = max(1, math.floor(len(records) * validation_fraction + 0.5))  # (round() takes a half to even: 2.5 -> 2, 3.5 -> 4)
    if n_val >= len(records):
        raise DataError(
            f"dataset.validation_fraction={validation_fraction} leaves no training records out of {len(records)}"
        )
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(records), generator=g).tolist()
    held = set(order[:n_val])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def epoch_order(num_examples: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    """The example order of an epoch: a function of (seed, epoch) only, so a resumed run repeats it.

    The generator's seed is ``(seed * 100_003 + epoch) mod 2**63``: any config seed (< 2**63) fits
    torch's 64-bit seed, and seeds below 2**63 / 100_003 keep the orders they always had.
    """
    if not shuffle:
        return list(range(num_examples))
    g = torch.Generator().manual_seed((seed * 100_003 + epoch) % 2**63)
    return torch.randperm(num_examples, generator=g).tolist()


def padded_collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Tensor]:
    """Pads to the longest example: tokens with ``pad_id``, labels with IGNORE_INDEX.

    Returns:
        {"tokens": int64 [b, s], "labels": int64 [b, s], "num_tokens": int64 scalar (not padding)}
    """
    length = max(len(tokens) for tokens, _ in examples)
    tokens = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, (t, lab) in enumerate(examples):
        tokens[row, : len(t)] = torch.tensor(t, dtype=torch.long)
        labels[row, : len(lab)] = torch.tensor(lab, dtype=torch.long)
    num_tokens = torch.tensor(sum(len(t) for t, _ in examples))
    return {"tokens": tokens, "labels": labels, "num_tokens": num_tokens}


def num_batches(num_examples: int, batch_size: int) -> int:
    """Batches per epoch: the last, partial batch is dropped (as torchtune's DataLoader does)."""
    return num_examples // batch_size


def iterate_batches(
    dataset: InstructDataset, order: list[int], batch_size: int, pad_id: int, start_batch: int = 0
) -> Iterator[dict[str, Tensor]]:
    """Collated batches of ``order``, from batch ``start_batch`` on (the resume position)."""
    for b in range(start_batch, num_batches(len(order), batch_size)):
        yield padded_collate([dataset[i] for i in order[b * batch_size : (b + 1) * batch_size]], pad_id)


def eval_batches(dataset: InstructDataset, batch_size: int, pad_id: int, max_batches: int | None) -> list[dict[str, Tensor]]:
    """The validation set in fixed order (a partial last batch kept), at most ``max_batches``."""
    count = math.ceil(len(dataset) / batch_size)
    if max_batches is not None:
        count = min(count, max_batches)
    return [
        padded_collate([dataset[i] for i in range(b * batch_size, min((b + 1) * batch_size, len(dataset)))], pad_id)
        for b in range(count)
    ]
