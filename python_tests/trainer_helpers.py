"""Shared pieces of the trainer tests: a tiny HF-format Llama-2 checkpoint and a small dataset,
written to a temporary folder, and the overrides that keep a run to a few seconds."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qlora_ext.checkpoint import save_hf_checkpoint
from qlora_ext.models.llama2 import llama2
from qlora_ext.training.config import ASSETS_DIR
from qlora_ext.training.data_files import load_alpaca_records

TOKENIZER = ASSETS_DIR / "tokenizer.model"
# The bundled tokenizer has 1024 pieces; everything else as small as NF4 blocks allow.
TINY_ARCH = dict(vocab_size=1024, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128, max_seq_len=256)


def write_tiny_hf_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A randomly initialized tiny Llama-2 in HF format (config.json + model.safetensors)."""
    torch.manual_seed(seed)
    model = llama2(**TINY_ARCH)
    save_hf_checkpoint(model, folder, dtype=torch.float32)
    return folder


def write_small_dataset(path: Path, n: int = 48) -> Path:
    """The first ``n`` bundled records as JSONL."""
    records = load_alpaca_records([ASSETS_DIR / "tiny_alpaca.jsonl"])[:n]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def small_run_overrides(checkpoint_dir: Path, data_file: Path, output_dir: Path) -> list[str]:
    """Overrides for a generic-builder QLoRA run on CPU/fp32 of a few steps."""
    return [
        "model.builder=qlora_llama2",
        f"checkpointer.checkpoint_dir={checkpoint_dir}",
        f"tokenizer.path={TOKENIZER}",
        f"dataset.data_files={data_file}",
        f"output_dir={output_dir}",
        "device=cpu",
        "dtype=fp32",
        "batch_size=4",
        "gradient_accumulation_steps=2",
        "log_every_n_steps=1",
        "lr_scheduler.num_warmup_steps=2",
        "optimizer.lr=1e-2",
        "seed=7",
        "eval.num_samples=0",
    ]


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "logs" / "metrics.jsonl").read_text().splitlines() if line.strip()]
