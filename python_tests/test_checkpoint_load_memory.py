"""Memory-lean loading: a QLoRA model built on the meta device and filled from a full-precision
checkpoint never holds the checkpoint in memory. Each load runs in a fresh process whose peak
resident memory (Linux VmHWM, reset before the load) is compared with the checkpoint's size, for
sharded safetensors and for memory-mapped ``.bin`` files; afterwards no mapping of a checkpoint
file may stay resident (/proc/self/smaps), so no weight aliases the checkpoint files.
As in test_models_build_memory.py, glibc's mmap threshold is fixed at 1 MB so that this scaled-down
model's 4-11 MB tensors are allocated the way the 7B model's 64-180 MB ones always are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

_ARGS = "dict(vocab_size=256, num_layers=4, num_heads=8, num_kv_heads=8, embed_dim=1024, max_seq_len=64, intermediate_dim=2816)"

_WRITE = textwrap.dedent(
    f"""
    import glob, json, os, sys, torch
    from safetensors.torch import load_file
    from qlora_ext.checkpoint import save_hf_checkpoint
    from qlora_ext.models.llama2 import llama2
    root = sys.argv[1]
    save_hf_checkpoint(llama2(**{_ARGS}), os.path.join(root, "st"), max_shard_size="40MB")
    os.makedirs(os.path.join(root, "bin"))
    index = json.load(open(os.path.join(root, "st", "model.safetensors.index.json")))
    for path in glob.glob(os.path.join(root, "st", "model-*.safetensors")):
        torch.save(load_file(path), os.path.join(root, "bin", os.path.basename(path).replace("model-", "pytorch_model-").replace(".safetensors", ".bin")))
    index["weight_map"] = {{k: v.replace("model-", "pytorch_model-").replace(".safetensors", ".bin") for k, v in index["weight_map"].items()}}
    json.dump(index, open(os.path.join(root, "bin", "pytorch_model.bin.index.json"), "w"))
    os.link(os.path.join(root, "st", "config.json"), os.path.join(root, "bin", "config.json"))
    """
)

_LOAD = textwrap.dedent(
    f"""
    import gc, json, re, sys, torch
    from qlora_ext import NF4Tensor
    from qlora_ext.checkpoint import load_checkpoint
    from qlora_ext.models.llama2 import lora_llama2

    def status(key):
        return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

    def checkpoint_resident(folder):
        # Resident bytes of mappings of the checkpoint's own files (not of libraries paged in).
        total, inside = 0, False
        for line in open("/proc/self/smaps"):
            fields = line.split()
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                inside = len(fields) >= 6 and fields[5].startswith(folder)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
        return total

    with torch.device("meta"):
        model = lora_llama2(["q_proj", "k_proj", "v_proj", "output_proj"], True, **{_ARGS}, lora_rank=8, lora_alpha=16,
                            quantize_base=sys.argv[2] == "qlora")
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    load_checkpoint(model, sys.argv[1])
    peak = status("VmHWM") - before
    gc.collect()
    quantized = [m.weight for m in model.modules() if hasattr(m, "lora_a")]
    print(json.dumps(dict(
        peak=peak,
        checkpoint_mapped=checkpoint_resident(sys.argv[1]),
        full_precision=sum(w.numel() * 4 for w in quantized),
        nf4=sum(w.quantized_nbytes for w in quantized if isinstance(w, NF4Tensor)),
    )))
    """
)


def _python(script: str, *args: str) -> str:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("lean_load")
    _python(_WRITE, str(root))
    return root


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")
@pytest.mark.parametrize("layout", ["st", "bin"], ids=["safetensors", "bin_mmap"])
def test_qlora_load_is_memory_lean(checkpoints, layout):
    r = json.loads(_python(_LOAD, str(checkpoints / layout), "qlora").strip().splitlines()[-1])
    # ~200 MB of fp32 weights arrive as ~27 MB of NF4; one dense tensor (<= 11.5 MB) at a time.
    assert r["peak"] < r["nf4"] + 0.2 * r["full_precision"], r
    assert r["checkpoint_mapped"] == 0, r  # every tensor copied out, every file unmapped


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")
def test_measurement_sees_a_dense_load(checkpoints):
    r = json.loads(_python(_LOAD, str(checkpoints / "st"), "dense").strip().splitlines()[-1])
    assert r["peak"] > 0.9 * r["full_precision"], r
