"""Benchmarks of qlora_ext, side by side with dense torch, bitsandbytes and torchao.

Run from the repository root: ``python -m bench --help``. See bench/README.md.
"""
