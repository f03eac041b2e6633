"""The seed tutorial's QLoRA run of Llama-2-7B on one GPU, next to the seed's own figures: memory
after init (issue 4's GPU target), training it/s eager and compiled and peak memory during
training (issue 7's GPU targets), and the loss going down (issue 6).

    python bench/model_seed_7b.py --device cuda [--quick] [--out DIR]
    python bench/model_seed_7b.py --smoke          # the same code on the tiny config, on the CPU

The model is ``qlora_llama2_7b`` as the seed tutorial's config (torchtune 0.1/0.2's
``7B_qlora_single_device``, which made its figures) builds it: LoRA r=8, alpha=16 on q_proj, k_proj,
v_proj, output_proj and the MLP, so every linear of the layers is NF4 (dropout 0 here, where those
builders used 0.05: random data learns nothing from it). It has random weights, bf16
compute with fp32 adapters, activation checkpointing, fused AdamW at lr 3e-4, and the trainer's
loss. Each step is one batch of 2 x ``--seq`` tokens (default 512, longer than most Alpaca
examples) and counts as one "it", as in the seed's progress bar. The batch is the same every step,
so the loss must fall. Eager and compiled (``compile=True``: each layer under
``torch.compile(fullgraph=True)``) each run in their own process, so each peak is its own.

The seed measured 9.13 GB reserved after init, 9.29 GB reserved during training, 1.15 it/s eager
and 3.95 it/s compiled, on its own GPU and data: a reference, not a same-machine comparison.
Targets: <= 4.5 GB after init, <= 7 GB during training. By count, this config's parameters take
3.91 GB. The bundled config (torchtune 0.4 to 0.6's file) leaves k_proj without LoRA, and our
builders, as the tutorial's, keep a linear without LoRA dense: its parameters take 4.73 GB (k_proj
1.07 GB in bf16), past the after-init target before anything else is allocated, where torchtune
0.3+ stores such a linear in NF4 too. These are GPU figures, so a full or quick run on a CPU only
says so.
Results: a table, and ``OUT/model_seed_7b.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GB = 1e9
ARCH_7B = dict(vocab_size=32_000, num_layers=32, num_heads=32, num_kv_heads=32, embed_dim=4096, intermediate_dim=11008)
SEED_LORA_ATTN = ("q_proj", "k_proj", "v_proj", "output_proj")  # + the MLP: the seed tutorial's config
SEED = {"reserved_after_init_gb": 9.13, "reserved_training_gb": 9.29, "it_per_s": {"eager": 1.15, "compiled": 3.95}}
TARGETS = {"reserved_after_init_gb": 4.5, "reserved_training_gb": 7.0}
CASES = ("eager", "compiled")


def harness_targets(case: str, result: dict) -> list[dict]:
    """The memory targets of one case as the bench harness reads a script's targets."""
    return [{"name": f"seed 7B {case}: {key.removesuffix('_gb')}", "value": result[key], "sense": "<=", "limit": limit, "unit": " GB"}
            for key, limit in TARGETS.items()]


def worker(case: str, device_name: str, arch_name: str, seq: int, warmup: int, steps: int) -> dict:
    """One case in this process: build, then time the training steps."""
    sys.path.append(str(REPO))  # (after an installed qlora_ext, as the harness runs it: bench/model.py)
    sys.path.insert(0, str(REPO / "bench"))
    import torch

    from model_train import CONFIGS, qlora_ext_step, timed_steps

    device = torch.device(device_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    arch = ARCH_7B if arch_name == "7b" else CONFIGS[arch_name]
    torch.manual_seed(0)  # the same weights and batch in both cases
    if device.type == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    step, _ = qlora_ext_step(arch, 2, seq, device, dtype, compile=case == "compiled", lora_attn_modules=SEED_LORA_ATTN,
                             activation_checkpointing=True, lr=3e-4)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out: dict = {"case": case, "arch": arch_name, "seq": seq, "build_s": time.perf_counter() - start}
    if device.type == "cuda":
        out["reserved_after_init_gb"] = torch.cuda.max_memory_reserved(device) / GB
        out["allocated_after_init_gb"] = torch.cuda.max_memory_allocated(device) / GB
        torch.cuda.reset_peak_memory_stats(device)
    losses = []

    def recorded_step():
        losses.append(step())

    first_step_s, times = timed_steps(recorded_step, warmup, steps, device)
    median = statistics.median(times)
    out.update(first_step_s=first_step_s, step_s=times, step_s_median=median, it_per_s=1.0 / median,
               tokens_per_s=2 * seq / median, losses=[float(x) for x in losses])
    if device.type == "cuda":
        out["reserved_training_gb"] = torch.cuda.max_memory_reserved(device) / GB
        out["allocated_training_gb"] = torch.cuda.max_memory_allocated(device) / GB
    return out


def run_case(case: str, args: argparse.Namespace, arch_name: str, warmup: int, steps: int) -> dict:
    from model_build import run_worker  # run as a script: bench/ is on sys.path

    return run_worker(__file__, case, ["--device", args.device, "--arch", arch_name, "--seq", str(args.seq),
                                       "--warmup", str(warmup), "--steps", str(steps)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="fewer timed steps")
    parser.add_argument("--smoke", action="store_true", help="the tiny config, 1 step each: proves the script works")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence (batch 2)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "tmp"), help="folder for model_seed_7b.json")
    parser.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--arch", default="7b", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=10, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.device, args.arch, args.seq, args.warmup, args.steps)))
        return 0
    if args.seq < 2:
        parser.error(f"argument --seq must be >= 2; got {args.seq}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("argument --device: cuda was asked for but no CUDA GPU is available")
    elif not args.smoke:
        print("model_seed_7b: the seed's figures are GPU figures; on a CPU there is nothing to compare (run --smoke "
              "to check the script, --device cuda on a GPU)")
        return 0
    arch_name, warmup, steps = ("tiny", 1, 1) if args.smoke else ("7b", 2, 5 if args.quick else 10)
    results = {"device": args.device, "arch": arch_name, "seq": args.seq, "batch": 2, "lora_attn_modules": list(SEED_LORA_ATTN),
               "apply_lora_to_mlp": True, "seed": SEED, "memory_limits_gb": TARGETS, "cases": {},
               "targets": []}  # for the bench harness (bench/model.py): its [MET]/[MISSED] lines
    print(f"{'case':9} {'build (s)':>9} {'first step (s)':>14} {'it/s':>7} {'seed it/s':>9} {'tokens/s':>9} "
          f"{'GB after init':>13} {'GB training':>11} {'loss first -> last':>19}")
    missed = []
    for case in CASES:
        r = results["cases"][case] = run_case(case, args, arch_name, warmup, steps)
        gb_init, gb_train = r.get("reserved_after_init_gb", float("nan")), r.get("reserved_training_gb", float("nan"))
        print(f"{case:9} {r['build_s']:9.1f} {r['first_step_s']:14.1f} {r['it_per_s']:7.2f} {SEED['it_per_s'][case]:9.2f} "
              f"{r['tokens_per_s']:9.0f} {gb_init:13.2f} {gb_train:11.2f} {r['losses'][0]:9.4f} -> {r['losses'][-1]:.4f}")
        if args.device == "cuda":
            results["targets"] += harness_targets(case, r)
            for key, limit in TARGETS.items():
                if not r[key] <= limit:
                    missed.append(f"{case}: {key} {r[key]:.2f} GB > {limit} GB")
    if args.device == "cuda":
        for line in missed or ["both memory targets met (<= 4.5 GB reserved after init, <= 7 GB during training)"]:
            print(("MISSED " if missed else "") + line)
        for case in CASES:
            r = results["cases"][case]
            print(f"{case}: {r['it_per_s'] / SEED['it_per_s'][case]:.2f}x the seed's {SEED['it_per_s'][case]} it/s "
                  f"(its GPU and data); loss {'fell' if r['losses'][-1] < r['losses'][0] else 'DID NOT FALL'} over "
                  f"{len(r['losses'])} steps on the repeated batch")
    path = out_dir / "model_seed_7b.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
