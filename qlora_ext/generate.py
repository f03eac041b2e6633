"""Generate text with a Llama-2 checkpoint, optionally with a LoRA adapter.

    python -m qlora_ext.generate --checkpoint-dir DIR --prompt "Tell me a story"
    python -m qlora_ext.generate --checkpoint-dir DIR --adapter-dir OUT/epoch_0/adapter \
        --template alpaca --prompt "Give three tips for staying healthy." \
        --temperature 0 --max-new-tokens 50 --quantize-base

DIR is a HF or Meta checkpoint folder holding ``tokenizer.model`` (or pass ``--tokenizer``); a
checkpoint folder the trainer wrote holds the merged model, so ``--checkpoint-dir OUT/epoch_0``
alone runs the fine-tuned model. ``--template alpaca`` (or ``llama2_chat``, as the run's
``dataset.template``) puts the prompt (and ``--input``) into the prompt the trainer trains on: an
instruction-tuned model answers that, not bare text.
The prompt and its continuation go to stdout (several ``--prompt`` are decoded in one batch, or
one per room where max_seq_len leaves a long prompt less than --max-new-tokens, and printed in
order, separated by lines of ``---``); timing goes to stderr.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from qlora_ext._arguments import lone_surrogate_at
from qlora_ext._console import recovered_utf8, stdout_reader_gone, tolerant_console
from qlora_ext._dtypes import HF_DTYPES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m qlora_ext.generate", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--checkpoint-dir", required=True, help="HF or Meta Llama-2 checkpoint folder")
    parser.add_argument("--checkpoint-files", nargs="+", default=None, metavar="FILE",
                        help="the weight files inside --checkpoint-dir, where not HF's or Meta's usual names "
                             "(torchtune's checkpointers' outputs); default: found by those names")
    parser.add_argument("--adapter-dir", default=None, help="PEFT LoRA adapter folder to apply")
    parser.add_argument("--prompt", required=True, action="append",
                        help="text to continue (with a --template: the instruction); repeat it for several prompts, "
                             "decoded together in one batch (one per room where max_seq_len leaves a long prompt less) "
                             "and printed in order, separated by lines of '---'")
    parser.add_argument("--template", choices=("none", "alpaca", "llama2_chat"), default="none",
                        help="none: the prompt as given; alpaca / llama2_chat: the trainer's prompt of that dataset.template "
                             "around it (default: none)")
    parser.add_argument("--input", default="", help="with --template alpaca or llama2_chat: the record's input (context) text")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.model (default: CHECKPOINT_DIR/tokenizer.model)")
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="new tokens per prompt at most; fewer where the prompt leaves less room within the model's "
                             "max_seq_len (a note says so)")
    parser.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=300, help="sample among the k most likely tokens; 0 = all")
    parser.add_argument("--seed", type=int, default=0,
                        help="sampling seed: the same prompts and seed give the same text (a prompt's sample also "
                             "depends on the other prompts it is decoded with)")
    parser.add_argument("--quantize-base", action="store_true",
                        help="keep the adapted linears' base weights in NF4: the base a QLoRA run's adapter was trained on")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(HF_DTYPES), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU; a dense model larger than the device's free memory "
                             "at this dtype is refused before loading, with the sizes at the smaller dtypes")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.checkpoint_dir):
        parser.error(f"argument --checkpoint-dir must be a checkpoint folder; '{args.checkpoint_dir}' is not a folder")
    from qlora_ext.checkpoint.load import checkpoint_format

    try:
        checkpoint_format(args.checkpoint_dir)
    except FileNotFoundError:
        parser.error(f"argument --checkpoint-dir must be a HF (config.json) or Meta (params.json) checkpoint folder; "
                     f"'{args.checkpoint_dir}' holds neither{_what_it_holds(args.checkpoint_dir)}")
    except ValueError as e:
        parser.error(f"argument --checkpoint-dir: {e}")
    for name in args.checkpoint_files or ():
        if not os.path.isfile(os.path.join(args.checkpoint_dir, name)):
            files = sorted(f for f in os.listdir(args.checkpoint_dir) if os.path.isfile(os.path.join(args.checkpoint_dir, f)))
            parser.error(f"argument --checkpoint-files must name weight files in --checkpoint-dir; '{name}' is not a file in "
                         f"'{args.checkpoint_dir}', which holds {files[:12]}{' ...' if len(files) > 12 else ''}")
    named = {os.path.realpath(os.path.join(args.checkpoint_dir, f)) for f in args.checkpoint_files or ()}
    if args.checkpoint_files and len(named) < len(args.checkpoint_files):
        parser.error(f"argument --checkpoint-files must name each file once; got {args.checkpoint_files}")
    if args.tokenizer is None and not os.path.isfile(os.path.join(args.checkpoint_dir, "tokenizer.model")):
        parser.error(f"argument --tokenizer is needed: the checkpoint folder '{args.checkpoint_dir}' holds no tokenizer.model"
                     + _tokenizer_beside_adapter(args.adapter_dir))
    if args.tokenizer is not None and not os.path.isfile(args.tokenizer):
        parser.error(f"argument --tokenizer must be a SentencePiece tokenizer.model file; '{args.tokenizer}' "
                     + ("is a folder" if os.path.isdir(args.tokenizer) else "does not exist"))
    if args.adapter_dir is not None and not os.path.isdir(args.adapter_dir):
        parser.error(f"argument --adapter-dir must be a PEFT adapter folder; '{args.adapter_dir}' "
                     + ("is a file" if os.path.exists(args.adapter_dir) else "does not exist"))
    args.prompt = [recovered_utf8(text) for text in args.prompt]  # (UTF-8 read under an ASCII locale)
    args.input = recovered_utf8(args.input)
    for flag, texts in (("--prompt", args.prompt), ("--input", [args.input])):
        for text in texts:
            bad = lone_surrogate_at(text)
            if bad is not None:  # bytes that are not UTF-8 reach Python as lone surrogates (surrogateescape)
                byte = f" (the byte 0x{ord(text[bad]) - 0xDC00:02x})" if "\udc80" <= text[bad] <= "\udcff" else ""
                parser.error(f"argument {flag} must be UTF-8 text; got {text[:bad]!r} followed by a character that is not{byte}")
    if sys.stdout is None:
        parser.error("standard output is closed: there is nowhere to write the text (run without '>&-')")
    if args.input and args.template == "none":
        parser.error("argument --input needs --template alpaca or llama2_chat: only the Alpaca prompt has an input field")
    if not 0 <= args.seed < 2**63:
        parser.error(f"argument --seed must be in [0, 2**63); got {args.seed}")
    if args.max_new_tokens < 1:
        parser.error(f"argument --max-new-tokens must be >= 1; got {args.max_new_tokens}")
    if not (0 <= args.temperature < math.inf):  # also refuses nan
        parser.error(f"argument --temperature must be finite and >= 0; got {args.temperature}")
    if args.top_k < 0:
        parser.error(f"argument --top-k must be >= 0; got {args.top_k}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        parser.error(f"argument --device must be cpu, cuda or cuda:N; got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"argument --device: {args.device} was asked for but torch sees no CUDA GPU")
    from qlora_ext.checkpoint.merged_adapter import TRAINING_CONFIG_FILE, refuse_adapter_merged_into

    if args.adapter_dir is not None:
        try:
            refuse_adapter_merged_into(args.checkpoint_dir, args.adapter_dir, "argument --adapter-dir", args.checkpoint_files)
        except ValueError as e:
            parser.error(str(e))
        except OSError:  # (a folder that cannot be read: the adapter's own checks below name it)
            pass
        lacks = _adapter_files_missing(args.adapter_dir)
        if lacks:
            parser.error(f"argument --adapter-dir must be a PEFT adapter folder (adapter_config.json and adapter_model.safetensors "
                         f"or .bin); '{args.adapter_dir}' has no {lacks}{_adapter_hint(args.adapter_dir, args.checkpoint_dir)}")
    if args.adapter_dir is not None and os.path.isfile(os.path.join(args.checkpoint_dir, TRAINING_CONFIG_FILE)):
        _warn_if_merged_elsewhere(args.checkpoint_dir, args.adapter_dir)
    if args.quantize_base and args.adapter_dir is None:
        parser.error("argument --quantize-base needs --adapter-dir: only the adapted linears are kept in NF4")
    return args


def _tokenizer_beside_adapter(adapter_dir: str | None) -> str:
    """A hint naming the tokenizer.model kept beside an adapter (in its folder, or in the training
    checkpoint folder it sits in, as the trainer writes them); "" when there is none."""
    if adapter_dir is None:
        return ""
    for folder in (adapter_dir, os.path.dirname(os.path.abspath(adapter_dir))):
        path = os.path.join(folder, "tokenizer.model")
        if os.path.isfile(path):
            return f"; the adapter's training run kept its tokenizer: pass --tokenizer {path}"
    return ""


def _adapter_files_missing(folder: str) -> str:
    """What a PEFT adapter folder lacks ("" when it has its config and a weights file)."""
    from qlora_ext.checkpoint.peft_adapter import ADAPTER_CONFIG_NAME, adapter_weights_path

    lacks = [] if os.path.isfile(os.path.join(folder, ADAPTER_CONFIG_NAME)) else [ADAPTER_CONFIG_NAME]
    try:
        adapter_weights_path(folder)
    except FileNotFoundError:
        lacks.append("adapter weights")
    return " nor ".join(lacks)


def _adapter_hint(adapter_dir: str, checkpoint_dir: str) -> str:
    """Where a folder without an adapter has one: in a subfolder; or that it is a model checkpoint
    (not already given as --checkpoint-dir)."""
    from qlora_ext.checkpoint.peft_adapter import adapter_in_subfolder, torchtune_adapter_hint

    inner = adapter_in_subfolder(adapter_dir)
    if inner:
        return f"; {inner}"
    torchtune_hint = torchtune_adapter_hint(adapter_dir)
    if torchtune_hint:
        return torchtune_hint
    is_model = any(os.path.isfile(os.path.join(adapter_dir, name)) for name in ("config.json", "params.json"))
    if is_model and not os.path.samefile(adapter_dir, checkpoint_dir):
        return " (it holds a model checkpoint: pass it as --checkpoint-dir)"
    return ""


def _what_it_holds(folder: str) -> str:
    """A hint for a folder that is no checkpoint: a PEFT adapter, or a run's checkpoint folders."""
    from qlora_ext.checkpoint.peft_adapter import ADAPTER_CONFIG_NAME

    if os.path.isfile(os.path.join(folder, ADAPTER_CONFIG_NAME)):
        return (" (it holds a PEFT adapter: pass the base model's folder as --checkpoint-dir and this one as "
                "--adapter-dir)")
    inner = sorted(name for name in os.listdir(folder) if os.path.isfile(os.path.join(folder, name, "config.json")))
    return f" (checkpoint folders inside it: {', '.join(inner[:8])}{' ...' if len(inner) > 8 else ''})" if inner else ""


def _warn_if_merged_elsewhere(checkpoint_dir: str, adapter_dir: str) -> None:
    """A trainer's checkpoint folder holds a model with that run's adapter merged; an adapter
    trained on another base would be applied on top of it. Warn (the folder may have been copied)."""
    from qlora_ext.checkpoint.config import read_json
    from qlora_ext.checkpoint.peft_adapter import ADAPTER_CONFIG_NAME

    try:
        base = read_json(os.path.join(adapter_dir, ADAPTER_CONFIG_NAME)).get("base_model_name_or_path")
    except (OSError, ValueError):  # the adapter's own loading names what is wrong with it
        return
    if isinstance(base, str) and os.path.isdir(base) and os.path.samefile(base, checkpoint_dir):
        return
    print(f"warning: --checkpoint-dir '{checkpoint_dir}' is a trainer checkpoint (its run's adapter is merged into "
          f"its model) and the adapter in --adapter-dir was trained on {base or 'an unrecorded base'!r}: it is "
          "applied on top of the already adapted model", file=sys.stderr)


class _UsageError(ValueError):
    """An argument that only the loaded model shows unusable (a prompt too long for it): exit
    status 2, as argparse's for the arguments it checks itself."""


def main(argv: list[str] | None = None) -> int:
    tolerant_console()
    args = parse_args(argv)
    try:
        return _run(args)
    except BrokenPipeError:  # stdout's reader is gone (`| head -n 1`): nothing more to say to anyone
        return stdout_reader_gone()
    except _UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        # A bad path, an unreadable or unusable checkpoint, an output that cannot be written: the
        # user's to fix. Say what, skip the traceback.
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C while loading or generating: nothing to keep, no traceback
        print("\nInterrupted (Ctrl-C).", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from qlora_ext.generation import generate
    from qlora_ext.models.llama2 import llama2_from_checkpoint, llama2_tokenizer

    tokenizer_path = args.tokenizer or os.path.join(args.checkpoint_dir, "tokenizer.model")
    whose_tokenizer = "argument --tokenizer" if args.tokenizer is not None else "the checkpoint folder's tokenizer.model"
    try:
        tokenizer = llama2_tokenizer(tokenizer_path)
    except ValueError as e:  # not a SentencePiece model (a HF tokenizer.json, say): named as the flag
        api_argument = "Llama2Tokenizer: argument 'path'"
        text = str(e)
        raise _UsageError(whose_tokenizer + text[len(api_argument):] if text.startswith(api_argument) else f"{whose_tokenizer}: {text}") from None
    dtype = HF_DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if str(args.device).startswith("cuda") else torch.float32)

    _refuse_a_model_that_cannot_fit(args, dtype)
    start = time.perf_counter()
    model = llama2_from_checkpoint(
        args.checkpoint_dir,
        adapter_dir=args.adapter_dir,
        checkpoint_files=args.checkpoint_files,
        quantize_base=args.quantize_base,
        device=args.device,
        dtype=dtype,
    ).eval()
    if model.tok_embeddings.num_embeddings < tokenizer.vocab_size:
        raise _UsageError(
            f"{whose_tokenizer} must be the model's: {tokenizer_path} has {tokenizer.vocab_size} pieces but the model in "
            f"{args.checkpoint_dir} only {model.tok_embeddings.num_embeddings} embeddings; pass the matching --tokenizer"
        )
    loaded = time.perf_counter()

    if args.template == "none":
        prompts = [tokenizer.encode(text, add_bos=True, add_eos=False) for text in args.prompt]
    else:  # the prompt's tokens exactly as the trainer makes them
        from qlora_ext.training.data import prompt_tokens

        prompts = [prompt_tokens(tokenizer, {"instruction": text, "input": args.input}, args.template) for text in args.prompt]
    longest = max(len(p) for p in prompts)
    if longest >= model.max_seq_len:
        raise _UsageError(
            f"argument --prompt must leave room for new tokens: it is {longest} tokens (with BOS) and "
            f"the model's max_seq_len is {model.max_seq_len}; shorten it"
        )
    # Each prompt gets --max-new-tokens, or what fits after it within max_seq_len: prompts of one
    # room decode in one batch, so a long prompt does not cut the others' answers short.
    rooms: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        room = min(args.max_new_tokens, model.max_seq_len - len(prompt))
        rooms.setdefault(room, []).append(i)
        if room < args.max_new_tokens:
            print(f"note: prompt {i + 1} is {len(prompt)} tokens: {room} new tokens fit within the model's max_seq_len "
                  f"{model.max_seq_len}, not --max-new-tokens {args.max_new_tokens}", file=sys.stderr)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    news: list[list[int]] = [[] for _ in prompts]
    for room, rows in rooms.items():  # usually one batch
        tokens = generate(
            model,
            [prompts[i] for i in rows],
            max_new_tokens=room,
            temperature=args.temperature,
            top_k=args.top_k or None,
            stop_tokens=tokenizer.stop_tokens,
            pad_id=tokenizer.pad_id,
            generator=generator,
            vocab_limit=tokenizer.vocab_size,  # a padded embedding's extra ids would not decode
        )
        steps = tokens.shape[1] - max(len(prompts[i]) for i in rows)  # row i's new tokens: [len(prompt i), + steps)
        for i, row in zip(rows, tokens.tolist()):
            news[i] = row[len(prompts[i]) : len(prompts[i]) + steps]
    done = time.perf_counter()
    texts, count = [], 0
    for prompt, new in zip(prompts, news):
        ends = [i for i, t in enumerate(new) if t in tokenizer.stop_tokens]
        new = new[: ends[0]] if ends else new
        count += len(new)
        # Decode prompt and continuation together: SentencePiece drops a leading space when
        # decoding the continuation on its own.
        texts.append(tokenizer.decode(prompt + new))
    try:
        print("\n---\n".join(texts), flush=True)  # (flushed here: a failed write is then named, not lost at exit)
    except BrokenPipeError:
        raise
    except OSError as e:
        raise OSError(f"cannot write the generated text to standard output: {e.strerror or e}") from None
    try:  # only a report: the text is out
        print(f"loaded in {loaded - start:.1f} s; generated {count} tokens in {done - loaded:.2f} s "
              f"({count / max(done - loaded, 1e-9):.1f} tokens/s)", file=sys.stderr, flush=True)
    except OSError:  # (a closed stderr is /dev/null: tolerant_console)
        pass
    return 0


def _refuse_a_model_that_cannot_fit(args: argparse.Namespace, dtype: torch.dtype) -> None:
    """Stops before loading a dense model larger than the memory available on its device (a 7B
    in float32, the CPU default, is 27 GB): the operating system would kill the process without a
    word. With --quantize-base the adapted linears are NF4, so the dense size overstates it: no
    check then.

    Raises:
        ValueError: the model's dense weights at ``dtype`` exceed the available memory.
    """
    if args.quantize_base:
        return
    from qlora_ext.checkpoint.load import read_checkpoint_config
    from qlora_ext.models.llama2 import llama2

    available = _available_bytes(torch.device(args.device))
    if available is None:
        return
    with torch.device("meta"):
        count = sum(p.numel() for p in llama2(**read_checkpoint_config(args.checkpoint_dir, args.checkpoint_files).builder_kwargs()).parameters())
    need = count * dtype.itemsize
    if need <= available:
        return
    smaller = [f"--dtype {name} ({count * d.itemsize / 1e9:.1f} GB)" for name, d in sorted(HF_DTYPES.items())
               if d.itemsize < dtype.itemsize and (args.device != "cpu" or d != torch.float16)]
    raise ValueError(
        f"the model in --checkpoint-dir has {count / 1e9:.2f} B parameters: {need / 1e9:.1f} GB in {str(dtype).removeprefix('torch.')}, "
        f"more than the {available / 1e9:.1f} GB of memory available on {args.device}; "
        + (f"pass {' or '.join(smaller)}, or --quantize-base" if smaller else "it fits at no --dtype; pass --quantize-base")
        + " with the --adapter-dir of a QLoRA run"
    )


def _available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device``: the GPU's free memory, or the CPU's MemAvailable (Linux); None
    where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


if __name__ == "__main__":
    sys.exit(main())

