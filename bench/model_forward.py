"""Forward throughput of Llama-2 7B with NF4 weights on CPU (random weights), for a short prompt.

    python bench/model_forward.py [--device cpu|cuda] [--quick|--smoke] [--out DIR]

Model: ``qlora_llama2_7b`` with LoRA (rank 8) on every linear, so every projection runs
``linear_nf4``; activations in fp32 on CPU, bf16 on CUDA. Measured: a 16-token prompt forward
(prefill, batch 1) and single-token decode steps with the KV cache. Each row's floor is the larger
of two: the time to read the weights once at the machine's measured copy bandwidth (decode is
memory-bound: every step reads all 3.9 GB), and the time of the row's FLOPs at the machine's
matrix rate (bench/flops.py; a 16-token prefill of 7B is 212 GFLOP, about a second on 2 CPU
cores in fp32); ``bound`` says which, ``vs floor`` = time / floor. Results: a table and
``OUT/model_forward.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(REPO)  # (after an installed qlora_ext, as the harness runs it: bench/model.py)

import torch

from bench import flops
from qlora_ext import NF4Tensor
from qlora_ext.models.llama2 import lora_llama2, qlora_llama2_7b

ALL = ["q_proj", "k_proj", "v_proj", "output_proj"]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_seconds(fn, reps: int, device: str) -> tuple[float, list[float]]:
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def _copy_bandwidth(device: str) -> float:
    """Bytes/s of a large copy (read + write), the memory bandwidth the floor uses."""
    src = torch.empty(256 * 2**20 // 4, device=device, dtype=torch.float32).uniform_()  # not the default dtype (bf16 on cuda)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds, _ = _median_seconds(lambda: dst.copy_(src), 5, device)
    return 2 * src.numel() * src.element_size() / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--smoke", action="store_true", help="a tiny model, to prove the script works")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results", "tmp"))
    parser.add_argument("--prompt-len", type=int, default=16)
    args = parser.parse_args()
    if args.prompt_len < 1:
        parser.error(f"argument --prompt-len must be >= 1; got {args.prompt_len}")
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    reps = 2 if args.smoke else (3 if args.quick else 5)
    steps = 4 if args.smoke or args.quick else 16

    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    start = time.perf_counter()
    with torch.device(device):
        if args.smoke:
            model = lora_llama2(ALL, True, True, vocab_size=512, num_layers=2, num_heads=4, num_kv_heads=4, embed_dim=256,
                                max_seq_len=256, lora_rank=8, lora_alpha=16, quantize_base=True)
            name = "tiny (2 layers, dim 256)"
        else:
            model = qlora_llama2_7b(ALL, apply_lora_to_mlp=True, apply_lora_to_output=True)
            name = "qlora_llama2_7b, NF4 on every linear"
    model.eval()
    build_seconds = time.perf_counter() - start
    weight_bytes = sum(p.quantized_nbytes if isinstance(p, NF4Tensor) else p.numel() * p.element_size() for p in model.parameters())
    # The embedding is read one row per token, not whole.
    read_bytes = weight_bytes - model.tok_embeddings.weight.numel() * model.tok_embeddings.weight.element_size()
    bandwidth = _copy_bandwidth(device)
    bytes_floor = read_bytes / bandwidth
    rate = flops.matrix_rate(torch.device(device))

    def floor_of(fn) -> tuple[float, str, int]:
        """(seconds, what bounds them, FLOPs) of the least time one call of fn can take."""
        n_flops = flops.count(fn)
        flop_floor = n_flops / rate["flops_per_s"]
        return (flop_floor, "FLOPs", n_flops) if flop_floor > bytes_floor else (bytes_floor, "bytes", n_flops)

    prompt = torch.randint(0, model.tok_embeddings.num_embeddings, (1, args.prompt_len), device=device)
    rows = []
    with torch.no_grad():
        model(prompt)  # warm-up
        prefill, prefill_all = _median_seconds(lambda: model(prompt), reps, device)
        floor, bound, n_flops = floor_of(lambda: model(prompt))
        rows.append(dict(what=f"prefill {args.prompt_len} tokens", seconds=prefill, all=prefill_all, tokens=args.prompt_len,
                         floor_seconds=floor, bound=bound, flops=n_flops))

        model.setup_caches(1, dtype, max_seq_len=args.prompt_len + steps + 1)
        model(prompt, input_pos=torch.arange(args.prompt_len, device=device))
        token = prompt[:, -1:]
        step_times = []
        for i in range(steps):
            pos = torch.tensor([args.prompt_len + i], device=device)
            seconds, _ = _median_seconds(lambda pos=pos: model(token, input_pos=pos), 1, device)
            step_times.append(seconds)
        pos = torch.tensor([args.prompt_len + steps], device=device)
        floor, bound, n_flops = floor_of(lambda: model(token, input_pos=pos))
        rows.append(dict(what="decode 1 token (KV cache)", seconds=statistics.median(step_times), all=step_times, tokens=1,
                         floor_seconds=floor, bound=bound, flops=n_flops))

    print(f"model forward: {name}, {device}, {dtype}; built in {build_seconds:.1f} s; weights {weight_bytes / 1e9:.2f} GB; "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; matrix rate {rate['flops_per_s'] / 1e9:.0f} GFLOP/s ({rate['how']}); "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"{'what':<28} {'ms':>9} {'tokens/s':>9} {'GFLOP':>7} {'floor ms':>9} {'bound':>6} {'vs floor':>9}")
    for r in rows:
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        print(f"{r['what']:<28} {r['seconds'] * 1e3:9.1f} {r['tokens_per_s']:9.2f} {r['flops'] / 1e9:7.1f} "
              f"{r['floor_seconds'] * 1e3:9.1f} {r['bound']:>6} {r['seconds'] / r['floor_seconds']:9.2f}")
    os.makedirs(args.out, exist_ok=True)
    result = dict(benchmark="model_forward", model=name, device=device, dtype=str(dtype), build_seconds=build_seconds,
                  weight_bytes=weight_bytes, copy_bandwidth=bandwidth, matrix_rate=rate, cores=os.cpu_count(), load_avg_1m=os.getloadavg()[0], rows=rows)
    with open(os.path.join(args.out, "model_forward.json"), "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
