"""Every qlora op once at small shapes, checked against the reference: the workload that
gpu_check.sh runs under ``compute-sanitizer`` (memcheck, racecheck), and on the CPU in its dry run.

    python bench/sanitize_ops.py --device cuda

Shapes cover every linear path (M <= 16 fused, on tensor cores for bf16/fp16 with 5 to 16 rows
and in-features % 64 == 0, rows of W past its 32-row tile included; larger M tiled), in-features
that are and are not multiples of 8, a partial last group of 256 absmax values, a bias and leading batch dimensions.
Exits with status 1 on the first wrong result.
"""

from __future__ import annotations

import argparse
import sys

import torch

from qlora_ext import _reference, ops

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CODEC_SHAPES = [(64,), (3, 64), (40, 64 * 7), (300, 256)]  # 300 * 4 blocks: a partial scale group
LINEAR_SHAPES = [(64, 128), (96, 256), (40, 192), (64, 100)]  # [out, in]; in=100 is not a multiple of 8
BATCHES = [(1,), (3,), (6,), (16,), (17,), (2, 3, 7)]  # leading dims of x; M = their product
# Relative error of y against float32 on the dequantized weight: the output rounding of the dtype
# plus float32 accumulation-order differences, with room to spare.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def check(name: str, ok: bool, detail: str = "") -> int:
    if not ok:
        print(f"sanitize_ops: FAILED {name} {detail}", flush=True)
        sys.exit(1)
    return 1


def codec(device: str) -> int:
    checks = 0
    for shape in CODEC_SHAPES:
        for dtype in DTYPES:
            w = torch.randn(shape, dtype=dtype)
            want = _reference.quantize_nf4(w)
            got = ops.quantize_nf4(w.to(device))
            for part, a, b in zip(("packed", "absmax_codes", "absmax_scales", "absmax_offset"), got, want):
                checks += check(f"quantize {shape} {dtype} {part}", torch.equal(a.cpu(), b))
            dense = ops.dequantize_nf4(*got, shape, dtype)
            checks += check(f"dequantize {shape} {dtype}", torch.equal(dense.cpu(), _reference.dequantize_nf4(*want, shape, dtype)))
    return checks


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float().cpu() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def linear(device: str) -> int:
    checks = 0
    for n, k in LINEAR_SHAPES:
        w = torch.randn(n, k) * k**-0.5
        components = tuple(t.to(device) for t in _reference.quantize_nf4(w))
        w_deq = _reference.dequantize_nf4(*(t.cpu() for t in components), (n, k), torch.float32)  # [n, k]
        for dtype in DTYPES:
            for batch in BATCHES:
                bias = torch.randn(n, dtype=dtype) if batch == (3,) else None
                x = torch.randn(*batch, k, dtype=dtype)  # [..., k]
                grad_y = torch.randn(*batch, n, dtype=dtype)  # [..., n]
                x_dev = x.to(device).requires_grad_(True)
                y = ops.linear_nf4(x_dev, *components, n, None if bias is None else bias.to(device))
                y.backward(grad_y.to(device))
                want_y = x.float() @ w_deq.T + (0 if bias is None else bias.float())
                want_gx = grad_y.float() @ w_deq
                case = f"{n}x{k} x{list(x.shape)} {dtype}"
                err = relative_error(y, want_y)
                checks += check(f"linear_nf4 {case}", y.shape == want_y.shape and err <= TOLERANCE[dtype], f"error {err:.3g}")
                err = relative_error(x_dev.grad, want_gx)
                checks += check(f"linear_nf4 backward {case}", x_dev.grad.shape == x.shape and err <= TOLERANCE[dtype], f"error {err:.3g}")
                direct = ops.linear_nf4_grad_input(grad_y.to(device), *components, k)
                err = relative_error(direct, want_gx)
                checks += check(f"linear_nf4_grad_input {case}", direct.shape == x.shape and err <= TOLERANCE[dtype], f"error {err:.3g}")
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("sanitize_ops: --device cuda, but no CUDA GPU is visible")
    torch.manual_seed(0)
    checks = codec(args.device) + linear(args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
    print(f"sanitize_ops: {checks} checks passed on {args.device}", flush=True)


if __name__ == "__main__":
    main()
