"""Build time and peak memory of the QLoRA Llama-2 7B model (issue 4's targets).

    python bench/model_build.py [--device cpu|cuda] [--quick|--smoke] [--out DIR]

Builds ``qlora_llama2_7b(["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True)``
with random weights, each build in a fresh process so its peak is its own. CPU: peak resident
memory (Linux VmHWM, reset after imports) and wall time; targets < 5.5 GB and < 90 s for the fp32
build. CUDA: peak reserved memory after init in bf16 (the seed tutorial measured 9.13 GB; target
<= 4.5 GB). For scale, the same weights dense would take 27.0 GB (fp32) / 13.5 GB (bf16).
Results: a table on stdout and ``OUT/model_build.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB = 1e9
ATTN = ["q_proj", "k_proj", "v_proj", "output_proj"]
# case -> (builder, default dtype, device mode); "meta" builds allocate nothing (time only).
CASES = {
    "qlora_7b_fp32": ("qlora_llama2_7b", "float32", "real"),
    "qlora_7b_bf16": ("qlora_llama2_7b", "bfloat16", "real"),
    "qlora_7b_meta": ("qlora_llama2_7b", "float32", "meta"),
    "qlora_tiny_fp32": ("qlora_llama2_tiny", "float32", "real"),
}
TARGETS = {"qlora_7b_fp32": {"peak_gb": 5.5, "seconds": 90.0}}
GPU_TARGETS = {"qlora_7b_bf16": {"peak_gb": 4.5}}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return re.search(r"model name\s*:\s*(.+)", f.read()).group(1).strip()
    except (OSError, AttributeError):
        return platform.processor() or platform.machine()


def _proc_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+) kB", f.read()).group(1)) * 1024


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(case: str, device: str) -> dict:
    """Runs one build in this process and returns its measurements."""
    sys.path.append(REPO)  # (after an installed qlora_ext, as the harness runs it: bench/model.py)
    import gc

    import torch

    import qlora_ext.models.llama2 as llama2
    from qlora_ext import NF4Tensor

    builder_name, dtype_name, mode = CASES[case]
    builder = getattr(llama2, builder_name)
    gc.collect()
    if device == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS, so the peak below is this build's
    rss_before = _proc_bytes("VmRSS")
    torch.set_default_dtype(getattr(torch, dtype_name))
    cpu_start = _cpu_seconds()
    start = time.perf_counter()
    with torch.device("meta" if mode == "meta" else device):
        model = builder(ATTN, apply_lora_to_mlp=True)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    cpu_seconds = _cpu_seconds() - cpu_start
    nf4 = [p for p in model.parameters() if isinstance(p, NF4Tensor)]
    out = {
        "case": case,
        "device": device if mode != "meta" else "meta",
        "seconds": seconds,
        # CPU time, user + system over all threads: unlike wall time, other processes on a
        # shared machine barely change it.
        "cpu_seconds": cpu_seconds,
        "params": sum(p.numel() for p in model.parameters()),
        "nf4_params": sum(p.numel() for p in nf4),
        "model_bytes": sum(p.quantized_nbytes if isinstance(p, NF4Tensor) else p.numel() * p.element_size() for p in model.parameters()),
    }
    if device == "cuda":
        out["peak_reserved"] = torch.cuda.max_memory_reserved()
        out["peak_allocated"] = torch.cuda.max_memory_allocated()
    else:
        out["peak_rss"] = _proc_bytes("VmHWM")
        out["peak_rss_delta"] = out["peak_rss"] - rss_before
    return out


def run_worker(script: str, case: str, worker_args: list[str]) -> dict:
    """Runs ``script --worker case *worker_args`` in a fresh process (its memory peaks are its
    own) and returns the JSON object its last line of output prints."""
    proc = subprocess.run(
        [sys.executable, os.path.abspath(script), "--worker", case, *worker_args], cwd=REPO, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="the target case only")
    parser.add_argument("--smoke", action="store_true", help="a tiny model, to prove the script works")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results", "tmp"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.device)))
        return 0

    if args.smoke:
        cases = ["qlora_tiny_fp32"]
    elif args.device == "cuda":
        cases = ["qlora_7b_bf16"] if args.quick else ["qlora_7b_bf16", "qlora_7b_fp32"]
    else:
        cases = ["qlora_7b_fp32"] if args.quick else ["qlora_7b_fp32", "qlora_7b_bf16", "qlora_7b_meta"]
    targets = GPU_TARGETS if args.device == "cuda" else TARGETS
    peak_key = "peak_reserved" if args.device == "cuda" else "peak_rss"
    rows, failed, harness_targets = [], [], []
    for case in cases:
        row = run_worker(__file__, case, ["--device", args.device])
        for name, limit in targets.get(case, {}).items():
            value = row["seconds"] if name == "seconds" else row.get(peak_key, 0) / GB
            row[f"target_{name}"] = limit
            row[f"pass_{name}"] = value < limit
            what = "build time" if name == "seconds" else ("peak reserved" if args.device == "cuda" else "peak resident")
            harness_targets.append({"name": f"{case}: {what}", "value": value, "sense": "<=", "limit": limit,
                                    "unit": " s" if name == "seconds" else " GB"})
            if not row[f"pass_{name}"] and not args.smoke:
                failed.append(f"{case}: {name} {value:.2f} >= {limit}")
        rows.append(row)

    print(f"model build, {cpu_name()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print(f"{'case':<16} {'device':<6} {'seconds':>8} {'cpu s':>7} {'peak GB':>8} {'model GB':>9} {'NF4 params':>11}  targets")
    for r in rows:
        peak = r.get(peak_key)
        checks = ", ".join(
            f"{k[5:]} {'ok' if v else 'FAIL'} (< {r['target_' + k[5:]]})" for k, v in r.items() if k.startswith("pass_")
        )
        peak_text = f"{peak / GB:8.2f}" if peak is not None and r["device"] != "meta" else f"{'-':>8}"
        print(f"{r['case']:<16} {r['device']:<6} {r['seconds']:8.1f} {r['cpu_seconds']:7.1f} {peak_text} {r['model_bytes'] / GB:9.2f} {r['nf4_params'] / r['params']:10.1%}  {checks}")
    os.makedirs(args.out, exist_ok=True)
    result = {
        "benchmark": "model_build",
        "machine": {"processor": cpu_name(), "cores": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]},
        "rows": rows,
        "failed_targets": failed,
        "targets": harness_targets,  # for the bench harness (bench/model.py): [MET]/[MISSED] lines
    }
    with open(os.path.join(args.out, "model_build.json"), "w") as f:
        json.dump(result, f, indent=2)
    if failed:
        print("targets missed: " + "; ".join(failed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
