"""Prints the schemas of the ``qlora`` (and ``qlora_cpu``) ops one built library registers, loaded on its own (not
through the qlora_ext package), one per line, sorted: CI compares the CPU-only and CUDA builds."""

import sys

import torch

torch.ops.load_library(sys.argv[1])
for schema in sorted(str(s) for s in torch._C._jit_get_all_schemas() if s.name.startswith(("qlora::", "qlora_cpu::"))):
    print(schema)
