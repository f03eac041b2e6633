"""Pretrains the tiny base model of the default run on the synthetic corpus (``tiny_world``) and
saves it in HF format (bf16 safetensors + config.json) with the package's checkpoint writer.

Called by ``make_tiny_assets.py model``; deterministic given the seed and thread count. Full
training of all weights here (this is pretraining); the default run then only trains adapters.
"""

from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Small enough to ship (about 2M parameters, 4 MB in bf16) and to fine-tune in minutes on 2 CPU
# cores; GQA (6 query heads, 2 key/value heads) like Llama-2-70B.
ARCH = dict(
    vocab_size=1024, num_layers=4, num_heads=6, num_kv_heads=2, embed_dim=192, intermediate_dim=512, max_seq_len=256,
    norm_eps=1e-5, rope_base=10_000.0,
)
SEQ = 128
BATCH = 16
STEPS = 1800
LR = 3e-3
WARMUP = 100


class _SentencePiece:
    """encode() with BOS/EOS as Llama-2 does (the package's tokenizer wraps the same model)."""

    def __init__(self, sp):
        self.sp, self.vocab_size = sp, sp.vocab_size()

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        return [self.sp.bos_id()] * add_bos + self.sp.encode(text) + [self.sp.eos_id()] * add_eos


def packed_sequences(docs: list[str], tokenizer, seq: int, seed: int) -> torch.Tensor:
    """Documents in groups of 1-3 joined by newlines (so the model also sees text that starts
    right after a newline, as an Alpaca response does), as one BOS ... EOS stream cut into rows of
    ``seq + 1`` tokens."""
    rng = random.Random(seed)
    stream: list[int] = []
    i = 0
    while i < len(docs):
        n = rng.randint(1, 3)
        stream += tokenizer.encode("\n".join(docs[i : i + n]), add_bos=True, add_eos=True)
        i += n
    rows = len(stream) // (seq + 1)
    return torch.tensor(stream[: rows * (seq + 1)]).view(rows, seq + 1)


def pretrain_and_save(out_dir: Path, corpus: list[str], tokenizer_path: Path, seed: int = 0, steps: int = STEPS) -> None:
    import sentencepiece as spm

    from qlora_ext.checkpoint import save_hf_checkpoint
    from qlora_ext.models.llama2 import llama2

    # One thread: deterministic, and on a busy 2-core machine far faster than two threads that
    # wait on each other at every parallel region.
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    tokenizer = _SentencePiece(spm.SentencePieceProcessor(model_file=str(tokenizer_path)))
    assert tokenizer.vocab_size == ARCH["vocab_size"], (tokenizer.vocab_size, ARCH["vocab_size"])
    data = packed_sequences(corpus, tokenizer, SEQ, seed)
    model = llama2(**ARCH)
    print(f"pretraining {sum(p.numel() for p in model.parameters()):,} parameters on {data.numel():,} tokens "
          f"({data.shape[0]} rows of {SEQ + 1}), {steps} steps of {BATCH} rows")
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(data.shape[0], generator=g)
    cursor, start = 0, time.perf_counter()
    for step in range(steps):
        lr = LR * min(1.0, (step + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        if cursor + BATCH > len(order):
            order, cursor = torch.randperm(data.shape[0], generator=g), 0
        rows = data[order[cursor : cursor + BATCH]]
        cursor += BATCH
        logits = model(rows[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {lr:.2e}  {time.perf_counter() - start:.0f} s", flush=True)
    model = model.to(torch.bfloat16)
    save_hf_checkpoint(model, out_dir)
    size = sum(f.stat().st_size for f in Path(out_dir).iterdir())
    print(f"wrote {out_dir} ({size / 1e6:.1f} MB)")
