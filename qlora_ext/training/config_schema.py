"""Every key the trainer reads, with its type, default, allowed values and a one-line meaning.

The YAML files in ``qlora_ext/configs/`` set some of these; ``key=value`` overrides on the command
line set others; everything not set takes the default here. A key that is not listed is an error,
as is a value of the wrong type or outside its choices (``config.py`` says which and why).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qlora_ext.checkpoint.config import MAX_LAYERS, MAX_POSITIONS, MAX_WIDTH
from qlora_ext.models.llama2 import LORA_ATTN_MODULES
from qlora_ext.training.data import TEMPLATES


@dataclass(frozen=True)
class Opt:
    """One config key.

    Attributes:
        kind: "int", "float", "bool", "str", "path" (a str; ``{assets}`` expands to the package's
            bundled assets folder), "list[str]", "list[float]" or "path|list[path]" (one path or
            a list; always resolved to a list).
        default: the value when not set; ``REQUIRED`` for keys that must be set.
        doc: what it means.
        choices: the allowed values (for lists: of each element).
        nullable: whether ``null`` is allowed.
        minimum, maximum: bounds for numbers (inclusive).
    """

    kind: str
    default: Any
    doc: str
    choices: tuple | None = None
    nullable: bool = False
    minimum: float | None = None
    maximum: float | None = None


REQUIRED = object()

# What a damaged or mistyped architecture override could otherwise allocate before any check
# (a RoPE table per position, a module per layer): as a checkpoint's config.json is bounded.
_ARCH_MAXIMA = {"max_seq_len": MAX_POSITIONS, "num_layers": MAX_LAYERS,
                **{key: MAX_WIDTH for key in ("vocab_size", "num_heads", "num_kv_heads", "embed_dim", "intermediate_dim")}}

# The builders of qlora_ext.models.llama2 the trainer can use. The two generic ones take the
# architecture from the model.* keys below (or, where those are null, from the checkpoint's
# config.json); the sized ones fix it.
MODEL_BUILDERS = (
    "lora_llama2",
    "qlora_llama2",
    "lora_llama2_7b",
    "qlora_llama2_7b",
    "lora_llama2_13b",
    "qlora_llama2_13b",
    "lora_llama2_70b",
    "qlora_llama2_70b",
)
GENERIC_BUILDERS = ("lora_llama2", "qlora_llama2")
ARCH_KEYS = (
    "vocab_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "embed_dim",
    "max_seq_len",
    "intermediate_dim",
    "norm_eps",
    "rope_base",
)

SCHEMA: dict[str, Any] = {
    "output_dir": Opt("path", "qlora_output", "where checkpoints, logs, the loss curve and the resolved config go"),
    "seed": Opt(
        "int", None, "seeds weights, data order and dropout, 0 <= seed < 2**63 (torch's generators take 64 bits); "
        "null picks one (and records it)", nullable=True, minimum=0, maximum=2**63 - 1
    ),
    "device": Opt("str", "auto", "auto = cuda when available, else cpu", choices=("auto", "cpu", "cuda")),
    "dtype": Opt(
        "str",
        "auto",
        "compute and frozen-weight dtype; auto = bf16 on a GPU that supports it, else fp32 "
        "(adapters and optimizer state stay fp32)",
        choices=("auto", "bf16", "fp32"),
    ),
    "num_threads": Opt(
        "int", None, "CPU threads for torch (null: torch's default, one per core)", nullable=True, minimum=1, maximum=4096
    ),
    "epochs": Opt("int", 1, "passes over the training data", minimum=1),
    "max_steps_per_epoch": Opt("int", None, "stop each epoch after this many optimizer steps", nullable=True, minimum=1),
    "batch_size": Opt("int", 2, "examples per forward/backward", minimum=1),
    "gradient_accumulation_steps": Opt("int", 1, "batches per optimizer step", minimum=1),
    "clip_grad_norm": Opt("float", None, "clip the adapter gradient norm to this (null: no clipping)", nullable=True, minimum=0.0),
    "shuffle": Opt("bool", True, "shuffle the training data each epoch (seeded)"),
    "compile": Opt("bool", False, "torch.compile each transformer layer (fullgraph: no graph breaks)"),
    "enable_activation_checkpointing": Opt("bool", False, "recompute each layer's activations in backward"),
    "log_every_n_steps": Opt("int", 1, "optimizer steps between metric log lines", minimum=1),
    "log_peak_memory_stats": Opt("bool", True, "log memory after model init and at each log step"),
    "save_every_n_steps": Opt("int", None, "also checkpoint every N optimizer steps (null: epoch ends only)", nullable=True, minimum=1),
    "save_adapter_weights_only": Opt("bool", False, "skip the merged model; save the adapter and training state only"),
    "resume_from_checkpoint": Opt("bool", False, "continue from output_dir's last checkpoint"),
    "model": {
        "builder": Opt("str", REQUIRED, "qlora_ext.models.llama2 builder (qlora_* quantizes the base to NF4)", choices=MODEL_BUILDERS),
        "lora_attn_modules": Opt(
            "list[str]", ["q_proj", "v_proj"], "attention projections that get LoRA", choices=LORA_ATTN_MODULES
        ),
        "apply_lora_to_mlp": Opt("bool", False, "LoRA on the MLP (w1, w2, w3)"),
        "apply_lora_to_output": Opt("bool", False, "LoRA on the final output projection"),
        "lora_rank": Opt("int", 8, "rank of each adapter", minimum=1, maximum=MAX_WIDTH),
        "lora_alpha": Opt("float", 16.0, "adapter scaling numerator (scale = alpha / rank)", minimum=0.0),
        "lora_dropout": Opt("float", 0.0, "dropout on each adapter's input", minimum=0.0, maximum=0.99),
        **{
            key: Opt(
                "float" if key in ("norm_eps", "rope_base") else "int",
                None,
                f"architecture ({key}) for the generic builders; null = from the checkpoint's config.json",
                nullable=True,
                minimum=0,
                maximum=_ARCH_MAXIMA.get(key),
            )
            for key in ARCH_KEYS
        },
    },
    "tokenizer": {
        "path": Opt("path", REQUIRED, "the SentencePiece tokenizer.model file"),
        "max_seq_len": Opt("int", None, "truncate examples to this many tokens (null: no limit)", nullable=True, minimum=2),
    },
    "checkpointer": {
        "checkpoint_dir": Opt("path", REQUIRED, "folder of the base model checkpoint: HF (config.json + model*.safetensors or pytorch_model*.bin, "
            "found through the index file) or Meta (params.json + consolidated.*.pth)"),
        "checkpoint_files": Opt("list[str]", None, "the weight files to read, names inside checkpoint_dir (torchtune's key); "
            "null: found from the index file or the standard names", nullable=True),
        "model_type": Opt("str", "LLAMA2", "the checkpoint's model family", choices=("LLAMA2",)),
    },
    "dataset": {
        "data_files": Opt("path|list[path]", REQUIRED, "local JSON or JSONL files (or a glob; gzip, bzip2, xz too) of {instruction, input, output} records"),
        "template": Opt("str", "alpaca", "prompt template: alpaca, or llama2_chat ([INST] ... [/INST] around it, torchtune 0.3+'s default)",
                        choices=TEMPLATES),
        "train_on_input": Opt("bool", False, "also train on the prompt tokens (false: they are masked from the loss)"),
        "validation_fraction": Opt(
            "float", 0.0, "fraction of examples held out for validation loss (seeded split; scored at each epoch end "
            "and every eval.every_n_steps)", minimum=0.0, maximum=0.5
        ),
        # torchtune's column_map: the records' keys for the Alpaca fields (a Dolly-style file:
        # column_map: {instruction: instruction, input: context, output: response})
        "column_map": {
            "instruction": Opt("str", "instruction", "the records' key holding the instruction"),
            "input": Opt("str", "input", "the records' key holding the optional input"),
            "output": Opt("str", "output", "the records' key holding the response"),
        },
    },
    "optimizer": {
        "lr": Opt("float", 3e-4, "peak learning rate", minimum=0.0),
        "weight_decay": Opt("float", 0.01, "AdamW weight decay", minimum=0.0),
        "betas": Opt("list[float]", [0.9, 0.999], "AdamW betas"),
        # 0 divides a zero gradient (lora_a's while lora_b is 0) by zero: NaN weights. float32, the
        # adapters' arithmetic, rounds an eps below its smallest subnormal (1.4e-45) to 0, and one
        # below its smallest normal number (1.18e-38) too where subnormals are flushed.
        "eps": Opt("float", 1e-8, "AdamW eps; below float32's smallest normal number it may be flushed to 0, which "
                   "divides a zero gradient by zero", minimum=1.2e-38),
        "fused": Opt("bool", None, "fused AdamW kernel (null: on CUDA and CPU)", nullable=True),
    },
    "lr_scheduler": {
        "name": Opt("str", "cosine_with_warmup", "schedule", choices=("cosine_with_warmup", "constant_with_warmup")),
        "num_warmup_steps": Opt("int", 100, "linear warmup from 0 over this many optimizer steps", minimum=0),
        "num_cycles": Opt("float", 0.5, "cosine cycles over the run (0.5: peak to zero)", minimum=0.0),
    },
    "metric_logger": {
        "type": Opt("str", "disk", "where metrics go besides the terminal", choices=("disk", "tensorboard", "wandb")),
        "log_dir": Opt("path", None, "null: output_dir/logs", nullable=True),
        "project": Opt("str", "qlora_ext", "W&B project (type=wandb)"),
        "plot_loss_curve": Opt("bool", True, "write output_dir/loss_curve.png at the end"),
    },
    "eval": {
        "every_n_steps": Opt(
            "int", None, "with a validation split: also score it every N optimizer steps, besides each epoch end; "
            "logged as val_loss with the training metrics (null: epoch ends only)", nullable=True, minimum=1
        ),
        "before_and_after": Opt("bool", False, "held-out loss and sample answers before and after training"),
        "num_samples": Opt("int", 3, "held-out prompts answered before and after", minimum=0),
        "max_new_tokens": Opt("int", 48, "answer length limit for the samples", minimum=1),
        "max_batches": Opt("int", None, "validation batches per evaluation (null: all)", nullable=True, minimum=1),
    },
}
