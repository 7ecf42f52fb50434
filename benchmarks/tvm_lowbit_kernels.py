"""Kernel microbenchmark: int3 and fp4 weights on TVM, native kernels against the dense fp32 GEMV they replaced.

    .venv/bin/python benchmarks/tvm_lowbit_kernels.py [--threads 2] [--repeats 3] [--json OUT]

Before these kernels, ``edgecompress::MatMulBlockQuantized`` (int3) and ``edgecompress::MatMulFP4`` ran as their
function bodies on TVM: constant-folded to a dense fp32 weight at compile time, run by :func:`matmul_f32`.
Per shape (SmolLM2's 576 -> 1536, 1536 -> 576, 576 -> 576, 576 -> 192, the head's 576 -> 49152, and
4096 -> 4096), M = 1, weights from DRAM (128 MB of copies cycled through), interleaved, medians of
``--repeats`` rounds of 100 calls: ``dense_fp32`` (:func:`matmul_f32`), ``int4_b32`` (MatMulNBits' fp32
kernel, for reference), ``int3_b128`` and ``int3_b64`` (:func:`matmul_int3`), ``fp4_b32``
(:func:`matmul_nbits` with ``e2m1``). GB/s counts the bytes the kernel reads (codes and float32 scales).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from _common import interleaved_medians, tvm_kernel_builder  # benchmarks/ is on sys.path when a script runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shapes", nargs="*", default=["576x1536", "1536x576", "576x576", "576x192", "576x49152",
                                                    "4096x4096"], help="K x N")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import tvm

    kern, build = tvm_kernel_builder(args.threads)

    rows = []
    for shape in args.shapes:
        k, n = (int(v) for v in shape.split("x"))
        rng = np.random.default_rng(k + n)
        x = tvm.runtime.tensor(rng.standard_normal((1, k)).astype(np.float32))
        y = tvm.runtime.tensor(np.zeros((1, n), np.float32))
        specs = {"dense_fp32": (kern.matmul_f32(k, n), [rng.standard_normal((n, k)).astype(np.float32)])}
        for name, bits, block, func in (("int4_b32", 4, 32, lambda b: kern.matmul_nbits(k, n, 4, b, zero_points=False)),
                                        ("int3_b128", 3, 128, lambda b: kern.matmul_int3(k, n, b)),
                                        ("int3_b64", 3, 64, lambda b: kern.matmul_int3(k, n, b)),
                                        ("fp4_b32", 4, 32, lambda b: kern.matmul_nbits(k, n, 4, b, zero_points=False,
                                                                                      e2m1=True))):
            nb = -(-k // block)
            codes = rng.integers(0, 256, (n, nb, block * bits // 8)).astype(np.uint8)
            specs[name] = (func(block), [codes, rng.random(n * nb).astype(np.float32)])
        kernels = {}
        for name, (func, weights) in specs.items():
            nbytes = sum(w.nbytes for w in weights)
            copies = [[x, *(tvm.runtime.tensor(w) for w in weights), y] for _ in range(max(2, int(128e6 / nbytes)))]
            kernels[name] = (build(func), copies, nbytes)
        med = interleaved_medians(kernels, 100, args.repeats)
        row = {"k": k, "n": n, **{f"{name}_us": round(v * 1e6, 1) for name, v in med.items()},
               **{f"{name}_gbs": round(kernels[name][2] / v / 1e9, 1) for name, v in med.items()},
               **{f"{name}_over_fp32": round(med["dense_fp32"] / v, 2) for name, v in med.items() if name != "dense_fp32"}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
