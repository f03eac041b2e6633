"""Model-level QLoRA training benchmark: tokens/s and peak memory of full training steps
(forward, backward, AdamW on the adapters) for a tiny and a mid-size (~130M) Llama-2 config,
qlora_ext side by side with HF transformers + PEFT + bitsandbytes 4-bit doing the same steps.

    python bench/model_train.py                    # both configs, both stacks, prints ratios
    python bench/model_train.py --configs tiny --steps 5 --profile
    python bench/model_train.py --device cuda      # on a GPU (bf16 compute there)

Same work on both sides: batch 2 x 256 tokens, LoRA r=8 alpha=16 on q/k/v/o and the MLP, frozen
NF4 base with double-quantized scales, fp32 compute on CPU. Each stack runs in its own process so
peak memory is its own. HF+PEFT+bnb rows are skipped with the reason when not installed
(``pip install transformers peft bitsandbytes``). Results: a table, and JSON in ``--out``
(default ``bench/results/model_train.json``). Also runs under the bench harness as a script
(``--device D [--quick|--smoke] --out DIR``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {
    # dim 256, 4 layers (the package's tiny Llama-2: 4 heads, 2 kv heads, MLP 768), Llama-2 vocab
    "tiny": dict(vocab_size=32_000, num_layers=4, num_heads=4, num_kv_heads=2, embed_dim=256, intermediate_dim=768),
    # ~134M parameters: dim 768, 12 layers, 12 heads, MLP 2048, vocab 32000
    "mid": dict(vocab_size=32_000, num_layers=12, num_heads=12, num_kv_heads=12, embed_dim=768, intermediate_dim=2048),
}
TARGETS = {"tiny": 2.0, "mid": 1.6}  # tokens/s vs HF+PEFT+bnb
LORA = dict(rank=8, alpha=16.0)
MAX_SEQ_LEN = 512


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB -> GiB (Linux)


def _timed_steps(step, n_warmup: int, n_steps: int, device: torch.device) -> list[float]:
    for _ in range(n_warmup):
        step()
    times = []
    for _ in range(n_steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times


def _ours(arch: dict, batch: int, seq: int, device: torch.device, dtype: torch.dtype):
    """A step function of qlora_ext: qlora_llama2 builder, our NF4 linear, fp32 adapters."""
    sys.path.insert(0, str(REPO))
    from qlora_ext.models.llama2 import lora_llama2
    from qlora_ext.modules.peft import get_adapter_params, set_trainable_params
    from qlora_ext.training.steps import autocast, fused_output_weight, token_loss_sum

    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = lora_llama2(
            ["q_proj", "k_proj", "v_proj", "output_proj"], True, False, **arch, max_seq_len=MAX_SEQ_LEN,
            lora_rank=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0, quantize_base=True,
        )
    torch.set_default_dtype(torch.float32)
    adapter = get_adapter_params(model)
    set_trainable_params(model, adapter)
    for p in adapter.values():
        p.data = p.data.float()
    opt = torch.optim.AdamW(list(adapter.values()), lr=1e-4, fused=device.type == "cuda")
    tokens = torch.randint(0, arch["vocab_size"], (batch, seq), device=device)
    output_weight = fused_output_weight(model)  # the frozen output projection is applied by the loss
    model.skip_output_layer = output_weight is not None

    def step():  # the trainer's step: qlora_ext.finetune's loss and precision handling
        with autocast(device, dtype):
            outputs = model(tokens)
        loss = token_loss_sum(outputs, tokens, output_weight) / (tokens.numel() - tokens.shape[0])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model


def _hf(arch: dict, batch: int, seq: int, device: torch.device, dtype: torch.dtype):
    """The same step with transformers' Llama, bitsandbytes NF4 (double quant) and PEFT LoRA."""
    import transformers
    from peft import LoraConfig, get_peft_model

    config = transformers.LlamaConfig(
        vocab_size=arch["vocab_size"], hidden_size=arch["embed_dim"], intermediate_size=arch["intermediate_dim"],
        num_hidden_layers=arch["num_layers"], num_attention_heads=arch["num_heads"],
        num_key_value_heads=arch["num_kv_heads"], max_position_embeddings=MAX_SEQ_LEN, torch_dtype=dtype,
    )
    with tempfile.TemporaryDirectory() as tmp:
        transformers.LlamaForCausalLM(config).to(dtype).save_pretrained(tmp)
        quant = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        model = transformers.LlamaForCausalLM.from_pretrained(tmp, quantization_config=quant, device_map=str(device), torch_dtype=dtype)
    lora = LoraConfig(
        r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    model = get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    tokens = torch.randint(0, arch["vocab_size"], (batch, seq), device=device)

    def step():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model


def _worker(stack: str, name: str, args: dict, queue) -> None:
    try:
        if args.get("threads"):
            torch.set_num_threads(args["threads"])
        device = torch.device(args["device"])
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        arch = CONFIGS[name]
        build = _ours if stack == "qlora_ext" else _hf
        step, model = build(arch, args["batch"], args["seq"], device, dtype)
        times = _timed_steps(step, args["warmup"], args["steps"], device)
        median = sorted(times)[len(times) // 2]
        result = {
            "tokens_per_s": args["batch"] * args["seq"] / median,
            "step_s_median": median,
            "step_s": times,
            "peak_memory_gb": _peak_memory_gb(device),
        }
        if args.get("profile") and stack == "qlora_ext":
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities) as prof:
                for _ in range(2):
                    step()
            sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            result["profile"] = prof.key_averages().table(sort_by=sort, row_limit=18)
        queue.put(("ok", result))
    except ImportError as e:
        queue.put(("skipped", f"{type(e).__name__}: {e} (pip install transformers peft bitsandbytes)"))
    except Exception as e:  # noqa: BLE001  (a failure of the other stack is reported, not fatal)
        queue.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"))


def run_one(stack: str, name: str, args: dict) -> tuple[str, object]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(stack, name, args, queue))
    proc.start()
    try:
        status, payload = queue.get(timeout=args["timeout"])
    except Exception:  # noqa: BLE001
        status, payload = "error", f"no result within {args['timeout']} s (exit code {proc.exitcode})"
    proc.join(timeout=10)
    if proc.is_alive():
        proc.kill()
    return status, payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--stacks", nargs="+", default=["qlora_ext", "hf_peft_bnb"], choices=["qlora_ext", "hf_peft_bnb"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=6, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--smoke", action="store_true", help="tiny config, 1 step: checks it runs")
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of qlora_ext's steps")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for model_train.json")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per stack and config")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads for both stacks (default: torch's)")
    a = parser.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda was asked for but no CUDA GPU is available")
    if a.smoke:
        a.configs, a.steps, a.warmup = ["tiny"], 1, 1
    elif a.quick:
        a.steps, a.warmup = 3, 1
    args = dict(device=a.device, steps=a.steps, warmup=a.warmup, batch=a.batch, seq=a.seq, profile=a.profile, timeout=a.timeout,
                threads=a.threads)

    results: dict = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                    "threads": a.threads or torch.get_num_threads(), "device": a.device,
                    "load_average_at_start": os.getloadavg()},
        "work": {"batch": a.batch, "seq": a.seq, "lora_rank": LORA["rank"], "lora_targets": "q,k,v,o + MLP",
                 "compute": "bf16" if a.device == "cuda" else "fp32", "steps": a.steps, "warmup": a.warmup},
        "configs": {},
    }
    print(f"{'config':6} {'stack':12} {'tokens/s':>10} {'step (s)':>9} {'peak mem (GB)':>14}")
    for name in a.configs:
        row = results["configs"][name] = {"arch": CONFIGS[name]}
        for stack in a.stacks:
            status, payload = run_one(stack, name, args)
            if status != "ok":
                row[stack] = {"status": status, "reason": payload}
                print(f"{name:6} {stack:12} {status}: {str(payload).splitlines()[0]}")
                if stack == "qlora_ext":
                    print(payload, file=sys.stderr)
                    return 1
                continue
            profile_table = payload.pop("profile", None)
            row[stack] = payload
            print(f"{name:6} {stack:12} {payload['tokens_per_s']:10.0f} {payload['step_s_median']:9.3f} {payload['peak_memory_gb']:14.2f}")
            if profile_table:
                print(profile_table)
        ours, theirs = row.get("qlora_ext", {}), row.get("hf_peft_bnb", {})
        if "tokens_per_s" in ours and "tokens_per_s" in theirs:
            ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
            row["ratio_vs_hf_peft_bnb"] = ratio
            row["target"] = TARGETS[name]
            verdict = "meets" if ratio >= TARGETS[name] else "MISSES"
            print(f"{name:6} ratio qlora_ext / hf_peft_bnb = {ratio:.2f}x ({verdict} the {TARGETS[name]}x target)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model_train.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
