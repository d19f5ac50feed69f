"""The GPU's measured matrix rate, for reading the benches' achieved TFLOP/s as a share of
it: a square matmul timed in bf16 and in fp32 with TF32 tensor cores (tunejob's
`[speedups] allow_tf32`).

    python bench/matmul_rate.py [--size 8192] [--iterations 50]

Prints one JSON line and appends it to $OUT/matmul_rate.jsonl when OUT is set.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import emit  # noqa: E402


def rate(size: int, dtype: torch.dtype, iterations: int) -> float:
    """TFLOP/s of `iterations` back-to-back size x size x size matmuls (2 * size**3 each)."""
    a, b = (torch.randn(size, size, device="cuda", dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iterations):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * iterations / (time.perf_counter() - start) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--iterations", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("matmul_rate.py measures a GPU; none is visible")
    torch.backends.cuda.matmul.allow_tf32 = True
    emit({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
          "size": args.size, "bf16_tflops": round(rate(args.size, torch.bfloat16,
                                                       args.iterations), 1),
          "tf32_tflops": round(rate(args.size, torch.float32, args.iterations), 1)},
         "matmul_rate.jsonl")


if __name__ == "__main__":
    main()
